"""`resources.process: fork`: trials forked from one process per node record what worker trials record, and keep
their exactly-once record when the forked process or its Tune worker is killed.

Real Ray (local, loopback), real MLflow (sqlite), real tiny trials (digits, small_cnn); every wait is bounded.
"""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from test_reliability import assert_one_finished_run_per_config, steps, wait_for, write_spec

from sweep import tracking
from sweep.names import METRICS
from sweep.orchestrate import run_sweep
from sweep.spec import load_spec

pytestmark = pytest.mark.e2e

TIMED = {name for name, info in METRICS.items() if info.unit in ("s", "ms") or name == "speedup"}  # clocks differ

def _spec(tmp_path: Path, name: str, process: str, extra: str = "", **kwargs):
    return load_spec(write_spec(tmp_path, name, extra="checkpoint_every_s: 0\n" + extra, process=process, **kwargs))


def _zygotes() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("sweep-fork")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() \
        else "X"
    return status not in ("Z", "X")  # a zombie has ended; its parent (the zygote) reaps it within a second


@pytest.mark.timeout(300)
def test_forked_trials_record_what_worker_trials_record(local_ray, tmp_path, sqlite_uri):
    """Same configs, same seeds: every metric point of a forked trial equals the worker trial's, bit for bit."""
    space = "space:\n  strategy: {grid: [l1, random]}\n"
    recorded = {}
    for process in ("worker", "fork"):
        spec = _spec(tmp_path, f"same_{process}", process, space)
        outcome = run_sweep(spec, tracking_uri=sqlite_uri, storage=str(tmp_path / "results"), verbose=0)
        assert (outcome.ran, outcome.failed) == (2, 0)
        runs = assert_one_finished_run_per_config(sqlite_uri, spec)
        client = MlflowClient(sqlite_uri)
        recorded[process] = {
            run.data.params["strategy"]: (
                {k: v for k, v in run.data.metrics.items() if k not in TIMED},
                [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy")])
            for run in runs.values()}
        assert {r.data.tags["trial.process"] for r in runs.values()} == {process}
        assert {r.data.tags["data.shared"] for r in runs.values()} == {"true"}  # the zygote mapped the node's copy
        # each trial claims as its Tune trial (a forked one hears its id from its Tune worker), never launch-wide
        trials = [r.data.tags["ray.trial"] for r in runs.values()]
        assert len(set(trials)) == 2 and all(trials)
        assert all(r.data.tags["sweep.owner"].endswith("/" + r.data.tags["ray.trial"]) for r in runs.values())
        assert not _zygotes()  # the sweep ended its zygote
    for strategy, (metrics, history) in recorded["worker"].items():
        forked_metrics, forked_history = recorded["fork"][strategy]
        assert {k: (v, forked_metrics.get(k)) for k, v in metrics.items() if forked_metrics.get(k) != v} == {}
        assert set(forked_metrics) == set(metrics) and forked_history == history
    assert [step for step, _ in recorded["fork"]["l1"][1]] == [1, 2, 3]


class KillOnce:
    """A trial hook that, in epoch 2 of each config's first attempt, raises (`raise`), or SIGKILLs the forked
    process itself (`child`) or its Tune worker (`worker`), then sleeps: a child that outlived its worker would
    write `survived`."""

    def __init__(self, target: str, marker_dir: Path):
        self.target, self.marker_dir = target, marker_dir

    def __call__(self, config: dict, epoch: int) -> None:
        from sweep.tracking import config_hash

        marker = self.marker_dir / config_hash(config)
        if epoch != 2 or marker.exists():
            return
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        if self.target == "raise":
            raise RuntimeError("injected failure in epoch 2")
        victim = os.getpid() if self.target == "child" else int(os.environ["SWEEP_TUNE_WORKER_PID"])
        os.kill(victim, signal.SIGKILL)
        time.sleep(60)
        (self.marker_dir / "survived").touch()


@pytest.fixture
def kill_once(tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return lambda target: KillOnce(target, tmp_path / "faults")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["raise", "child", "worker"])
def test_a_failed_or_killed_forked_trial_is_retried_and_each_epoch_recorded_once(local_ray, tmp_path, sqlite_uri,
                                                                                kill_once, target):
    spec = _spec(tmp_path, f"killed_{target}", "fork", "space:\n  strategy: {grid: [l1]}\n", max_failures=1)
    outcome = run_sweep(spec, tracking_uri=sqlite_uri, storage=str(tmp_path / "results"), verbose=0,
                        on_epoch=kill_once(target))
    assert (outcome.ran, outcome.failed) == (1, 0)
    [run] = assert_one_finished_run_per_config(sqlite_uri, spec).values()
    # epoch 1 from the killed attempt's checkpoint, 2 and 3 from the retry: each once
    assert steps(sqlite_uri, run.info.run_id) == [1, 2, 3]
    assert steps(sqlite_uri, run.info.run_id, "train_loss") == [1, 2, 3]
    [error] = Path(outcome.storage).glob("trial_*/error.txt")
    said = {"raise": "injected failure in epoch 2", "child": "forked process", "worker": "actor died unexpectedly"}
    assert said[target] in error.read_text()  # the child's traceback comes through; a dead worker is Ray's to say
    [marker] = [p for p in (tmp_path / "faults").iterdir() if p.name != "survived"]
    # the killed attempt's process is gone (killed, or it saw its worker's end and left), never to log again
    wait_for(lambda: not _alive(int(marker.read_text())), "the first attempt's forked process to end", 20)
    assert not (tmp_path / "faults" / "survived").exists()
    assert not _zygotes()


@pytest.mark.timeout(300)
def test_asha_stops_forked_trials_and_their_runs_say_killed(local_ray, tmp_path, sqlite_uri):
    # One trial at a time, in grid order: the networks that keep 5 % of their channels fall below the first trial
    # at ASHA's first rung and are stopped there.
    spec = _spec(tmp_path, "asha_fork", "fork", """
prune: {min_channels: 1}
space:
  strategy: {grid: [l1, random]}
  ratio: {grid: [0.2, 0.95]}
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
max_concurrent: 1
""", limit=300)
    outcome = run_sweep(spec, tracking_uri=sqlite_uri, storage=str(tmp_path / "results"), verbose=0)
    assert (outcome.ran, outcome.failed) == (4, 0)
    statuses = {(s, float(r)): status for s, r, status in
                zip(outcome.results["strategy"], outcome.results["ratio"], outcome.results["status"])}
    assert "STOPPED" in statuses.values() and "FINISHED" in statuses.values(), statuses
    runs = {(r.data.params["strategy"], float(r.data.params["ratio"])): r
            for r in tracking.child_runs(MlflowClient(sqlite_uri), spec.name)}
    # a stopped trial's child heard "stop" inside its report, recorded its epochs and ended its run as KILLED
    assert {k: r.info.status for k, r in runs.items()} == {
        k: "FINISHED" if status == "FINISHED" else "KILLED" for k, status in statuses.items()}
    for key, status in statuses.items():
        logged = steps(sqlite_uri, runs[key].info.run_id)
        assert logged == list(range(1, 1 + len(logged)))  # each epoch once
        assert (len(logged) < 3) == (status == "STOPPED")
    assert not _zygotes()
