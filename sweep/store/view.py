"""The MLflow UI, opened on what a sweep is for: its trials side by side (`mark_experiment` gives an experiment its
kind and a saved comparison view, `view_url` links to it). Why each piece, and what a saved view cannot do:
docs/design.md, "The MLflow UI"."""

from __future__ import annotations

import json
import shlex
import time
from urllib.parse import quote, urlencode

from sweep.store.client import is_server, resolve_tracking_uri
from sweep.store.store import Store

KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # the UI's value for training runs (others: genai_development, ...)
VIEW_KEY = "sweep-compare"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY
VIEW_NAME = "sweep: compare trials"
VIEW_VERSION = "3"  # bump when the view below changes: experiments marked before get the new one
VERSION_TAG = "sweep.view_version"

DEFAULT_SERVER = "http://127.0.0.1:5000"
# Only current trial runs: each carries tag config_hash (tracking.TrialRun), a parent never does; a run that a forced
# rerun of its config replaced carries SUPERSEDED_TAG (tracking.supersede_earlier).
SUPERSEDED_TAG = "sweep.superseded_by"
TRIAL_FILTER = f"tags.config_hash LIKE '%' and tags.`{SUPERSEDED_TAG}` IS NULL"
# The table reads left to right as a comparison does: the results, then what was compared (strategy, ratio, seed),
# then the settings that are usually the same for every trial.
METRIC_COLUMNS = ["val_accuracy", "test_accuracy", "flops_reduction", "params", "latency_ms", "train_time_s"]
PARAM_COLUMNS = ["strategy", "ratio", "seed", "scope", "target", "schedule", "model", "dataset"]
SCATTERS = [("flops_reduction", "val_accuracy"), ("flops_reduction", "test_accuracy")]
RUN_NAME_COLUMN = "attributes.`Run Name`"  # its column id in the runs table
# One colour per strategy, the same in every sweep, on every chart: a trial run carries its strategy's colour in
# the tag the UI reads for a run's colour (it otherwise hashes the run id: one colour per trial).
COLOR_TAG = "mlflow.runColor"
STRATEGY_COLORS = {"random": "#7f7f7f", "l1": "#1f77b4", "l2": "#17becf", "bn_scale": "#2ca02c", "taylor": "#d62728",
                   "apoz": "#9467bd", "fpgm": "#ff7f0e", "oracle": "#8c564b", "none": "#000000"}
OTHER_COLOR = "#e377c2"


def run_color(strategy: str | None) -> str:
    """The colour a trial of this strategy has in the UI's table and charts."""
    return STRATEGY_COLORS.get(str(strategy), OTHER_COLOR)


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # the UI's canonical column key


def view_state() -> dict:
    """The runs-page state of the saved view: search facets plus the table and chart layout."""
    section = "sweep-section"
    charts = [{
        "uuid": f"sweep-scatter-{x}-{y}", "type": "SCATTER", "runsCountToCompare": 1000, "metricSectionId": section,
        "deleted": False, "isGenerated": False, "displayName": f"{y} vs {x}",
        "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"},
    } for x, y in SCATTERS]
    columns = [_column("metrics", m) for m in METRIC_COLUMNS] + [_column("params", p) for p in PARAM_COLUMNS]
    return {
        # search facets
        "searchFilter": TRIAL_FILTER,
        "orderByKey": _column("metrics", "val_accuracy"),
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        # layout
        "selectedColumns": columns,
        "columnOrder": [RUN_NAME_COLUMN, *columns],
        "columnWidths": {RUN_NAME_COLUMN: 300},  # the whole name: strategy-ratio-scope-target-schedule-model
        "runsHiddenMode": "SHOW_ALL",  # the charts' default shows only the first 10 rows
        "compareRunCharts": charts,
        # two charts a row, 460 px high (the UI's default: three of 360 px, unreadable beside the runs list)
        "compareRunSections": [{"uuid": section, "name": "Pruning trade-off", "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": False, "columns": 2, "cardHeight": 460}],
        "isAccordionReordered": True,  # keep our section first, above the generated per-metric ones
        "hideEmptyCharts": True,
        "viewMaximized": False,
        "runListHidden": False,
        # the table's rows grouped by strategy (a group row holds its trials' means); the charts keep one point per
        # trial, coloured by its strategy (COLOR_TAG), not one averaged point per strategy across ratios
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "strategy"}]},
        "groupsExpanded": {},  # every group open
        "useGroupedValuesInCharts": False,
    }


def experiment_tags() -> dict[str, str]:
    """Tags a sweep's experiment is created with: its kind, the saved comparison view and that view's version."""
    now = int(time.time() * 1000)
    view = json.dumps({"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(view_state())})
    return {KIND_TAG: KIND, VIEW_TAG: view, VERSION_TAG: VIEW_VERSION}


def mark_experiment(store: Store, experiment_id: str, tags: dict) -> None:
    """Set the experiment's kind and saved view where its `tags` lack them or hold an older view; writes nothing when
    both are current, so calling it on every get_or_create costs no database write."""
    for key, value in experiment_tags().items():
        # the view's value holds its time of writing: it is outdated when its version is
        if key not in tags or (tags.get(VERSION_TAG) != VIEW_VERSION if key == VIEW_TAG else tags[key] != value):
            store.set_experiment_tag(experiment_id, key, value)


def server_url(tracking_uri: str | None) -> str:
    """The web address of the UI for a store: the server itself, or where `mlflow ui` serves a database store."""
    uri = resolve_tracking_uri(tracking_uri)
    return uri.rstrip("/") if is_server(uri) else DEFAULT_SERVER


def ui_command(tracking_uri: str | None) -> str | None:
    """The command that serves the UI for a database store (loopback only); None for a tracking server."""
    uri = resolve_tracking_uri(tracking_uri)
    return None if is_server(uri) else f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port 5000"


def view_url(server: str | None, experiment_id: str, chart: bool = False) -> str:
    """URL of the saved comparison view (with chart=True, its chart of accuracy against FLOPs) on `server`: the UI's
    address or a tracking URI (a database URI maps to the `mlflow ui` default address)."""
    query = {"viewStateShareKey": VIEW_KEY, "workflowType": "machine_learning",
             **({"compareRunsMode": "CHART"} if chart else {})}
    return f"{server_url(server)}/#/experiments/{quote(str(experiment_id))}/runs?{urlencode(query)}"


def run_url(server: str | None, experiment_id: str, run_id: str) -> str:
    return (f"{server_url(server)}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}"
            f"?workflowType=machine_learning")


def how_to_open(tracking_uri: str | None, experiment_id: str) -> list[str]:
    """Lines to print after a sweep or a report: how to start the UI if needed, and the views to open."""
    command = ui_command(tracking_uri)
    return ([f"MLflow UI: {command}"] if command else []) + [
        f"  trials table: {view_url(tracking_uri, experiment_id)}",
        f"  trade-off chart: {view_url(tracking_uri, experiment_id, chart=True)}"]
