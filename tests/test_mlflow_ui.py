"""The MLflow UI opens on a sweep's comparison: experiment kind and saved view (sweep.store.view), and a real sweep
looked at in a real browser (headless Chromium against `mlflow server` on loopback), skipped where no browser exists.

SWEEP_SCREENSHOTS=DIR keeps the browser's screenshots there (how docs/*.png are made).
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from browser import find_chromium, mlflow_server, render, runs_table
from mlflow.tracking import MlflowClient

from sweep.config.spec import load_spec
from sweep.driver.launch import run_sweep
from sweep.pruning import STRATEGIES
from sweep.store import tracking
from sweep.store import view as mlflow_ui

pytestmark = pytest.mark.e2e  # starts Ray and runs real sweeps (`-m 'not e2e'` leaves them out)


def test_new_experiment_has_kind_and_saved_view(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "ui_new")
    tags = client.get_experiment(experiment_id).tags
    assert tags[mlflow_ui.KIND_TAG] == "custom_model_development"
    envelope = json.loads(tags[mlflow_ui.VIEW_TAG])  # the envelope the UI's saved views use
    assert envelope["name"] == mlflow_ui.VIEW_NAME and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["searchFilter"].startswith("tags.config_hash LIKE '%'")
    # the results first, then what was compared
    assert state["selectedColumns"][:3] == ["metrics.`val_accuracy`", "metrics.`test_accuracy`",
                                            "metrics.`flops_reduction`"]
    params = [c for c in state["selectedColumns"] if c.startswith("params.")]
    assert params[:3] == ["params.`strategy`", "params.`ratio`", "params.`seed`"]
    assert state["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "strategy"}]
    assert state["useGroupedValuesInCharts"] is False  # a point per trial, not a mean across ratios
    [section] = state["compareRunSections"]
    assert section["columns"] == 2 and section["cardHeight"] > 360
    [chart, *_] = state["compareRunCharts"]
    assert chart["type"] == "SCATTER" and chart["xaxis"]["key"] == "flops_reduction"
    assert len(tags[mlflow_ui.VIEW_TAG]) < 20_000  # MLflow's limit on an experiment tag value


def test_the_view_filter_selects_trials_not_parents(sqlite_uri):
    parent = tracking.start_parent_run(sqlite_uri, "ui_filter", "name: ui_filter\n")
    config = {"model": {"name": "small_cnn"}, "prune": {"strategy": "l1", "ratio": 0.5}, "seed": 0}
    child = tracking.TrialRun.create(sqlite_uri, "ui_filter", parent, config)
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.find_experiment_id(client, "ui_filter")
    found = client.search_runs([experiment_id], mlflow_ui.TRIAL_FILTER)
    assert [r.info.run_id for r in found] == [child.run_id]
    assert found[0].data.tags[mlflow_ui.COLOR_TAG] == mlflow_ui.run_color("l1")  # the UI colours it by strategy


def test_every_strategy_has_its_own_colour():
    colours = [mlflow_ui.run_color(s) for s in STRATEGIES]
    assert len(set(colours)) == len(colours) and mlflow_ui.OTHER_COLOR not in colours


def test_an_older_experiment_is_marked_once(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment_id = client.create_experiment("ui_old")  # as a release before this one made it: no tags
    assert tracking.get_or_create_experiment(client, "ui_old") == experiment_id
    tags = client.get_experiment(experiment_id).tags
    assert tags[mlflow_ui.KIND_TAG] == mlflow_ui.KIND and mlflow_ui.VIEW_TAG in tags
    db = Path(sqlite_uri.removeprefix("sqlite:///"))
    before = db.stat().st_mtime_ns, db.read_bytes()
    time.sleep(0.01)
    tracking.get_or_create_experiment(client, "ui_old")  # current tags: nothing is written
    assert (db.stat().st_mtime_ns, db.read_bytes()) == before


def test_urls():
    assert mlflow_ui.view_url("http://10.0.0.5:5000/", "7") == (
        "http://10.0.0.5:5000/#/experiments/7/runs?viewStateShareKey=sweep-compare&workflowType=machine_learning")
    assert mlflow_ui.view_url("sqlite:///x/mlflow.db", "7", chart=True).startswith(
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=sweep-compare&")
    assert mlflow_ui.view_url("sqlite:///x/mlflow.db", "7", chart=True).endswith("&compareRunsMode=CHART")
    lines = mlflow_ui.how_to_open("sqlite:////x/mlflow.db", "7")
    assert lines[0] == "MLflow UI: mlflow ui --backend-store-uri sqlite:////x/mlflow.db --host 127.0.0.1 --port 5000"
    assert "'sqlite:////a b/mlflow.db'" in mlflow_ui.ui_command("sqlite:////a b/mlflow.db")  # quoted for a shell
    assert mlflow_ui.ui_command("http://10.0.0.5:5000") is None
    assert mlflow_ui.run_url("http://h:1", "7", "abc") == "http://h:1/#/experiments/7/runs/abc?workflowType=machine_learning"


SPACE = """
name: ui_sweep
dataset: {name: digits, limit: 120}
model: {name: small_cnn}
base: {epochs: 1, batch_size: 32}
finetune: {epochs: 1, batch_size: 32}
measure: {batch_size: 1, warmup: 1, runs: 2}
space:
  strategy: {grid: [l1, random]}
  ratio: {grid: [0.3, 0.6]}
"""
SIZE = (1600, 1000)  # a laptop's browser window: what the view must read well in


@pytest.fixture(scope="module")
def swept(tmp_path_factory, template_db):
    """A real sweep of 4 trials in a fresh sqlite store."""
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium chromium-driver; .ci/run does): "
                    "the browser test needs a real browser")
    root = tmp_path_factory.mktemp("ui")
    (root / "space.yaml").write_text(SPACE, encoding="utf-8")
    shutil.copy(template_db, root / "mlflow.db")  # an empty store, schema made once per session
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # run_sweep stops the Ray it starts, and leaves one that was already running (the session's) alone
    outcome = run_sweep(load_spec(root / "space.yaml"), tracking_uri=uri, storage=str(root / "results"), verbose=0)
    assert not outcome.failed
    return root, uri


def _render(url: str, png: Path, **options) -> str:
    dom = render(url, png, **options)
    png.with_suffix(".html").write_text(dom, encoding="utf-8")  # beside the screenshot: what a failure is read from
    return dom


def _hex(rgb: str) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in re.findall(r"\d+", rgb)[:3])


def test_the_browser_shows_the_comparison(swept, one_thread):
    root, uri = swept
    keep = Path(os.environ["SWEEP_SCREENSHOTS"]) if os.environ.get("SWEEP_SCREENSHOTS") else root / "shots"
    keep.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment_id = tracking.find_experiment_id(client, "ui_sweep")
    trials = {r.info.run_id: r for r in tracking.child_runs(client, "ui_sweep")}
    assert len(trials) == 4
    with mlflow_server(uri, root / "artifacts") as server:
        # the runs table of the printed view: grouped by strategy, one row per trial inside, no parent; the results'
        # columns first, then strategy, ratio and seed
        dom = _render(mlflow_ui.view_url(server, experiment_id), keep / "mlflow_runs_table.png", size=SIZE)
        metrics = ["metrics.`val_accuracy`", "metrics.`test_accuracy`", "metrics.`flops_reduction`"]
        _, headers = runs_table(dom)  # the grid draws only the columns on screen
        assert [h for h in headers if h.startswith(("metrics.", "params."))][:3] == metrics, headers
        # wider, for every column to be drawn: strategy, ratio and seed come right after the results
        rows, headers = runs_table(render(mlflow_ui.view_url(server, experiment_id), size=(3000, 1000)))
        runs = {row_id.rpartition(".")[2]: row for row_id, row in rows.items() if row_id.rpartition(".")[2] in trials}
        groups = {row_id for row_id in rows if row_id.rpartition(".")[2] not in trials}
        assert set(runs) == set(trials), (sorted(rows), sorted(trials))
        assert groups == {"param.strategy.l1", "param.strategy.random"}, sorted(rows)
        swept_params = ["params.`strategy`", "params.`ratio`", "params.`seed`"]
        params = [h for h in headers if h.startswith("params.")]
        assert params[:3] == swept_params and headers.index(params[0]) > headers.index(metrics[-1]), headers
        assert {row["params.`strategy`"] for row in runs.values()} == {"l1", "random"}
        assert {row["params.`ratio`"] for row in runs.values()} == {"0.3", "0.6"}
        for run_id, row in runs.items():
            recorded = trials[run_id].data.metrics["flops_reduction"]
            assert abs(float(row["metrics.`flops_reduction`"]) - recorded) < 1e-6
        for group in groups:  # sorted by validation accuracy, best first, inside each group
            accuracies = [float(row["metrics.`val_accuracy`"]) for row_id, row in rows.items()
                          if row_id.startswith(group + ".")]
            assert accuracies == sorted(accuracies, reverse=True) and len(accuracies) == 2
        assert "Evaluations" not in dom and "Training runs" in dom or "Runs" in dom

        # the chart view: two large scatters of accuracy against FLOPs reduction, a point per trial, coloured by
        # strategy (tag mlflow.runColor), so two colours for the four trials
        dom = _render(mlflow_ui.view_url(server, experiment_id, chart=True), keep / "mlflow_chart.png", size=SIZE,
                     budget_ms=40_000)
        assert "Pruning trade-off" in dom and "flops_reduction" in dom
        assert "Model metrics (0)" not in dom
        plots = re.findall(r'<svg class="main-svg"[^>]*width="(\d+)" height="(\d+)"', dom)
        assert dom.count('class="scatterlayer') >= 2, "no scatter plot was drawn"
        assert max(int(h) for _, h in plots) >= 340, plots  # 460-px cards (the UI's default is 360 with a legend)
        colours = {_hex(c) for c in re.findall(r'class="point[ "][^>]*?fill: (rgb\([^)]*\))', dom)}
        assert colours == {mlflow_ui.run_color("l1"), mlflow_ui.run_color("random")}, colours

        # a child run's page says Runs, not Evaluations
        best = max(trials, key=lambda r: trials[r].data.metrics["val_accuracy"])
        dom = render(mlflow_ui.run_url(server, experiment_id, best), keep / "mlflow_child_run.png", size=SIZE)
        assert trials[best].data.tags["mlflow.runName"] in dom
        assert ">Evaluations<" not in dom

        # the experiment's own page (what the Experiments list opens), in the Model training workflow
        dom = render(f"{server}/#/experiments/{experiment_id}?workflowType=machine_learning",
                     keep / "mlflow_experiment.png", size=SIZE)
        assert ">Overview<" not in dom or "Runs" in dom
