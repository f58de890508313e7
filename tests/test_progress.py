"""The one-line progress display (sweep.driver.progress) over real Ray Tune Trial objects, as Tune hands them over."""

from ray.tune.experiment import Trial

from sweep.driver.progress import CompactProgress


def _trial(status: str, result: dict, ratio: float) -> Trial:
    trial = Trial("sweep_trial", config={"trial": {"ratio": ratio}}, stub=True)
    trial.update_last_result(result)
    trial.set_status(status)
    return trial


def test_best_skips_trials_without_a_value_and_counts_held_ones_as_skipped():
    """A held trial reports NaN for every metric (it has no value): it must not become, or block, the best."""
    held = _trial(Trial.TERMINATED, {"val_loss": float("nan"), "val_accuracy": float("nan"),
                                     "trial_status": "HELD"}, 0.3)
    done = [_trial(Trial.TERMINATED, {"val_loss": loss, "val_accuracy": 1 - loss, "trial_status": "FINISHED"}, r)
            for loss, r in ((0.4, 0.5), (0.2, 0.7))]
    running = _trial(Trial.RUNNING, {"val_loss": 0.9, "val_accuracy": 0.1}, 0.9)
    for metric, mode, best in (("val_loss", "min", "0.2"), ("val_accuracy", "max", "0.8")):
        progress = CompactProgress(metric, mode, lambda config: f"ratio {config['trial']['ratio']}")
        for order in ([held, *done, running], [*done, running, held]):
            _, state = progress.line(order)
            assert state == f"3/4 done · 1 running · 0 failed · 1 skipped · best {metric} {best} (ratio 0.7)", state


def test_counts_the_planned_trials_when_tune_creates_them_one_at_a_time():
    """With --max-concurrent 1 Tune had created one trial of 18 and the line read '0/1 done': the count is the total
    Tune hands to setup()."""
    progress = CompactProgress("val_accuracy", "max", lambda config: "")
    progress.setup(start_time=None, total_samples=18, metric="val_accuracy", mode="max")  # as Tune calls it
    running = _trial(Trial.RUNNING, {"val_accuracy": 0.5}, 0.3)
    done = _trial(Trial.TERMINATED, {"val_accuracy": 0.6, "trial_status": "FINISHED"}, 0.3)
    line, state = progress.line([done, running])
    assert state.startswith("1/18 done · 1 running"), state
    assert "left" in line  # 17 to go, from the one that finished
    assert CompactProgress("val_accuracy", "max", lambda config: "").line([done, running])[1].startswith("1/2 done")
