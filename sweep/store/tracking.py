"""MLflow bookkeeping: one parent run per launch, one nested child run per trial. A function here that takes a
`Store` also takes a client or a URI."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from sweep.config.names import PARAMS, section_label
from sweep.store.client import resolve_tracking_uri, with_retry  # noqa: F401 -- re-exported
from sweep.store.store import Store, StoreLike
from sweep.store.view import COLOR_TAG, SUPERSEDED_TAG, experiment_tags, mark_experiment, run_color

log = logging.getLogger(__name__)
# Artifact downloads (latency phase, report) would draw a progress bar per file into the sweep's output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARENT_ROLE = "parent"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_CHARS = 500
STORE_LOCK_SECONDS = 300.0
FINISHED = "attributes.status = 'FINISHED'"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def store_exists(uri: str) -> bool:
    """Whether there is a store to read: a sqlite file that exists, or any server or database URI."""
    db = _sqlite_path(uri)
    return db is None or db.exists()


def init_store(uri: str) -> None:
    """Create the database and its schema now, in the driver: parallel first use by trial workers races, and so do
    two launches on one fresh sqlite file (alembic: "expected to match one row when updating ... in
    'alembic_version'"), hence a file lock beside the database. A server created its schema itself."""
    db = _sqlite_path(uri)
    with contextlib.ExitStack() as stack:
        if db is not None and db.parent.is_dir():
            try:
                stack.enter_context(FileLock(f"{db}.lock", timeout=STORE_LOCK_SECONDS))
            except (Timeout, OSError) as error:  # a read-only folder (the store exists) or a stuck lock holder
                log.warning("could not lock %s.lock (%s); opening the store without it", db, error)
        Store(uri).search_experiments(max_results=1)  # creates a fresh database's schema; a missing folder fails here


def config_hash(trial_config: dict) -> str:
    """Identity of a trial: sha256 (first 16 hex chars) of its canonical JSON."""
    text = json.dumps(trial_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _param_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        value = json.dumps(value, default=str)
    return str(value)[:MAX_PARAM_CHARS]


def hash_filter(chash: str) -> str:
    """The search filter for one config's runs; the hash is checked first, as it goes into the filter's text."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", chash):
        raise ValueError(f"config_hash {chash!r}: expected letters, digits, '_', '.', '-'")
    return f"tags.config_hash = '{chash}'"


def flat_params(trial_config: dict) -> dict[str, str]:
    """MLflow params: the user-facing names first, then every other setting as a dotted key (`finetune.lr`). A
    mapping inside a section (`prune.ratios`, `model.kwargs`) is one JSON value: its keys are the user's (module
    patterns such as `layer1.*.conv1`), which MLflow would refuse in a param name."""
    flat: dict[str, Any] = {}
    for key, value in trial_config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{leaf}": setting for leaf, setting in value.items() if setting != {}})  # {}: unset
        elif key != "name":  # not a param: "name" is the experiment (tag sweep.name)
            flat[key] = value
    params = {name: _param_value(flat.pop(dotted)) for name, dotted in PARAMS.items() if dotted in flat}
    for section in ("model", "dataset"):  # a plug-in is named by its factory path, not "None"
        if isinstance(trial_config.get(section), dict) and section in params:
            params[section] = _param_value(section_label(trial_config[section]))
    params.update({key: _param_value(value) for key, value in flat.items()})
    return params


@functools.lru_cache(maxsize=1)
def code_version() -> str | None:
    """Git commit of the checkout this package runs from, or None (installed copy, no git, no commit yet)."""
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:  # only a repository that tracks this package counts (a venv inside some other repo must not)
        tracked = subprocess.run([*git, "ls-files", "--error-unmatch", "__init__.py"], capture_output=True, timeout=10)
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (head.stdout.strip() or None) if tracked.returncode == head.returncode == 0 else None


def safe_name(name: str) -> str:
    """An experiment name usable as one directory name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "experiment"


def get_or_create_experiment(store: StoreLike, name: str) -> str:
    """Experiment id for `name`, creating it if needed (safe when several processes race to create it)."""
    store = Store.of(store)
    experiment = store.get_experiment_by_name(name)
    if experiment is None:
        # A sqlite store keeps its artifacts beside the .db file, not in whatever cwd created the experiment; a server
        # or database store decides its own artifact root.
        db = _sqlite_path(store.tracking_uri)
        location = None if db is None else (db.parent / "mlruns" / safe_name(name)).as_uri()
        try:  # the UI opens on the trials: experiment kind and a saved comparison view (sweep.store.view)
            return store.create_experiment(name, location, experiment_tags())
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = store.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow experiment {name!r} is deleted: restore it (MlflowClient().restore_experiment"
                         f"({experiment.experiment_id!r})) or choose another sweep name")
    mark_experiment(store, experiment.experiment_id, experiment.tags)  # an older experiment: writes what it lacks
    return experiment.experiment_id


def find_experiment_id(store: StoreLike, name: str) -> str | None:
    return Store.of(store).experiment_id(name)


def all_runs(store: StoreLike, experiment_id: str, filter_string: str = "", max_results: int | None = None
             ) -> list[Run]:
    """Store.runs, for callers that hold a client."""
    return Store.of(store).runs(experiment_id, filter_string, max_results)


def _base_tags() -> dict[str, str]:
    commit = code_version()
    return {"git_commit": commit} if commit else {}


def start_parent_run(store: StoreLike, experiment: str, spec_text: str, tags: dict | None = None) -> str:
    """Open the launch's parent run (tag sweep.role=parent, artifact spec.yaml) and return its id."""
    store = Store.of(store)
    experiment_id = get_or_create_experiment(store, experiment)
    run_tags = {**_base_tags(), "sweep.name": experiment, "sweep.role": PARENT_ROLE,
                **{key: str(value) for key, value in (tags or {}).items()}}
    run_id = store.create_run(experiment_id, run_tags, f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}").info.run_id
    store.log_batch(run_id, params=[Param("sweep.name", experiment)])
    store.log_text(run_id, spec_text, "spec.yaml")
    return run_id


def end_run(store: StoreLike, run_id: str, status: str = "FINISHED") -> None:
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"run status {status!r} is invalid: use one of {', '.join(TERMINAL_STATUSES)}")
    Store.of(store).set_terminated(run_id, status)


def child_runs(store: StoreLike, experiment: str, filter_string: str = "") -> list[Run]:
    """Trial runs (not parents) of an experiment matching filter_string, newest first; [] if it does not exist."""
    store = Store.of(store)
    runs = store.runs(store.experiment_id(experiment), filter_string)
    return [r for r in runs if r.data.tags.get("sweep.role") != PARENT_ROLE and "config_hash" in r.data.tags]


def running_parents(store: StoreLike, experiment_id: str) -> list[Run]:
    """Parent runs of launches that are (or were, until their lease lapses) running, newest first."""
    return all_runs(store, experiment_id, f"attributes.status = 'RUNNING' and tags.`sweep.role` = '{PARENT_ROLE}'")


def newest_parent_run(store: StoreLike, experiment: str) -> str | None:
    """Run id of the latest launch's parent run, or None."""
    store = Store.of(store)
    parents = store.runs(store.experiment_id(experiment), f"tags.`sweep.role` = '{PARENT_ROLE}'", max_results=1)
    return parents[0].info.run_id if parents else None


# Up to this many configs, finished_trials asks for each config's runs (one query filtered on its tag, ~60 ms under
# load here whatever the store holds) instead of reading every FINISHED run of the experiment (~6 ms a run).
FINISHED_LOOKUP_MAX = 200


def finished_trials(store: StoreLike, experiment: str, hashes: list[str] | None = None) -> dict[str, str]:
    """config_hash -> run_id of the newest FINISHED child run per config: what a re-run can skip.

    With `hashes` (at most FINISHED_LOOKUP_MAX), only those configs are looked up, one filtered query each, so a
    small launch into an experiment of 10,000 runs does not read them all; otherwise (or without) one full scan."""
    store = Store.of(store)
    done: dict[str, str] = {}
    if hashes is not None and len(hashes) <= FINISHED_LOOKUP_MAX:
        experiment_id = store.experiment_id(experiment)
        for chash in dict.fromkeys(hashes) if experiment_id is not None else ():
            runs = store.runs(experiment_id, f"{hash_filter(chash)} and {FINISHED}", max_results=1)
            if runs:
                done[chash] = runs[0].info.run_id
        return done
    for run in child_runs(store, experiment, FINISHED):
        done.setdefault(run.data.tags["config_hash"], run.info.run_id)  # runs come newest first
    return done


def supersede_earlier(store: StoreLike, experiment: str, config_hash: str, run_id: str) -> list[str]:
    """A forced rerun of a config, once FINISHED, replaces the config's earlier FINISHED runs: each is tagged
    SUPERSEDED_TAG=<run_id> (kept, never deleted) and left out of reports, the saved UI view and registration.
    Returns the runs it tagged. Called only after run_id finished, so a failed rerun leaves the earlier run current."""
    store = Store.of(store)
    earlier = child_runs(store, experiment, f"{hash_filter(config_hash)} and {FINISHED} "
                                            f"and tags.`{SUPERSEDED_TAG}` IS NULL")
    replaced = [run.info.run_id for run in earlier if run.info.run_id != run_id]
    for old in replaced:
        store.set_tag(old, SUPERSEDED_TAG, run_id)
    return replaced


def current(runs: list[Run]) -> list[Run]:
    """The runs no forced rerun has replaced."""
    return [run for run in runs if SUPERSEDED_TAG not in run.data.tags]


def close_children(store: StoreLike, experiment: str, parent_run_id: str) -> None:
    """End KILLED the parent's child runs still RUNNING: stopped from outside (ASHA, Ctrl-C) when its launch ends."""
    store = Store.of(store)
    for run in child_runs(store, experiment,
                          f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{parent_run_id}'"):
        store.set_terminated(run.info.run_id, "KILLED")


def find_trial_run(store: StoreLike, experiment: str, config_hash: str, parent_run_id: str | None) -> str | None:
    """The newest unfinished child run of this parent for this config: a retried trial continues it."""
    return next((run.info.run_id for run in child_runs(store, experiment, hash_filter(config_hash))
                 if run.info.status != "FINISHED" and run.data.tags.get("mlflow.parentRunId") == parent_run_id), None)


def _run_name(trial_config: dict) -> str:
    prune = trial_config.get("prune", {})
    schedule = prune.get("schedule", "oneshot")
    if schedule == "iterative":
        schedule += str(prune.get("steps", ""))
    parts = [*map(prune.get, ("strategy", "ratio", "scope", "target")), schedule,
             section_label(trial_config.get("model", {}))]
    return "-".join(str(p) for p in parts if p is not None)


def recorded_result(store: StoreLike, experiment: str, config_hash: str, run_id: str | None = None,
                    rerun: bool = False) -> dict[str, float] | None:
    """The metrics of a FINISHED run that makes running this trial unnecessary, else None: run_id's (a trial restored
    from its checkpoint, whose driver may have died before Tune heard), else the config's newest unless rerun."""
    store = Store.of(store)
    if run_id is not None:
        run = store.get_run(run_id)
        return dict(run.data.metrics) if run.info.status == "FINISHED" else None
    if rerun:
        return None
    runs = child_runs(store, experiment, f"{hash_filter(config_hash)} and {FINISHED}")
    return dict(runs[0].data.metrics) if runs else None


class TrialRun:
    """One trial's MLflow child run (an analysis logs each layer's run through one too). `present`: the (metric,
    step) points it already holds when continued (a retry, a resume), so that `log_points` sends only what it lacks."""

    def __init__(self, store: StoreLike, run_id: str, present: set[tuple[str, int]] | None = None):
        self.store = Store.of(store)
        self.run_id = run_id
        self.present = present or set()

    @classmethod
    def create(cls, store: StoreLike, experiment: str, parent_run_id: str | None, trial_config: dict,
               tags: dict[str, str] | None = None) -> TrialRun:
        """A new child run of parent_run_id with the trial's tags (plus `tags`, such as a claim's) and params."""
        store = Store.of(store)
        run_tags = {
            **_base_tags(),
            "config_hash": config_hash(trial_config),
            "sweep.name": experiment,
            "mlflow.runName": _run_name(trial_config),
            COLOR_TAG: run_color(trial_config.get("prune", {}).get("strategy")),  # charts colour trials by strategy
            **(tags or {}),
            **({} if parent_run_id is None else {"mlflow.parentRunId": parent_run_id}),
        }
        experiment_id = get_or_create_experiment(store, experiment)
        trial_run = cls(store, store.create_run(experiment_id, run_tags, run_tags["mlflow.runName"]).info.run_id)
        trial_run.log_params(flat_params(trial_config))
        return trial_run

    @classmethod
    def resume(cls, store: StoreLike, run_id: str, trial_config: dict) -> TrialRun:
        """An existing run continued (a retry, a resume), knowing every point it already holds. It gets the params
        it lacks: a worker killed between creating the run and logging them (two requests) left it without."""
        store = Store.of(store)
        store.update_run(run_id, "RUNNING")
        run = store.get_run(run_id)
        trial_run = cls(store, run_id, {(key, m.step) for key in run.data.metrics
                                        for m in store.get_metric_history(run_id, key)})
        trial_run.log_params({k: v for k, v in flat_params(trial_config).items() if k not in run.data.params})
        return trial_run

    def log_params(self, params: dict[str, Any]) -> None:
        """As MLflow params (values cut to MAX_PARAM_CHARS), at most 100 in a request: MLflow's limit."""
        batch = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.store.log_batch(self.run_id, params=batch[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """One step's metrics, in one request."""
        self.log_points([(name, step, float(value)) for name, value in metrics.items()])

    def log_points(self, points: list[tuple[str, int, float]]) -> None:
        """(metric, step, value) points the run does not hold yet, in one request (one sqlite transaction)."""
        ts = int(time.time() * 1000)
        new = [(name, step, value) for name, step, value in points if (name, step) not in self.present]
        for i in range(0, len(new), 1000):  # MLflow's limit per batch
            batch = [Metric(name, value, ts, step) for name, step, value in new[i : i + 1000]]
            self.store.log_batch(self.run_id, metrics=batch)
        self.present.update((name, step) for name, step, _ in new)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.store.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.store.log_artifact(self.run_id, local_path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        end_run(self.store, self.run_id, status)
