"""sweep.store.tracking against a real MLflow sqlite store in tmp_path."""

import copy
import json
import re
import sqlite3
import threading

import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from sweep.config.names import PARAMS
from sweep.store import tracking
from sweep.store.tracking import TrialRun

EXPERIMENT = "tracking-test"

TRIAL = {
    "name": EXPERIMENT,
    "seed": 0,
    "device": "auto",
    "model": {"name": "small_cnn", "weights": None},
    "dataset": {"name": "digits", "root": None, "download": False, "val_fraction": 0.1, "image_size": None,
                "limit": None},
    "base": {"epochs": 5, "lr": 0.05, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
    "prune": {"strategy": "l1", "ratio": 0.5, "scope": "local", "target": "channels", "schedule": "oneshot", "steps": 1,
              "min_channels": 1, "round_to": 1, "ignore": [], "calibration_batches": 4, "arm": "finetune"},
    "finetune": {"epochs": 3, "lr": 0.01, "batch_size": 64, "optimizer": "sgd"},
    "measure": {"batch_size": 1, "warmup": 5, "runs": 30},
}


def trial(**prune) -> dict:
    cfg = copy.deepcopy(TRIAL)
    cfg["prune"].update(prune)
    return cfg


@pytest.fixture
def uri(sqlite_uri):
    return sqlite_uri


def test_resolve_tracking_uri_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking.resolve_tracking_uri() == "http://localhost:5000"
    assert tracking.resolve_tracking_uri("http://mlflow:80") == "http://mlflow:80"
    # Relative sqlite paths become absolute: Ray trial workers run in other directories.
    assert tracking.resolve_tracking_uri("sqlite:///runs/x.db") == f"sqlite:///{tmp_path}/runs/x.db"
    assert tracking.resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


def test_config_hash_ignores_key_order():
    reordered = {key: TRIAL[key] for key in reversed(list(TRIAL))}
    reordered["prune"] = {key: TRIAL["prune"][key] for key in reversed(list(TRIAL["prune"]))}
    h = tracking.config_hash(TRIAL)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert tracking.config_hash(reordered) == h
    assert tracking.config_hash(trial(ratio=0.6)) != h
    assert tracking.config_hash(trial(scope="global")) != h


def test_flat_params_names_and_values():
    cfg = trial(ignore=["x" * 600])
    params = tracking.flat_params(cfg)
    assert list(params)[:11] == list(PARAMS)  # the names users filter on come first
    assert params["model"] == "small_cnn" and params["weights"] == "None" and params["ratio"] == "0.5"
    assert params["finetune.lr"] == "0.01" and params["base.weight_decay"] == "0.0005"
    assert params["dataset.val_fraction"] == "0.1" and params["dataset.limit"] == "None"
    assert all(isinstance(v, str) and len(v) <= 500 for v in params.values())
    assert params["prune.ignore"].startswith('["xxx')
    # No duplicates of the short names, no experiment-level keys.
    assert "prune.strategy" not in params and "model.name" not in params and "name" not in params


def test_per_layer_ratios_and_kwargs_are_one_param_each_that_mlflow_accepts(uri):
    """Module patterns (`layer1.*.conv1`) are not valid MLflow param names: a mapping inside a section is one JSON
    param, and a run with Li et al.'s per-layer ratios and model kwargs is created in a real store."""
    ratios = {"layer1.7.conv1": 0, "layer1.*.conv1": 0.125, "layer3.*.conv1": 0.1094}
    cfg = trial(ratios=ratios)
    cfg["model"]["kwargs"] = {"width": 8, "block.*": 2}
    params = tracking.flat_params(cfg)
    assert json.loads(params["prune.ratios"]) == ratios and json.loads(params["model.kwargs"]) == cfg["model"]["kwargs"]
    assert not any("*" in name for name in params)
    run = TrialRun.create(uri, EXPERIMENT, None, cfg)
    assert MlflowClient(uri).get_run(run.run_id).data.params == params


def test_code_version_is_a_commit_or_none():
    version = tracking.code_version()
    assert version is None or re.fullmatch(r"[0-9a-f]{40}", version)


def test_parent_and_child_runs(uri, monkeypatch):
    client = MlflowClient(uri)
    parent = tracking.start_parent_run(uri, EXPERIMENT, "space:\n  ratio: 0.5\n", tags={"launch": 1})
    decoy = tracking.start_parent_run(uri, EXPERIMENT, "decoy: true\n")
    # mlflow issue 15713: a set MLFLOW_RUN_ID overrides parent_run_id in the fluent API. It must not reach our runs.
    monkeypatch.setenv("MLFLOW_RUN_ID", decoy)
    run = TrialRun.create(uri, EXPERIMENT, parent, TRIAL)

    parent_run = client.get_run(parent)
    assert parent_run.data.tags["sweep.role"] == "parent" and parent_run.data.tags["launch"] == "1"
    assert parent_run.data.params == {"sweep.name": EXPERIMENT}
    spec = client.download_artifacts(parent, "spec.yaml")
    assert open(spec).read() == "space:\n  ratio: 0.5\n"

    child = client.get_run(run.run_id)
    assert child.info.run_id != decoy
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["config_hash"] == tracking.config_hash(TRIAL)
    assert child.data.tags["sweep.name"] == EXPERIMENT
    assert child.info.run_name == "l1-0.5-local-channels-oneshot-small_cnn"
    assert child.data.params == tracking.flat_params(TRIAL)
    assert child.info.status == "RUNNING"

    tracking.end_run(uri, parent)
    assert client.get_run(parent).info.status == "FINISHED"
    with pytest.raises(ValueError, match="status 'DONE'"):
        run.finish("DONE")


def test_metrics_and_artifacts(uri, tmp_path):
    client = MlflowClient(uri)
    run = TrialRun.create(uri, EXPERIMENT, None, TRIAL)
    points = [(name, epoch, value) for epoch in range(3)
              for name, value in (("train_loss", 1.0 / (epoch + 1)), ("val_accuracy", 0.5 + 0.1 * epoch))]
    run.log_points(points[:4])
    run.log_points(points)  # what is already there is not sent again
    run.log_points([("test_accuracy", 0, 0.8), ("flops", 0, 12345)])
    csv = tmp_path / "channels.csv"
    csv.write_text("layer,before,after\nconv1,16,8\n")
    run.log_artifact(csv)
    run.log_artifact(csv, "checkpoint")
    run.set_tags({"prune.warnings": "clamped"})

    # A retry opens the same run and knows every point it holds: logging them all again adds nothing.
    again = TrialRun.resume(uri, run.run_id, TRIAL)
    assert again.present == {(n, s) for n, s, _ in points} | {("test_accuracy", 0), ("flops", 0)}
    again.log_points([*points, ("val_accuracy", 3, 0.9)])
    again.finish()

    history = client.get_metric_history(run.run_id, "val_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.9)]
    data = client.get_run(run.run_id).data
    assert data.metrics["test_accuracy"] == 0.8 and data.metrics["flops"] == 12345.0
    assert data.tags["prune.warnings"] == "clamped"
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"channels.csv", "checkpoint"}
    # Artifacts live beside the sqlite file, not in the process's working directory.
    assert (tmp_path / "mlruns").is_dir()


def test_resume_continues_the_same_run(uri):
    client = MlflowClient(uri)
    parent = tracking.start_parent_run(uri, EXPERIMENT, "")
    first = TrialRun.create(uri, EXPERIMENT, parent, TRIAL)
    first.log_points([("val_accuracy", 0, 0.5), ("val_accuracy", 1, 0.6)])
    first.finish("FAILED")  # the worker died; Ray retries the trial

    h = tracking.config_hash(TRIAL)
    assert tracking.find_trial_run(uri, EXPERIMENT, h, parent) == first.run_id
    other_parent = tracking.start_parent_run(uri, EXPERIMENT, "")
    assert tracking.find_trial_run(uri, EXPERIMENT, h, other_parent) is None
    assert tracking.find_trial_run(uri, EXPERIMENT, tracking.config_hash(trial(ratio=0.7)), parent) is None

    again = TrialRun.resume(uri, first.run_id, TRIAL)
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.log_points([("val_accuracy", 2, 0.7)])
    again.finish()

    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert len(client.search_runs([experiment_id])) == 3  # two parents, one child: no duplicate trial run
    history = client.get_metric_history(first.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    assert tracking.find_trial_run(uri, EXPERIMENT, h, parent) is None  # finished: nothing left to continue
    assert tracking.finished_trials(uri, EXPERIMENT) == {h: first.run_id}


def test_finished_trials_only_finished_children(uri):
    assert tracking.finished_trials(uri, "no-such-experiment") == {}
    parent = tracking.start_parent_run(uri, EXPERIMENT, "")
    expected = {}
    for ratio, status in [(0.2, "FINISHED"), (0.4, "FAILED"), (0.6, "KILLED"), (0.8, None), (0.9, "FINISHED")]:
        cfg = trial(ratio=ratio)
        run = TrialRun.create(uri, EXPERIMENT, parent, cfg)
        if status:
            run.finish(status)
        if status == "FINISHED":
            expected[tracking.config_hash(cfg)] = run.run_id
    tracking.end_run(uri, parent)  # a FINISHED parent is not a trial
    # A forced re-run of ratio 0.2 finishes later: the newest run represents the config.
    rerun = TrialRun.create(uri, EXPERIMENT, parent, trial(ratio=0.2))
    rerun.finish()
    expected[tracking.config_hash(trial(ratio=0.2))] = rerun.run_id
    assert tracking.finished_trials(uri, EXPERIMENT) == expected


@pytest.mark.parametrize("lookup_max", [200, 0], ids=["per-hash-queries", "full-scan"])
def test_pending_grid_skips_finished_configs_and_runs_the_rest(uri, monkeypatch, lookup_max):
    """_pending_grid looks configs up one filtered query each (small grids) or scans every FINISHED run (large
    ones): both skip exactly the configs with a FINISHED child run, the newest one standing for the config."""
    from sweep.config.spec import parse_spec
    from sweep.driver.launch import _pending_grid

    monkeypatch.setattr(tracking, "FINISHED_LOOKUP_MAX", lookup_max)
    spec = parse_spec(f"name: {EXPERIMENT}\ndataset: {{name: digits}}\nmodel: {{name: small_cnn}}\n"
                      "space: {strategy: {grid: [l1, l2, random]}, ratio: {grid: [0.3, 0.6]}}\n")
    configs = spec.grid_configs()
    assert _pending_grid(spec, uri, force=False) == (configs, 0)  # no experiment yet: everything runs
    parent = tracking.start_parent_run(uri, EXPERIMENT, "")
    statuses = ["FINISHED", "FAILED", "KILLED", None, "FINISHED", None]  # None: still RUNNING
    newest = {}
    for cfg, status in zip(configs, statuses):
        run = TrialRun.create(uri, EXPERIMENT, parent, cfg)
        if status:
            run.finish(status)
        if status == "FINISHED":
            newest[tracking.config_hash(cfg)] = run.run_id
    other = TrialRun.create(uri, EXPERIMENT, parent, trial(ratio=0.11))  # a FINISHED config outside this grid
    other.finish()
    tracking.end_run(uri, parent)
    pending, skipped = _pending_grid(spec, uri, force=False)
    assert pending == [c for c, status in zip(configs, statuses) if status != "FINISHED"] and skipped == 2
    assert _pending_grid(spec, uri, force=True) == (configs, 0)
    hashes = [tracking.config_hash(c) for c in configs] + ["0123456789abcdef"]
    found = tracking.finished_trials(uri, EXPERIMENT, hashes)
    # the scan returns every finished config of the experiment; the per-hash lookup only those asked for
    assert {h: found[h] for h in hashes if h in found} == newest
    if lookup_max:
        assert found == newest
        with pytest.raises(ValueError, match="config_hash"):  # a hash is spliced into a filter string: checked
            tracking.finished_trials(uri, EXPERIMENT, ["x' or tags.a = 'b"])


def test_runs_to_measure_reads_only_unmeasured_finished_runs(uri):
    from sweep.worker import latency

    parent = tracking.start_parent_run(uri, EXPERIMENT, "")
    runs = [TrialRun.create(uri, EXPERIMENT, parent, trial(ratio=r)) for r in (0.1, 0.2, 0.3, 0.4, 0.5)]
    for run in runs[:4]:
        run.finish()
    runs[1].log_points([("latency_ms", 0, 1.0)])
    runs[1].set_tags({"latency.device": "cpu"})  # measured
    runs[2].log_points([("latency_ms", 0, 1.0)])  # measured, killed before its tags: never measured twice
    tracking.end_run(uri, parent)  # runs[4] is still RUNNING: not yet
    assert sorted(latency.runs_to_measure(uri, EXPERIMENT)) == sorted([runs[0].run_id, runs[3].run_id])

    # Another launch still running measures its own finished runs; this launch and a single trial leave them alone.
    other = tracking.start_parent_run(uri, EXPERIMENT, "")
    theirs = TrialRun.create(uri, EXPERIMENT, other, trial(ratio=0.6))
    theirs.finish()
    ours = tracking.start_parent_run(uri, EXPERIMENT, "")
    for own_parent in (ours, None):
        assert sorted(latency.runs_to_measure(uri, EXPERIMENT, own_parent)) == sorted([runs[0].run_id, runs[3].run_id])
    assert theirs.run_id in latency.runs_to_measure(uri, EXPERIMENT, other)
    tracking.end_run(uri, other, "KILLED")  # that launch died before its phase: a later one measures its runs
    assert theirs.run_id in latency.runs_to_measure(uri, EXPERIMENT, ours)


def test_deleted_experiment_is_a_clear_error(uri):
    client = MlflowClient(uri)
    client.delete_experiment(tracking.get_or_create_experiment(client, EXPERIMENT))
    with pytest.raises(ValueError, match="is deleted: restore it"):
        tracking.get_or_create_experiment(client, EXPERIMENT)


def test_retry_survives_a_real_sqlite_lock(tmp_path):
    db = tmp_path / "lock.db"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x INTEGER)")
    # timeout=0: fail at once while locked, as sqlite does for a deferred transaction that cannot upgrade.
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0})

    def insert():
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))

    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlalchemy.exc.OperationalError, match="locked"):
        tracking.with_retry(insert, attempts=2)  # bounded: gives up while the lock is still held

    release = threading.Timer(0.5, holder.execute, args=("COMMIT",))
    release.start()
    tracking.with_retry(insert)
    release.join()
    assert holder.execute("SELECT count(*) FROM t").fetchone() == (1,)

    calls = []

    def broken():
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("no such table: t2"))

    with pytest.raises(sqlalchemy.exc.OperationalError, match="no such table"):
        tracking.with_retry(broken)
    assert len(calls) == 1  # only lock errors are retried
    engine.dispose()
    holder.close()


def test_latency_phase_skips_a_run_it_cannot_rebuild_and_says_why(uri):
    """A FINISHED run without its pruned checkpoint (an older release, a hand-made run) must not end the launch's
    measurement phase; it is marked, so the next launch does not try again."""
    from sweep.worker import latency

    run = TrialRun.create(uri, EXPERIMENT, None, {**TRIAL, "measure": {**TRIAL["measure"], "threads": 1}})
    run.finish()
    assert latency.runs_to_measure(uri, EXPERIMENT) == [run.run_id]
    assert latency.measure_runs(uri, [run.run_id]) == 1
    tags = MlflowClient(uri).get_run(run.run_id).data.tags
    assert tags["latency.device"] == "not measured" and "pruned.pt" in tags["latency.skipped"]
    assert latency.runs_to_measure(uri, EXPERIMENT) == []
