"""One trial end to end, standalone (no Ray): real data, real training, a real MLflow store."""

import dataclasses
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep import tracking
from sweep.data import batches, load_dataset
from sweep.models import build_model
from sweep.pruning import load_pruned
from sweep.spec import parse_spec
from sweep.train import evaluate
from sweep.base import base_key
from sweep.trial import InjectedFault, SweepContext, run_trial

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

PARAMS = ["model", "weights", "dataset", "strategy", "ratio", "target", "scope", "schedule", "seed",
          "base.lr", "finetune.epochs", "finetune.lr"]
METRICS = ["base_accuracy", "accuracy", "accuracy_drop", "flops", "base_flops", "flops_reduction", "params",
           "params_reduction", "size_mb", "latency_ms", "speedup", "prune_time_s", "train_time_s",
           "base_train_time_s"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("trial")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{root}/mlflow.db")
    tracking.init_store(uri)
    parent = tracking.start_parent_run(uri, "trialtest", SPACE)
    return SweepContext(uri, "trialtest", parent, str(root / "bases"))


@pytest.fixture(scope="module")
def configs():
    return parse_spec(SPACE).grid_configs()


@pytest.fixture(scope="module")
def l1_trial(store, configs):
    reports = []
    final = run_trial(configs[0], store, report=lambda metrics, ckpt: reports.append((metrics, ckpt)))
    return final, reports


def _child(store, strategy):
    runs = tracking.child_runs(MlflowClient(store.tracking_uri), store.experiment,
                               f"params.strategy = '{strategy}'")
    assert len(runs) == 1
    return runs[0]


def test_trial_records_everything(store, l1_trial):
    final, reports = l1_trial
    run = _child(store, "l1")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == store.parent_run_id
    assert run.data.tags["base_cache"] == "miss"
    for name in PARAMS:
        assert name in run.data.params, name
    assert run.data.params["strategy"] == "l1" and float(run.data.params["ratio"]) == 0.5
    for name in METRICS:
        assert name in run.data.metrics, name
    m = run.data.metrics
    assert m["flops"] < m["base_flops"] and 0 < m["flops_reduction"] < 1
    assert m["params"] < m["base_params"]
    assert 0 <= m["accuracy"] <= 1 and 0.5 < m["base_accuracy"] <= 1  # digits are easy
    assert m["accuracy_drop"] == pytest.approx(m["base_accuracy"] - m["accuracy"])
    client = MlflowClient(store.tracking_uri)
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [h.step for h in history] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "channels.csv", "channels.png"} <= artifacts
    # one report per fine-tune epoch (with a checkpoint), then the final one
    assert [r[0]["epoch"] for r in reports] == [1, 2, 2]
    assert all(ckpt is not None for _, ckpt in reports[:2]) and reports[-1][1] is None
    assert reports[-1][0]["accuracy"] == final["accuracy"] == m["accuracy"]


def test_logged_checkpoint_reproduces_logged_accuracy(store, configs, l1_trial, tmp_path):
    run = _child(store, "l1")
    local = MlflowClient(store.tracking_uri).download_artifacts(run.info.run_id, "checkpoint/pruned.pt", str(tmp_path))
    config = configs[0]
    splits = load_dataset("digits", seed=config["seed"])
    base = build_model("small_cnn", splits.num_classes, None, splits.in_channels)
    model, plan = load_pruned(local, base)
    test = evaluate(model, batches(splits.test, 64, False, "cpu"), "cpu", splits.num_classes)
    assert test["accuracy"] == run.data.metrics["accuracy"]
    assert plan.info["strategy"] == "l1"


def test_second_trial_shares_the_base(store, configs, l1_trial):
    run_trial(configs[1], store, report=lambda m, c: None)  # taylor: needs calibration batches too
    run = _child(store, "taylor")
    assert run.data.tags["base_cache"] == "hit"
    assert run.data.metrics["base_accuracy"] == _child(store, "l1").data.metrics["base_accuracy"]
    bases = list(Path(store.cache_dir).glob("*/base.pt"))
    assert [p.parent.name for p in bases] == [base_key(configs[1])]


def test_finished_config_is_not_rerun(store, configs, l1_trial):
    again = run_trial(configs[0], store, report=lambda m, c: None)
    assert again["skipped"] == 1.0
    assert again["accuracy"] == l1_trial[0]["accuracy"]
    _child(store, "l1")  # still exactly one run


def test_iterative_flops_trial(store, configs):
    config = {**configs[2], "prune": {**configs[2]["prune"], "schedule": "iterative", "steps": 2,
                                      "target": "flops", "strategy": "fpgm"}}
    final = run_trial(config, store, report=lambda m, c: None)
    assert final["flops_reduction"] == pytest.approx(0.5, abs=0.05)


def test_failed_trial_resumes_from_its_checkpoint_in_the_same_run(store, configs, tmp_path):
    config = {**configs[2], "fault": {"fail_at_epoch": 2}}
    saved = []

    def keep_checkpoints(metrics, ckpt):
        if ckpt is not None:  # the directory is temporary: copy it as Ray Tune would persist it
            saved.append(shutil.copytree(ckpt, tmp_path / f"ckpt{len(saved)}"))

    with pytest.raises(InjectedFault):
        run_trial(config, store, report=keep_checkpoints)
    run = _child(store, "random")
    assert run.info.status == "FAILED"
    client = MlflowClient(store.tracking_uri)
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]

    final = run_trial(config, store, report=lambda m, c: None, checkpoint_dir=str(saved[-1]))
    run = _child(store, "random")  # the same run, continued: no duplicate
    assert run.info.status == "FINISHED"
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    assert run.data.metrics["accuracy"] == final["accuracy"]


def test_rerun_runs_a_finished_config_again(store, configs, l1_trial):
    """`sweep run --force`: a finished config gets a second, new run."""
    again = run_trial(configs[0], dataclasses.replace(store, rerun=True), report=lambda m, c: None)
    assert "skipped" not in again
    runs = tracking.child_runs(MlflowClient(store.tracking_uri), store.experiment, "params.strategy = 'l1'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
