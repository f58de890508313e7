"""One trial end to end, standalone (no Ray): real data, real training, a real MLflow store.

Every test builds what it needs from the module's fixtures, so each passes alone and in any order.
"""

import dataclasses
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sweep.config.arms import canonical
from sweep.config.names import METRICS, tune_metrics
from sweep.config.spec import parse_spec
from sweep.pruning import load_pruned
from sweep.store import claims, tracking
from sweep.worker.base import base_key
from sweep.worker.identity import typed_trial
from sweep.worker.train import evaluate
from sweep.worker.trial import SweepContext, run_trial, selection_view
from sweep.zoo.batching import batches
from sweep.zoo.data import load_dataset
from sweep.zoo.models import build_model

SPACE = """
name: trialtest
dataset: {name: digits}
model: {name: small_cnn}
base: {epochs: 2, lr: 0.05}
finetune: {epochs: 2, lr: 0.01, batch_size: 64}
measure: {batch_size: 1, warmup: 1, runs: 3}
space:
  strategy: {grid: [l1, taylor, random]}
  ratio: 0.5
"""

PARAMS = ["model", "weights", "dataset", "strategy", "ratio", "target", "scope", "schedule", "arm", "seed",
          "base.lr", "finetune.epochs", "finetune.lr"]
# Everything a trial records itself; latency comes later, from the sweep's measurement phase.
TRIAL_METRICS = [name for name in METRICS if name not in ("latency_ms", "latency_iqr_ms", "base_latency_ms",
                                                          "speedup", "epoch", "test_top5")]


@pytest.fixture(scope="module")
def store(tmp_path_factory, one_thread, template_db):
    root = tmp_path_factory.mktemp("trial")
    shutil.copy(template_db, root / "mlflow.db")  # an empty store, schema made once per session
    uri = tracking.resolve_tracking_uri(f"sqlite:///{root}/mlflow.db")
    parent = tracking.start_parent_run(uri, "trialtest", SPACE)
    return SweepContext(uri, "trialtest", parent, str(root / "bases"))


@pytest.fixture(scope="module")
def configs():
    return parse_spec(SPACE).grid_configs()


def _with(config: dict, **prune) -> dict:
    return {**config, "prune": {**config["prune"], **prune}}


@pytest.fixture(scope="module")
def l1_trial(store, configs):
    reports = []
    final = run_trial(configs[0], store, report=lambda metrics, ckpt: reports.append((metrics, ckpt)))
    return final, reports


def _runs(store, config):
    return tracking.child_runs(MlflowClient(store.tracking_uri), store.experiment,
                               f"tags.config_hash = '{tracking.config_hash(config)}'")


def _forced(store: SweepContext) -> SweepContext:
    """The context of a `sweep run --force` launch starting now."""
    return dataclasses.replace(store, rerun=True, launch_started=time.time())


def _pruned_state(client, run_id: str, folder: Path) -> dict:
    path = client.download_artifacts(run_id, "checkpoint/pruned.pt", str(folder / run_id))
    return torch.load(path, weights_only=True)["state_dict"]


def _history(store, run_id, metric):
    return [(m.step, m.value) for m in MlflowClient(store.tracking_uri).get_metric_history(run_id, metric)]


def test_trial_records_every_metric_once(store, configs, l1_trial):
    final, _ = l1_trial
    [run] = _runs(store, configs[0])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == store.parent_run_id and run.data.tags["base_cache"] == "miss"
    for name in PARAMS:
        assert name in run.data.params, name
    assert run.data.params["strategy"] == "l1" and run.data.params["arm"] == "finetune"
    m = run.data.metrics
    assert sorted(TRIAL_METRICS) == sorted(k for k in m if k in TRIAL_METRICS)
    assert m["flops"] < m["base_flops"] and m["macs"] * 2 == m["flops"] and 0 < m["flops_reduction"] < 1
    assert m["channels_removed"] == pytest.approx(0.5, abs=0.02)  # local scope: half of every layer
    assert m["params"] < m["base_params"]
    assert 0.5 < m["base_test_accuracy"] <= 1 and 0.5 < m["base_val_accuracy"] <= 1  # digits are easy
    assert m["test_accuracy_drop"] == pytest.approx(m["base_test_accuracy"] - m["test_accuracy"])
    assert m["pruned_test_accuracy"] < m["base_test_accuracy"]  # pruning hurts before the fine-tune mends it
    for name in ("val_accuracy", "val_loss", "train_loss"):
        assert [s for s, _ in _history(store, run.info.run_id, name)] == [1, 2], name
    for name in ("test_accuracy", "pruned_val_accuracy", "pruned_test_accuracy", "flops"):
        assert len(_history(store, run.info.run_id, name)) == 1, name
    artifacts = {a.path for a in MlflowClient(store.tracking_uri).list_artifacts(run.info.run_id)}
    assert {"checkpoint", "channels.csv"} <= artifacts
    assert final["test_accuracy"] == m["test_accuracy"]


def test_tune_never_sees_a_test_metric(l1_trial):
    _, reports = l1_trial
    assert [r[0]["epoch"] for r in reports] == [1, 2, 2]  # one report per epoch with a checkpoint, then the end
    assert all(ckpt is not None for _, ckpt in reports[:2]) and reports[-1][1] is None
    seen = {name for metrics, _ in reports for name in metrics}
    assert "val_accuracy" in seen and not {n for n in seen if n.startswith(("test_", "pruned_test", "base_test"))}
    view = selection_view({"test_accuracy": 1.0, "val_accuracy": 0.5, "custom": 2})
    assert "test_accuracy" not in view and (view["val_accuracy"], view["custom"]) == (0.5, 2)
    assert set(view) - {"custom"} == set(tune_metrics()) and math.isnan(view["flops_reduction"])


def test_every_report_to_tune_carries_every_metric_a_spec_may_select_on(store, configs, l1_trial):
    """Tune ends the whole sweep on a report without the spec's metric: each epoch's report has the metrics known
    at pruning and with the base too, with the values the run recorded."""
    final, reports = l1_trial
    [run] = _runs(store, configs[0])
    for metrics, _ in reports:
        assert set(tune_metrics()) <= set(metrics)
        for name in ("flops_reduction", "params", "base_val_accuracy", "pruned_val_accuracy"):
            assert metrics[name] == run.data.metrics[name], name
    assert [m["val_accuracy"] for m, _ in reports[:2]] == [v for _, v in _history(store, run.info.run_id,
                                                                                  "val_accuracy")]


def test_logged_checkpoint_reproduces_logged_accuracy(store, configs, l1_trial, tmp_path):
    [run] = _runs(store, configs[0])
    local = MlflowClient(store.tracking_uri).download_artifacts(run.info.run_id, "checkpoint/pruned.pt", str(tmp_path))
    splits = load_dataset("digits", seed=configs[0]["seed"])
    model, plan = load_pruned(local, build_model("small_cnn", splits.num_classes, None, splits.in_channels))
    test = evaluate(model, batches(splits.test, 64, False, "cpu"), "cpu", splits.num_classes)
    assert test["accuracy"] == run.data.metrics["test_accuracy"]
    assert plan.info["strategy"] == "l1" and plan.info["arch"]["num_classes"] == 10


def test_second_trial_shares_the_base(store, configs, l1_trial):
    run_trial(configs[1], store, report=lambda m, c: None)  # taylor: needs calibration batches too
    [run] = _runs(store, configs[1])
    assert run.data.tags["base_cache"] == "hit"
    [first] = _runs(store, configs[0])
    assert run.data.metrics["base_test_accuracy"] == first.data.metrics["base_test_accuracy"]
    assert [p.parent.name for p in Path(store.cache_dir).glob("*/base.pt")] == [base_key(typed_trial(configs[1]))]


def test_finished_config_is_not_rerun(store, configs, l1_trial):
    again = run_trial(configs[0], store, report=lambda m, c: None)
    assert again["skipped"] == 1.0 and again["test_accuracy"] == l1_trial[0]["test_accuracy"]
    assert len(_runs(store, configs[0])) == 1


def test_rerun_runs_a_finished_config_again(store, configs, l1_trial):
    """`sweep run --force`: a finished config gets a second, new run."""
    again = run_trial(configs[0], _forced(store), report=lambda m, c: None)
    assert "skipped" not in again
    runs = _runs(store, configs[0])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)


def test_iterative_flops_trial_records_accuracy_after_each_step(store, configs):
    config = _with(configs[2], schedule="iterative", steps=2, target="flops", strategy="fpgm")
    final = run_trial(config, store, report=lambda m, c: None)
    assert final["flops_reduction"] == pytest.approx(0.5, abs=0.05)
    [run] = _runs(store, config)
    steps = _history(store, run.info.run_id, "pruned_val_accuracy")
    assert [s for s, _ in steps] == [1, 2] and run.data.metrics["pruned_val_accuracy"] == steps[-1][1]


def test_scratch_arm_trains_the_pruned_architecture_from_new_weights(store, configs, tmp_path):
    # under local scope every criterion gives one architecture: the scratch trial is recorded without one
    finetune, scratch = _with(configs[0], ratio=0.3), canonical(_with(configs[0], ratio=0.3, arm="scratch"))
    assert scratch["prune"]["strategy"] == "none"
    run_trial(finetune, store, report=lambda m, c: None)
    run_trial(scratch, store, report=lambda m, c: None)
    [ft_run], [sc_run] = _runs(store, finetune), _runs(store, scratch)
    # the same architecture (same pruned channels), trained for the base's 2 epochs at the base's settings
    assert sc_run.data.metrics["params"] == ft_run.data.metrics["params"]
    assert "pruned_test_accuracy" not in sc_run.data.metrics  # an arbitrary criterion's weights, re-initialised
    assert [s for s, _ in _history(store, sc_run.info.run_id, "val_accuracy")] == [1, 2]
    client = MlflowClient(store.tracking_uri)
    weights = [_pruned_state(client, r.info.run_id, tmp_path) for r in (ft_run, sc_run)]
    assert weights[0].keys() == weights[1].keys()
    assert not torch.equal(weights[0]["features.0.weight"], weights[1]["features.0.weight"])


def _keep_checkpoints(saved: list, folder: Path):
    def report(metrics, ckpt):
        if ckpt is not None:  # the directory is temporary: copy it as Ray Tune would persist it
            saved.append(shutil.copytree(ckpt, folder / f"ckpt{len(saved)}"))
    return report


def test_failed_trial_resumes_in_the_same_run_bit_identical(store, configs, tmp_path, fail_once):
    config = _with(configs[2], ratio=0.4)
    failing = dataclasses.replace(store, on_epoch=fail_once(2))
    saved = []
    with pytest.raises(RuntimeError, match="injected"):
        run_trial(config, failing, report=_keep_checkpoints(saved, tmp_path))
    [run] = _runs(store, config)
    assert run.info.status == "FAILED"
    assert [s for s, _ in _history(store, run.info.run_id, "val_accuracy")] == [1]

    resumed = run_trial(config, failing, report=lambda m, c: None, checkpoint_dir=str(saved[-1]))
    [run] = _runs(store, config)  # the same run, continued: no duplicate
    assert run.info.status == "FINISHED"
    for name in ("val_accuracy", "train_loss", "pruned_val_accuracy", "test_accuracy", "flops"):
        steps = [s for s, _ in _history(store, run.info.run_id, name)]
        assert steps == sorted(set(steps)), f"{name} logged twice: {steps}"

    # An uninterrupted run of the same config (--force) ends with the same weights and metrics, bit for bit.
    whole = run_trial(config, _forced(store), report=_keep_checkpoints(saved, tmp_path / "w"))
    assert whole["test_accuracy"] == resumed["test_accuracy"] and whole["val_loss"] == resumed["val_loss"]
    runs = sorted(_runs(store, config), key=lambda r: r.info.start_time)
    assert _history(store, runs[0].info.run_id, "val_loss") == _history(store, runs[1].info.run_id, "val_loss")
    client = MlflowClient(store.tracking_uri)
    states = [_pruned_state(client, r.info.run_id, tmp_path) for r in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_no_fine_tune_reports_the_pruned_network(store, configs):
    """finetune.epochs 0 (accuracy right after pruning, Li et al.'s comparison): the final network is the pruned
    one, and Tune still gets the validation metric it selects on."""
    config = {**_with(configs[0], ratio=0.6), "finetune": {**configs[0]["finetune"], "epochs": 0}}
    reports = []
    final = run_trial(config, store, report=lambda metrics, ckpt: reports.append(metrics))
    assert final["test_accuracy"] == final["pruned_test_accuracy"]
    assert reports[-1]["val_accuracy"] == final["pruned_val_accuracy"] and "test_accuracy" not in reports[-1]
    assert reports[-1]["val_loss"] > 0  # metric: val_loss selects among such trials too


def test_a_trial_shorter_than_its_checkpoint_period_persists_none_and_logs_each_epoch_once(store, configs, tmp_path):
    """checkpoint_every_s longer than the trial: no checkpoint (a retry would redo less than that period), and
    MLflow still gets every epoch, when the trial ends."""
    config = _with(configs[0], ratio=0.45)
    reports = []
    run_trial(config, dataclasses.replace(store, checkpoint_every_s=3600),
              report=lambda metrics, ckpt: reports.append((metrics.get("epoch"), ckpt is not None)))
    assert reports == [(1, False), (2, False), (2, False)]  # Tune still sees every epoch (schedulers read them)
    [run] = _runs(store, config)
    for name in ("val_accuracy", "val_loss", "train_loss"):
        assert [s for s, _ in _history(store, run.info.run_id, name)] == [1, 2], name


def test_a_run_left_without_params_gets_them_when_continued(store, configs):
    """A worker killed between creating its run and logging its params (MLflow takes them in a second request)
    leaves a claimed run without params; the trial that continues it logs them, so the report can place it."""
    config = _with(configs[0], ratio=0.25)
    client = MlflowClient(store.tracking_uri)
    orphan = client.create_run(tracking.find_experiment_id(client, store.experiment), tags={
        "config_hash": tracking.config_hash(config), "mlflow.parentRunId": store.parent_run_id,
        "sweep.name": store.experiment, claims.OWNER_TAG: "dead-launch/t1", claims.LEASE_TAG: f"{time.time() - 1:.3f}"})
    run_trial(config, store, report=lambda m, c: None)
    [run] = _runs(store, config)
    assert run.info.run_id == orphan.info.run_id and run.info.status == "FINISHED"
    assert run.data.params == tracking.flat_params(config)


def test_a_stop_during_the_final_report_leaves_a_finished_complete_run(store, configs):
    """Tune hears of a trial's end after its run is FINISHED, with its test and its network: a driver that dies, or
    a stop, while that report is on its way leaves nothing for a later launch to train again."""
    config = _with(configs[0], ratio=0.65)

    def report(metrics, ckpt):
        if metrics.get("trial_status") == "FINISHED":
            raise SystemExit("stopped while reporting the end")

    with pytest.raises(SystemExit):
        run_trial(config, store, report=report)
    [run] = _runs(store, config)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    files = {a.path for a in MlflowClient(store.tracking_uri).list_artifacts(run.info.run_id, "checkpoint")}
    assert files == {"checkpoint/pruned.pt"}


@pytest.mark.parametrize("log_every_epoch", [False, True])
def test_a_retry_redoing_unsaved_epochs_records_each_epoch_once(store, configs, tmp_path, fail_once, log_every_epoch):
    """A crash before the first scheduled checkpoint: the retry starts over in the same run. Epochs the failed
    attempt already logged (log_every_epoch, as under ASHA) keep their first value; none appears twice."""
    config = _with(configs[0], ratio=0.35 if log_every_epoch else 0.55)
    context = dataclasses.replace(store, checkpoint_every_s=3600, log_every_epoch=log_every_epoch,
                                  on_epoch=fail_once(2))
    saved = []
    with pytest.raises(RuntimeError, match="injected"):
        run_trial(config, context, report=_keep_checkpoints(saved, tmp_path))
    assert saved == []  # nothing was due before the crash
    [run] = _runs(store, config)
    first = _history(store, run.info.run_id, "val_accuracy")
    assert [s for s, _ in first] == ([1] if log_every_epoch else [])

    run_trial(config, context, report=lambda m, c: None)  # Tune's retry: no checkpoint to restore
    [run] = _runs(store, config)
    assert run.info.status == "FINISHED"
    for name in ("val_accuracy", "train_loss", "pruned_val_accuracy", "test_accuracy", "flops"):
        steps = [s for s, _ in _history(store, run.info.run_id, name)]
        assert steps == sorted(set(steps)), f"{name} logged twice: {steps}"
    history = _history(store, run.info.run_id, "val_accuracy")
    assert [s for s, _ in history] == [1, 2] and history[:len(first)] == first
