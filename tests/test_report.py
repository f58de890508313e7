"""report.summary on a real MLflow sqlite store filled through store.tracking: groups, intervals, paired verdicts."""

import math
import shutil
import struct
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from sweep.report import summary as report
from sweep.store import tracking
from sweep.store.tracking import TrialRun

EXPERIMENT = "report-test"
STRATEGIES = ["random", "l1", "fpgm"]
RATIOS = [0.3, 0.6]
SEEDS = [0, 1, 2]
BASE = {"test": 0.95, "flops": 2.0e8, "params": 1.1e6}
# accuracy lost per unit ratio; seed noise is added on top. l1 and fpgm differ by less than the noise.
QUALITY = {"random": 0.40, "l1": 0.10, "fpgm": 0.11}
NOISE = {0: -0.01, 1: 0.0, 2: 0.012}


def trial(strategy: str, ratio: float, seed: int = 0, model: str = "resnet20", arm: str = "finetune",
          epochs: int = 3) -> dict:
    return {
        "name": EXPERIMENT, "seed": seed, "model": {"name": model, "weights": None},
        "dataset": {"name": "cifar10", "root": None},
        "prune": {"strategy": strategy, "ratio": ratio, "scope": "local", "target": "channels", "arm": arm},
        "finetune": {"epochs": epochs, "lr": 0.01},
    }


def values(strategy: str, ratio: float, seed: int = 0, shift: float = 0.0) -> dict[str, float]:
    accuracy = BASE["test"] - QUALITY[strategy] * ratio + NOISE[seed] + shift
    kept = (1 - ratio) ** 2
    return {
        "base_test_accuracy": BASE["test"], "test_accuracy": accuracy, "test_accuracy_drop": BASE["test"] - accuracy,
        "pruned_test_accuracy": accuracy - 0.3 * ratio, "flops": BASE["flops"] * kept, "macs": BASE["flops"] * kept / 2,
        "flops_reduction": 1 - kept, "params_reduction": 1 - kept, "channels_removed": ratio,
        "train_time_s": 30 + 10 * ratio + seed, "speedup": 1 / (0.4 + 0.6 * kept),
    }


def log_trial(uri: str, parent: str, cfg: dict, metrics: dict, status: str = "FINISHED") -> str:
    run = TrialRun.create(uri, EXPERIMENT, parent, cfg)
    run.log_points([("val_accuracy", epoch, metrics["test_accuracy"]) for epoch in (1, 2, 3)])
    run.log_points([(name, 0, value) for name, value in metrics.items()])
    if status != "RUNNING":
        run.finish(status)
    return run.run_id


@pytest.fixture
def store(sqlite_uri):
    """3 strategies x 2 ratios x 3 seeds under one parent run: (uri, parent run id, {run_id: logged metrics})."""
    uri = sqlite_uri
    parent = tracking.start_parent_run(uri, EXPERIMENT, "space: {}\n")
    MlflowClient(uri).log_metric(parent, "test_accuracy", 0.99)  # a parent with a metric is still not a trial
    logged = {}
    for strategy in STRATEGIES:
        for ratio in RATIOS:
            for seed in SEEDS:
                metrics = values(strategy, ratio, seed)
                logged[log_trial(uri, parent, trial(strategy, ratio, seed), metrics)] = metrics
    tracking.end_run(uri, parent)
    return uri, parent, logged


def test_load_runs_one_row_per_trial_with_every_param(store):
    uri, parent, logged = store
    df = report.load_runs(EXPERIMENT, uri)
    assert len(df) == 18 and set(df["run_id"]) == set(logged) and parent not in set(df["run_id"])
    assert {"strategy", "ratio", "seed", "arm", "finetune.epochs", "finetune.lr"} <= set(df.columns)
    assert df["ratio"].dtype == np.float64 and df["seed"].dtype == np.float64  # numeric params compare as numbers
    for row in df.itertuples():
        assert row.test_accuracy == pytest.approx(logged[row.run_id]["test_accuracy"])
    assert report.load_runs(EXPERIMENT, uri, parent_run_id="0" * 32).empty
    with pytest.raises(ValueError, match="status 'DONE' is invalid"):
        report.load_runs(EXPERIMENT, uri, status="DONE")


def test_groups_split_on_every_differing_setting_but_the_seed(store):
    uri, parent, _ = store
    log_trial(uri, parent, trial("l1", 0.3, 0, epochs=10), values("l1", 0.3, 0, shift=0.05))
    log_trial(uri, parent, trial("l1", 0.3, 0, arm="scratch"), values("l1", 0.3, 0, shift=0.02))
    df = report.load_runs(EXPERIMENT, uri)
    assert report.settings(df) == ["model", "strategy", "arm", "finetune.epochs", "ratio"]
    table = report.summary_table(df)
    assert len(table) == 6 + 2  # the other budget and the other arm are rows of their own, never merged
    assert sorted(table["n"]) == [1, 1] + [3] * 6


def test_a_data_folder_splits_groups_and_latency_timing_passes_pool(store):
    """Another dataset.root may hold other data, so it is a setting; runs that differ only in how many passes timed
    their latency pool, and a paired verdict then pairs one value per seed, not every run with every run."""
    uri, parent, _ = store
    for seed in SEEDS:
        cfg = {**trial("l1", 0.3, seed), "dataset": {"name": "cifar10", "root": "/data/other"}}
        log_trial(uri, parent, cfg, values("l1", 0.3, seed, shift=-0.2))
    log_trial(uri, parent, {**trial("random", 0.3, 0), "measure": {"runs": 100}}, values("random", 0.3, 0))
    df = report.load_runs(EXPERIMENT, uri)
    keys = report.settings(df)
    assert "dataset.root" in keys and "measure.runs" not in keys
    table = report.summary_table(df)
    other = table[table["dataset.root"] == "/data/other"]
    assert len(other) == 1 and int(other["n"].iloc[0]) == 3
    pairs = report.paired_table(df)
    here = pairs[(pairs["dataset.root"] != "/data/other") & (pairs["ratio"] == 0.3) & (pairs["strategy"] == "l1")]
    assert list(here["pairs"]) == [3]  # seeds 0, 1, 2: the two seed-0 random runs count once


def test_intervals_are_t_intervals_over_seeds(store):
    uri, _, logged = store
    table = report.summary_table(report.load_runs(EXPERIMENT, uri))
    row = table[(table["strategy"] == "l1") & (table["ratio"] == 0.6)].iloc[0]
    accuracies = np.array([values("l1", 0.6, s)["test_accuracy"] for s in SEEDS])
    half = stats.t.ppf(0.975, 2) * accuracies.std(ddof=1) / math.sqrt(3)
    assert row["n"] == 3
    assert row["test_accuracy"] == pytest.approx(accuracies.mean())
    assert row["test_accuracy_std"] == pytest.approx(accuracies.std(ddof=1))
    assert row["test_accuracy_ci95"] == pytest.approx(half)
    assert row["flops_reduction"] == pytest.approx(1 - 0.4**2) and row["channels_removed"] == pytest.approx(0.6)
    assert report.interval(pd.Series([0.5]))[2] != report.interval(pd.Series([0.5]))[2]  # n = 1: no interval (NaN)


def test_three_seeds_and_a_zero_variance_difference_give_no_verdict(store):
    """The old report called l1 "better" from a zero-width interval (the seed noise cancels in pairs) and a
    difference inside the noise "tied"; both are "inconclusive" now: could not tell."""
    uri, _, _ = store
    df = report.load_runs(EXPERIMENT, uri)
    pairs = report.paired_table(df, "random")
    assert set(pairs["strategy"]) == {"l1", "fpgm"} and (pairs["pairs"] == 3).all()
    l1 = pairs[(pairs["strategy"] == "l1") & (pairs["ratio"] == 0.6)].iloc[0]
    assert l1["difference"] == pytest.approx((QUALITY["random"] - QUALITY["l1"]) * 0.6)
    assert l1["verdict"] == "inconclusive" and "same difference at every seed" in l1["why"]
    assert math.isnan(l1["p"]) and math.isnan(l1["ci_low"])  # no t-test from zero variance
    # l1 against fpgm: 0.01 x ratio apart, well inside the seed noise once the seeds are shuffled
    shuffled = df.copy()
    fpgm = shuffled["strategy"] == "fpgm"
    shuffled.loc[fpgm, "test_accuracy"] += np.tile([0.02, -0.03, 0.015], 2)
    noisy = report.paired_table(shuffled, "l1")
    assert set(noisy[noisy["strategy"] == "fpgm"]["verdict"]) == {"inconclusive"}
    assert (noisy["p_sign_flip"] >= 0.25).all()  # three seeds: the sign-flip test cannot go lower
    lines = report.verdicts(pairs)
    assert lines[0] == "**ratio 0.3** (51 % FLOPs removed)" and "**ratio 0.6** (84 % FLOPs removed)" in lines
    assert any(line.startswith("- l1 vs random: **inconclusive**, +18.0 points at every seed, n 3;")
               for line in lines)


def test_unnamed_settings_never_print_as_nan_or_none(store):
    """Issue 28: a plug-in dataset's kwargs, absent from the other runs, printed `dataset.kwargs nan` in every
    verdict line and `None 3.0 nan 3000 2000` as a base's name. Only what has a value, and differs, is named."""
    uri, parent, _ = store
    for strategy in ("l1", "random"):
        for seed in SEEDS:
            cfg = {**trial(strategy, 0.3, seed), "dataset": {"factory": "mypkg.data:make", "kwargs": {"n": 3000}}}
            log_trial(uri, parent, cfg, {**values(strategy, 0.3, seed), "base_test_accuracy": 0.617})
    runs = report.load_runs(EXPERIMENT, uri)
    table = report.summary_table(runs)
    text = report.summary_markdown(EXPERIMENT, runs, table, report.paired_table(runs, "random"), "random")
    assert "nan" not in text and "None" not in text
    assert 'Unpruned bases, test accuracy: cifar10 95.0 %, dataset.factory mypkg.data:make dataset.kwargs {"n": ' \
           '3000} 61.7 %.' in text
    headings = [line for line in text.splitlines() if line.startswith("**")]
    assert "**dataset cifar10, ratio 0.3** (51 % FLOPs removed)" in headings
    assert '**dataset.factory mypkg.data:make, dataset.kwargs {"n": 3000}, ratio 0.3** (51 % FLOPs removed)' \
        in headings


def test_pruned_groups_against_the_unpruned_control_are_paired_by_seed(store):
    """Control runs (arm control: the base fine-tuned with the same recipe, strategy none, ratio 0) are no strategy
    in the family; each pruned group's difference from them is paired by seed over the settings they share."""
    uri, parent, _ = store
    control = {0: 0.93, 1: 0.96, 2: 0.94}
    for seed, accuracy in control.items():
        cfg = trial("none", 0.0, seed, arm="control")
        log_trial(uri, parent, cfg, {**values("random", 0.3, seed), "test_accuracy": accuracy, "flops_reduction": 0.0})
    runs = report.load_runs(EXPERIMENT, uri)
    pairs = report.paired_table(runs)
    assert "none" not in set(pairs["strategy"]) | set(pairs["reference"]) and len(pairs) == 6
    table = report.control_table(runs)
    assert len(table) == 6 and (table["pairs"] == 3).all()
    l1 = table[(table["strategy"] == "l1") & (table["ratio"] == 0.6)].iloc[0]
    diff = [values("l1", 0.6, s)["test_accuracy"] - control[s] for s in SEEDS]
    assert l1["difference"] == pytest.approx(np.mean(diff)) and l1["ci95"] == pytest.approx(
        report.interval(pd.Series(diff))[2])
    text = report.summary_markdown(EXPERIMENT, runs, report.summary_table(runs), pairs, None, control=table)
    section = text.split("## Against the unpruned control")[1]
    assert f"- strategy l1, ratio 0.6: {100 * l1['difference']:.1f} ± {100 * l1['ci95']:.1f} points (n 3)" in section


def test_unfinished_runs_and_reruns(store):
    uri, parent, _ = store
    failed = log_trial(uri, parent, trial("l1", 0.9), values("l1", 0.6), status="FAILED")
    running = log_trial(uri, parent, trial("l1", 0.8), values("l1", 0.6), status="RUNNING")
    time.sleep(0.01)  # the re-run must start at a later millisecond
    rerun = log_trial(uri, parent, trial("fpgm", 0.3, 1), values("fpgm", 0.3, 1, shift=0.01))
    df = report.load_runs(EXPERIMENT, uri)
    assert len(df) == 18 and not {failed, running} & set(df["run_id"])
    row = df[(df["strategy"] == "fpgm") & (df["ratio"] == 0.3) & (df["seed"] == 1)]
    assert list(row["run_id"]) == [rerun]  # the newest of the two finished runs of this config
    assert set(report.load_runs(EXPERIMENT, uri, status=None)["status"]) == {"FINISHED", "FAILED", "RUNNING"}


def test_runs_of_older_releases_load_through_the_legacy_names(sqlite_uri):
    parent = tracking.start_parent_run(sqlite_uri, EXPERIMENT, "")
    run = TrialRun.create(sqlite_uri, EXPERIMENT, parent, trial("l1", 0.5))
    run.log_points([("accuracy", 0, 0.81), ("base_accuracy", 0, 0.9), ("accuracy_drop", 0, 0.09)])
    run.finish()
    row = report.load_runs(EXPERIMENT, sqlite_uri).iloc[0]
    assert (row["test_accuracy"], row["base_test_accuracy"], row["test_accuracy_drop"]) == (0.81, 0.9, 0.09)


def test_a_run_without_its_settings_is_left_out_and_named(store, tmp_path, caplog):
    """A FINISHED trial run without params (say a worker of an older release killed between creating its run and
    logging them) cannot be put in a group: the report leaves it out and names it, and still writes every file."""
    uri, parent, _ = store
    client = MlflowClient(uri)
    bare = client.create_run(tracking.find_experiment_id(client, EXPERIMENT),
                             tags={"config_hash": "0" * 16, "mlflow.parentRunId": parent, "sweep.name": EXPERIMENT})
    TrialRun(client, bare.info.run_id).log_points([(k, 0, v) for k, v in values("l1", 0.3).items()])
    client.set_terminated(bare.info.run_id, "FINISHED")
    with caplog.at_level("WARNING", logger="sweep.report.summary"):
        df = report.load_runs(EXPERIMENT, uri)
        paths = report.write_report(EXPERIMENT, uri, out_dir=tmp_path)
    assert len(df) == 18 and bare.info.run_id not in set(df["run_id"])
    assert any(bare.info.run_id in r.getMessage() and "no model or strategy param" in r.getMessage()
               for r in caplog.records)
    assert "18 finished trials in 6 groups" in paths["summary"].read_text()


def test_pareto_front_matches_hand_computed():
    points = {  # name: (flops_reduction, accuracy, on the front?)
        "a": (0.10, 0.90, True), "b": (0.30, 0.85, True), "c": (0.30, 0.80, False), "d": (0.20, 0.85, False),
        "e": (0.60, 0.70, True), "f": (0.60, 0.70, True), "g": (0.50, 0.60, False), "h": (np.nan, 0.99, False),
        "i": (0.05, 0.95, True),
    }
    df = pd.DataFrame({"flops_reduction": [p[0] for p in points.values()],
                       "test_accuracy": [p[1] for p in points.values()]}, index=list(points))
    assert report.pareto_front(df).to_dict() == {name: p[2] for name, p in points.items()}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_write_report_files_and_parent_artifacts(store, tmp_path):
    uri, first_parent, _ = store
    newest = tracking.start_parent_run(uri, EXPERIMENT, "relaunch: true\n")
    tracking.end_run(uri, newest)
    paths = report.write_report(EXPERIMENT, uri, out_dir=tmp_path / "reports")
    assert set(paths) == {"runs", "summary_csv", "paired", "summary", "pareto", "levels", "finetune", "train_time"}
    for name in ("pareto", "levels", "finetune", "train_time"):
        width, height = png_size(paths[name])
        assert width >= 600 and height >= 400
    table = pd.read_csv(paths["summary_csv"])
    assert len(table) == 6 and (table["n"] == 3).all()
    summary = paths["summary"].read_text()
    assert summary.startswith(f"# Sweep `{EXPERIMENT}`") and "18 finished trials in 6 groups" in summary
    assert "groups differ in: strategy, ratio." in summary
    assert "## Verdicts: Holm over 6 comparisons, alpha 0.05, margin 1.0 points" in summary  # all pairs
    l1 = table[(table["strategy"] == "l1") & (table["ratio"] == 0.6)].iloc[0]
    assert f"{100 * l1['test_accuracy']:.1f} ± {100 * l1['test_accuracy_ci95']:.1f}" in summary
    client = MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(newest, "report")} == {f"report/{p.name}" for p in paths.values()}
    assert client.list_artifacts(first_parent, "report") == []  # only the newest launch gets the report


def test_write_report_without_trials_is_a_clear_error(tmp_path, template_db):
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(report.ReportError, match="'nope' not found"):
        report.write_report("nope", uri, out_dir=tmp_path)
    parent = tracking.start_parent_run(uri, EXPERIMENT, "")
    log_trial(uri, parent, trial("l1", 0.5), values("l1", 0.5), status="FAILED")
    with pytest.raises(report.ReportError, match="no finished trials"):
        report.write_report(EXPERIMENT, uri, out_dir=tmp_path)


def test_plots_with_two_models(store, tmp_path):
    uri, parent, _ = store
    for strategy in ("l1", "fpgm"):
        for ratio in RATIOS:
            log_trial(uri, parent, trial(strategy, ratio, model="vgg11"), values(strategy, ratio, shift=-0.05))
    runs = report.load_runs(EXPERIMENT, uri)
    table = report.summary_table(runs)
    one = report.plot_accuracy(runs, table[table["model"] == "vgg11"], tmp_path / "one.png", "levels")
    two = report.plot_accuracy(runs, table, tmp_path / "two.png", "levels")
    assert png_size(two)[0] > 1.8 * png_size(one)[0]  # one panel per model: accuracies do not share a scale
    assert "nan" not in report.summary_markdown(EXPERIMENT, runs, table, report.paired_table(runs), "random")


def test_one_model_on_two_datasets_gets_a_panel_and_a_base_each(store, tmp_path):
    """A model on two tasks: two bases, two scales of accuracy, two Pareto fronts; never one mean or one front."""
    uri, parent, _ = store
    for strategy in ("l1", "random"):
        for ratio in RATIOS:
            cfg = {**trial(strategy, ratio), "dataset": {"name": "cifar100", "root": None}}
            log_trial(uri, parent, cfg, {**values(strategy, ratio, shift=-0.3), "base_test_accuracy": 0.7})
    runs = report.load_runs(EXPERIMENT, uri)
    table = report.summary_table(runs)
    two = report.plot_accuracy(runs, table, tmp_path / "two.png", "pareto")
    one = report.plot_accuracy(runs, table[table["dataset"] == "cifar10"], tmp_path / "one.png", "pareto")
    assert png_size(two)[0] > 1.8 * png_size(one)[0]
    text = report.summary_markdown(EXPERIMENT, runs, table, pd.DataFrame(), "random")
    assert f"Unpruned bases, test accuracy: cifar10 {100 * BASE['test']:.1f} %, cifar100 70.0 %." in text


def test_summary_names_one_base_per_model(store):
    """Two architectures have two unpruned bases: the summary gives each, never one mean of both."""
    uri, parent, _ = store
    for ratio in RATIOS:
        log_trial(uri, parent, trial("l1", ratio, model="vgg11"), {**values("l1", ratio), "base_test_accuracy": 0.5})
    runs = report.load_runs(EXPERIMENT, uri)
    text = report.summary_markdown(EXPERIMENT, runs, report.summary_table(runs), pd.DataFrame(), "random")
    assert f"Unpruned bases, test accuracy: resnet20 {100 * BASE['test']:.1f} %, vgg11 50.0 %." in text
