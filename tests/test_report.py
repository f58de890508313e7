"""sweep.report on a real MLflow sqlite store filled through sweep.tracking."""

import shutil
import struct
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sweep import report, tracking
from sweep.tracking import TrialRun

EXPERIMENT = "report-test"
STRATEGIES = ["random", "l1", "taylor", "fpgm"]
RATIOS = [0.3, 0.5, 0.7]
QUALITY = {"random": 0.30, "l1": 0.15, "taylor": 0.08, "fpgm": 0.12}  # accuracy lost per unit ratio^2
BASE = {"accuracy": 0.95, "flops": 2.0e8, "params": 1.1e6, "latency_ms": 4.0}


def trial(strategy: str, ratio: float, model: str = "resnet20", seed: int = 0) -> dict:
    return {
        "name": EXPERIMENT,
        "seed": seed,
        "model": {"name": model, "weights": None},
        "dataset": {"name": "cifar10", "root": None},
        "prune": {"strategy": strategy, "ratio": ratio, "scope": "local", "target": "channels", "schedule": "oneshot",
                  "steps": 1},
        "finetune": {"epochs": 3, "lr": 0.01},
        "fault": {"fail_at_epoch": None},
    }


def metrics(strategy: str, ratio: float, shift: float = 0.0) -> dict[str, float]:
    """What a trial reports: accuracy falls with the ratio, FLOPs fall roughly with the square of the kept width."""
    accuracy = BASE["accuracy"] - QUALITY[strategy] * ratio**2 + shift
    flops_kept = (1 - ratio) ** 2 * (1.05 if strategy == "random" else 1.0)
    latency = BASE["latency_ms"] * (0.4 + 0.6 * flops_kept)
    return {
        "base_accuracy": BASE["accuracy"],
        "accuracy": accuracy,
        "accuracy_drop": BASE["accuracy"] - accuracy,
        "flops": BASE["flops"] * flops_kept,
        "base_flops": BASE["flops"],
        "flops_reduction": 1 - flops_kept,
        "params": BASE["params"] * flops_kept,
        "params_reduction": 1 - flops_kept,
        "size_mb": 4 * BASE["params"] * flops_kept / 1e6,
        "latency_ms": latency,
        "speedup": BASE["latency_ms"] / latency,
        "train_time_s": 30 + 10 * ratio + STRATEGIES.index(strategy),
        "prune_time_s": 0.5 + STRATEGIES.index(strategy),
    }


def log_trial(uri: str, parent: str, cfg: dict, values: dict, status: str = "FINISHED") -> str:
    run = TrialRun.open(uri, EXPERIMENT, parent, cfg)
    for epoch in range(3):
        val_accuracy = values["accuracy"] - 0.01 * (2 - epoch)
        run.log_metrics({"train_loss": 1 / (epoch + 1), "val_accuracy": val_accuracy}, step=epoch)
    run.log_metrics(values)
    if status != "RUNNING":
        run.finish(status)
    return run.run_id


@pytest.fixture
def store(sqlite_uri):
    """4 strategies x 3 ratios under one parent run; returns (uri, parent run id, {run_id: logged metrics})."""
    uri = sqlite_uri
    parent = tracking.start_parent_run(uri, EXPERIMENT, "space:\n  strategy: {grid: [random, l1, taylor, fpgm]}\n")
    MlflowClient(uri).log_metric(parent, "accuracy", 0.99)  # a parent with a metric must still not count as a trial
    logged = {}
    for strategy in STRATEGIES:
        for ratio in RATIOS:
            values = metrics(strategy, ratio)
            logged[log_trial(uri, parent, trial(strategy, ratio), values)] = values
    tracking.end_run(uri, parent)
    return uri, parent, logged


def test_load_runs_one_row_per_trial(store):
    uri, parent, logged = store
    df = report.load_runs(EXPERIMENT, uri)
    assert list(df.columns) == report.COLUMNS
    assert len(df) == 12 and set(df["run_id"]) == set(logged) and parent not in set(df["run_id"])
    for column in ["ratio", *report.METRIC_COLUMNS]:
        assert df[column].dtype == np.float64, column
    assert (df["status"] == "FINISHED").all()
    assert (df["model"] == "resnet20").all() and (df["dataset"] == "cifar10").all()
    for row in df.itertuples():
        values = logged[row.run_id]
        for name in report.METRIC_COLUMNS:
            assert getattr(row, name) == pytest.approx(values[name]), name
    assert list(df["strategy"]) == sorted(df["strategy"])
    assert list(df[df["strategy"] == "l1"]["ratio"]) == RATIOS
    # accuracy falls with the ratio for every strategy, as logged
    assert (df.groupby("strategy")["accuracy"].apply(lambda s: s.is_monotonic_decreasing)).all()
    assert report.load_runs(EXPERIMENT, uri, parent_run_id=parent).equals(df)
    assert report.load_runs(EXPERIMENT, uri, parent_run_id="0" * 32).empty
    with pytest.raises(ValueError, match="status 'DONE' is invalid"):
        report.load_runs(EXPERIMENT, uri, status="DONE")


def test_unfinished_runs_and_reruns(store):
    uri, parent, logged = store
    failed = log_trial(uri, parent, trial("l2", 0.5), metrics("l1", 0.5), status="FAILED")
    running = log_trial(uri, parent, trial("l2", 0.7), metrics("l1", 0.7), status="RUNNING")
    time.sleep(0.01)  # the re-run must start at a later millisecond
    rerun = log_trial(uri, parent, trial("taylor", 0.5), metrics("taylor", 0.5, shift=0.01))

    df = report.load_runs(EXPERIMENT, uri)
    assert len(df) == 12 and failed not in set(df["run_id"]) and running not in set(df["run_id"])
    row = df[(df["strategy"] == "taylor") & (df["ratio"] == 0.5)]
    assert list(row["run_id"]) == [rerun]  # the newest of the two finished runs of this config
    assert row["accuracy"].iloc[0] == pytest.approx(metrics("taylor", 0.5)["accuracy"] + 0.01)

    everything = report.load_runs(EXPERIMENT, uri, status=None)
    assert {failed, running} <= set(everything["run_id"]) and len(everything) == 14
    assert set(everything["status"]) == {"FINISHED", "FAILED", "RUNNING"}


def test_pareto_front_matches_hand_computed():
    points = {  # name: (flops_reduction, accuracy, on the front?)
        "a": (0.10, 0.90, True),
        "b": (0.30, 0.85, True),
        "c": (0.30, 0.80, False),  # b has the same FLOPs and more accuracy
        "d": (0.20, 0.85, False),  # b has the same accuracy and fewer FLOPs
        "e": (0.60, 0.70, True),
        "f": (0.60, 0.70, True),  # a tie with e: neither beats the other
        "g": (0.50, 0.60, False),  # e beats it on both
        "h": (np.nan, 0.99, False),  # unmeasured: never on the front, and beats nobody
        "i": (0.05, 0.95, True),
    }
    df = pd.DataFrame({"flops_reduction": [p[0] for p in points.values()], "accuracy": [p[1] for p in points.values()]},
                      index=list(points))  # fmt: skip
    mask = report.pareto_front(df)
    assert mask.dtype == bool and list(mask.index) == list(points)
    assert mask.to_dict() == {name: p[2] for name, p in points.items()}
    swapped = report.pareto_front(df.rename(columns={"flops_reduction": "speedup"}), x="speedup")
    assert swapped.equals(mask)


def test_summary_table_best_per_strategy_and_ratio(store):
    uri, parent, logged = store
    df = report.load_runs(EXPERIMENT, uri)
    table = report.summary_table(df)
    assert len(table) == 12 and (table["trials"] == 1).all()
    for ratio, sub in table.groupby("ratio"):
        assert list(sub["strategy"]) == ["taylor", "fpgm", "l1", "random"]  # best first, by the logged quality
        assert sub["accuracy"].is_monotonic_decreasing
    # Two seeds of one config: one row, the better run, with the mean fine-tune time.
    extra = df[(df["strategy"] == "l1") & (df["ratio"] == 0.3)].assign(run_id="x", accuracy=0.99, train_time_s=40.0)
    table = report.summary_table(pd.concat([df, extra], ignore_index=True))
    row = table[(table["strategy"] == "l1") & (table["ratio"] == 0.3)].iloc[0]
    assert row["trials"] == 2 and row["run_id"] == "x" and row["accuracy"] == 0.99
    assert row["train_time_s"] == pytest.approx((metrics("l1", 0.3)["train_time_s"] + 40.0) / 2)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_write_report_files_and_parent_artifacts(store, tmp_path):
    uri, first_parent, logged = store
    newest = tracking.start_parent_run(uri, EXPERIMENT, "relaunch: true\n")
    tracking.end_run(uri, newest)
    paths = report.write_report(EXPERIMENT, uri, out_dir=tmp_path / "reports")

    assert set(paths) == {"trials", "pareto", "levels", "train_time", "summary"}
    assert all(p.parent == tmp_path / "reports" / EXPERIMENT and p.stat().st_size > 0 for p in paths.values())
    for name in ("pareto", "levels", "train_time"):
        width, height = png_size(paths[name])
        assert width >= 600 and height >= 400

    df = report.load_runs(EXPERIMENT, uri)
    pd.testing.assert_frame_equal(pd.read_csv(paths["trials"]), df, check_dtype=False)

    summary = paths["summary"].read_text()
    assert summary.startswith(f"# Sweep `{EXPERIMENT}`") and "12 finished trials" in summary
    assert "| strategy | ratio 0.3 | ratio 0.5 | ratio 0.7 |" in summary
    best = df.loc[df["accuracy"].idxmax()]
    assert f"{100 * best['accuracy']:.1f}" in summary
    assert all(s in summary for s in STRATEGIES)

    client = MlflowClient(uri)
    logged_files = {a.path for a in client.list_artifacts(newest, "report")}
    assert logged_files == {f"report/{p.name}" for p in paths.values()}
    assert client.list_artifacts(first_parent, "report") == []  # only the newest launch gets the report
    pareto_copy = client.download_artifacts(newest, "report/pareto.png", str(tmp_path))
    assert open(pareto_copy, "rb").read() == paths["pareto"].read_bytes()


def test_write_report_without_trials_is_a_clear_error(tmp_path, template_db):
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="'nope' not found"):
        report.write_report("nope", uri, out_dir=tmp_path)
    parent = tracking.start_parent_run(uri, EXPERIMENT, "")
    log_trial(uri, parent, trial("l1", 0.5), metrics("l1", 0.5), status="FAILED")
    with pytest.raises(ValueError, match="no finished trials"):
        report.write_report(EXPERIMENT, uri, out_dir=tmp_path)


def test_plots_with_two_models_and_repeats(store, tmp_path):
    uri, parent, logged = store
    for seed in (1, 2):  # repeats with other seeds: error bars in the levels plot
        for strategy in STRATEGIES:
            log_trial(uri, parent, trial(strategy, 0.5, seed=seed), metrics(strategy, 0.5, shift=0.004 * seed))
    for strategy in ("l1", "fpgm"):
        for ratio in RATIOS:
            values = metrics(strategy, ratio, shift=-0.05)
            if (strategy, ratio) == ("fpgm", 0.7):  # e.g. latency not measured: NaN in the table, a dash in summary.md
                del values["latency_ms"], values["speedup"]
            log_trial(uri, parent, trial(strategy, ratio, model="vgg11"), values)
    df = report.load_runs(EXPERIMENT, uri)
    assert len(df) == 12 + 8 + 6 and set(df["model"]) == {"resnet20", "vgg11"}
    assert df["latency_ms"].isna().sum() == 1
    summary = report.summary_markdown(EXPERIMENT, df)
    assert "## vgg11: best top-1 accuracy" in summary and "| – |" in summary and "nan" not in summary

    one_model = report.plot_levels(df[df["model"] == "vgg11"], tmp_path / "levels1.png")
    two_models = report.plot_levels(df, tmp_path / "levels2.png")
    assert png_size(two_models)[0] > 1.8 * png_size(one_model)[0]  # one panel per model
    assert png_size(report.plot_pareto(df, tmp_path / "pareto2.png"))[0] > 1.8 * png_size(one_model)[0]
    assert png_size(report.plot_train_time(df, tmp_path / "time.png"))[0] > 0
