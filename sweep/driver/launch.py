"""A validated spec -> a Ray Tune run (search algorithm, scheduler, resources, storage, resume) under one MLflow parent
run: `run_sweep(load_spec("search_spaces/quickstart.yaml"))`, a local Ray on loopback, or `address="auto"`.

Grid sweeps are incremental: grid points whose config (tracking.config_hash) already has a FINISHED run are left out
before Tune starts. Random and optuna sweeps cannot be enumerated up front; there the trial returns the recorded result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
import yaml
from mlflow.exceptions import MlflowException
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from sweep.config.names import PARAMS, section_label
from sweep.config.spec import SpecError, SweepSpec
from sweep.driver import session
from sweep.driver.preflight import check_writable, preflight
from sweep.driver.progress import CompactProgress
from sweep.errors import InputError
from sweep.report import summary as report
from sweep.store import claims, objects, tracking
from sweep.store.client import ServerWatch, check_tracking_server, down_for, resolve_tracking_uri
from sweep.store.store import Store
from sweep.worker import latency, raycompat, shared_data
from sweep.worker.trial import EpochHook, SweepContext, run_trial, sweep_trial

# What Tune holds of a trial's end (never a test metric: those are in MLflow and the report).
_SUMMARY_METRICS = ["val_accuracy", "pruned_val_accuracy", "flops_reduction", "params_reduction", "channels_removed"]
# Tune's output settings during a fit. The new output engine ignores our CLIReporter, and its own columns would show
# the whole nested trial dict instead of strategy, ratio and model. num_to_keep forces an experiment snapshot every
# num_to_keep checkpoints of a trial, by design here (one checkpoint per epoch), so Tune's warning about it is noise.
_TUNE_OUTPUT = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@dataclasses.dataclass
class SweepOutcome:
    experiment: str
    parent_run_id: str | None   # None when there was nothing to run: no parent run is created for an empty launch
    ran: int                    # trials that ran to their end (finished, failed or stopped early)
    skipped: int                # trials whose config already had a FINISHED run
    failed: int                 # trials that errored after all their retries
    results: pd.DataFrame | None  # one row per Tune trial of this launch (see summary_frame), None if none ran
    storage: str                # this launch's Tune experiment directory (what `--resume` restores)
    interrupted: int = 0        # trials left unfinished by an interrupted fit (Ctrl-C): `--resume` continues them
    held: int = 0               # trials another live launch was running (its claim held): not run twice


# --- the Tune run --------------------------------------------------------------------------------------


def _progress_reporter(spec: SweepSpec, verbose: int, uri: str) -> Any:
    """One compact line (sweep.driver.progress); with --verbose, Tune's table of every trial."""
    # Shown under their shorthand names (prune.ratio -> ratio, model.name -> model); anything else swept by its path.
    short = {path: name for name, path in PARAMS.items()}
    swept = [f"{p}.name" if p in ("model", "dataset") else p for p in spec.space]  # a swept section: its name
    shown = list(dict.fromkeys(["model.name", "prune.strategy", "prune.ratio", *swept]))
    if verbose < 2:
        def describe(config: dict) -> str:
            trial, values = config.get("trial", {}), []
            for path in shown:
                section = path.removesuffix(".name")  # a model or dataset: its name, or a plug-in's factory path
                value = section_label(trial.get(section, {})) if section in ("model", "dataset") else functools.reduce(
                    lambda node, part: node.get(part, {}) if isinstance(node, dict) else {}, path.split("."), trial)
                values.append(f"{short.get(path, path)} {value}")
            return ", ".join(values)
        return CompactProgress(spec.metric, spec.mode, describe, outage=functools.partial(down_for, uri))
    # a plug-in section that is not swept: Tune's table shows its factory path (its name is null)
    plugin = {f"{s}.name": f"{s}.factory" for s in ("model", "dataset")
              if s not in spec.space and not spec.trial[s].get("name") and spec.trial[s].get("factory")}
    columns = {"trial/" + plugin.get(p, p).replace(".", "/"): short.get(p, p) for p in shown}
    # print_intermediate_tables explicitly: its default follows a process-wide verbosity that earlier fits leave set.
    metrics = {"epoch": "epoch", "val_accuracy": "val_acc", "flops_reduction": "flops_red"}
    return tune.CLIReporter(parameter_columns=columns, metric_columns=metrics, max_report_frequency=10,
                            print_intermediate_tables=True)


def _new_tuner(spec: SweepSpec, pending: list[dict], trainable: Any, experiment_path: str,
               max_concurrent: int | None, verbose: int, uri: str) -> Any:
    search = None
    if spec.search["algorithm"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # imports optuna: only for the sweeps that use it

        search = OptunaSearch(seed=spec.trial["seed"])
    # max_t (config.spec) lies below every trial's last epoch, and stop_last_trials=False: a trial past it is never
    # stopped, so one that trained in full always runs its test and saves its network.
    scheduler = None if spec.scheduler["name"] == "fifo" else ASHAScheduler(
        time_attr="epoch", max_t=spec.scheduler["max_t"], grace_period=spec.scheduler["grace_period"],
        reduction_factor=spec.scheduler["reduction_factor"], stop_last_trials=False)
    return tune.Tuner(trainable, param_space={
        "trial": tune.grid_search(pending) if spec.search["algorithm"] == "grid" else spec.param_space()},
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples(), search_alg=search,
            scheduler=scheduler, max_concurrent_trials=max_concurrent or spec.max_concurrent,
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",  # not Tune's: the whole config
            # A new worker per trial costs seconds (process start, import torch and mlflow); every trial of a
            # sweep asks for the same resources, so one worker can run trial after trial.
            reuse_actors=True),
        run_config=tune.RunConfig(
            # a launch path is <storage>/<name>/launches/<launch>, '/'-separated on object storage too
            name=experiment_path.rsplit("/", 1)[-1], storage_path=experiment_path.rsplit("/", 1)[0],
            verbose=min(verbose, 1), progress_reporter=_progress_reporter(spec, verbose, uri),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Ray snapshots the whole experiment state each time a trial has checkpointed num_to_keep times since
            # the last snapshot; with 1 that is every checkpoint, quadratic in trials. 2 halved Tune's wall for 300
            # one-checkpoint trials (bench/tune_snapshot.py); the snapshot never points at a deleted checkpoint.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


@contextmanager
def _tune_output() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in _TUNE_OUTPUT}
    os.environ.update(_TUNE_OUTPUT)
    try:
        yield
    finally:
        os.environ.update({name: value for name, value in saved.items() if value is not None})
        for name in [name for name, value in saved.items() if value is None]:
            os.environ.pop(name, None)


def _pending_grid(spec: SweepSpec, uri: str, force: bool) -> tuple[list[dict], int]:
    """The grid configs still to run and how many were skipped because they already finished."""
    configs = spec.grid_configs()
    if force:
        return configs, 0
    hashes = [tracking.config_hash(c) for c in configs]
    done = tracking.finished_trials(uri, spec.name, hashes)  # a small grid: one tag-filtered query per config, no scan
    pending = [c for c, h in zip(configs, hashes) if h not in done]
    return pending, len(configs) - len(pending)


def _resumable(store: Store, spec: SweepSpec, lease_s: float) -> tuple[str, str] | None:
    """The newest unfinished launch, to continue as it was launched: (parent run id, Tune folder), None when there is
    none whose Tune state can be restored. InputError if its driver is alive (two drivers would share one Tune
    folder and close each other's runs), or if the spec changed since (Tune restores the old one)."""
    parent = tracking.newest_parent_run(store, spec.name)
    run = None if parent is None else store.get_run(parent)
    if run is None or run.info.status == "FINISHED":  # nothing to resume: --resume starts afresh
        return None
    if run.info.status == "RUNNING":
        print(f"the launch to resume holds its lease; checking whether its driver is alive (at most {lease_s:.0f} s)")
        if claims.holder_alive(store, parent, lease_s):
            raise InputError(f"--resume: sweep {spec.name} is running in another process (launch "
                             f"{run.data.tags.get(claims.OWNER_TAG, '?')} keeps renewing its lease): let it finish, "
                             "or stop it, then resume")
    with tempfile.TemporaryDirectory(prefix="sweep-spec-") as tmp:
        try:
            old = yaml.safe_load(Path(store.download_artifacts(parent, "spec.yaml", tmp)).read_text("utf-8"))
        except (MlflowException, OSError, yaml.YAMLError):  # an older launch without its spec: nothing to compare
            old = None
    new = yaml.safe_load(spec.source_text)
    if isinstance(old, dict) and isinstance(new, dict) and old != new:
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise InputError(f"--resume: the spec's {', '.join(changed)} changed since the launch being resumed, which "
                         "continues as it was launched; undo the change to resume it, or run without --resume to "
                         "launch the new spec (configs that finished are skipped)")
    path = run.data.tags.get("sweep.tune_path")
    return (parent, path) if path is not None and _restorable(path) and tune.Tuner.can_restore(path) else None


def _restorable(experiment_path: str) -> bool:
    """Tune rewrites its experiment state in place: a driver killed mid-write leaves a truncated file, from which
    Tune would restart every trial without its config. Drop such files; restore from an older intact one, if any."""
    states = sorted(objects.list_files(experiment_path, "experiment_state-", ".json"), key=lambda item: item[1])
    for state, _ in reversed(states):
        try:
            json.loads(objects.read_bytes(state) or b"")
            return True
        except (OSError, ValueError):
            print(f"ignoring a damaged Tune state file: {state}", file=sys.stderr)
            objects.delete(state)
    return False


# --- results ---------------------------------------------------------------------------------------------


def _status(result: Any, early_stopping: bool) -> str:
    metrics = result.metrics or {}
    if result.error is not None:
        return "FAILED"
    if metrics.get("trial_status") in ("SKIPPED", "HELD", "FINISHED"):  # the trial's final report says how it ended
        return metrics["trial_status"]
    # Ended without its final report: a scheduler stops trials only on a reported result, so with FIFO, or with no
    # result at all, the sweep was interrupted (Tune marks such trials TERMINATED too, so its status cannot tell).
    return "STOPPED" if early_stopping and metrics else "INTERRUPTED"


def summary_frame(result_grid: Any, early_stopping: bool = False) -> pd.DataFrame:
    """One row per Tune trial: what it was (model, strategy, ratio, scope, target) and how it ended."""
    rows = []
    for result in result_grid:
        config = (result.config or {}).get("trial", {})
        prune, metrics = config.get("prune", {}), result.metrics or {}
        rows.append({
            "model": section_label(config.get("model", {})),  # a plug-in: mypkg:build
            **{key: prune.get(key) for key in ("strategy", "ratio", "scope", "target")},
            "status": _status(result, early_stopping), **{name: metrics.get(name) for name in _SUMMARY_METRICS},
            "error": None if result.error is None else " ".join(str(result.error).split())[:200]})
    columns = ["model", "strategy", "ratio", "scope", "target", "status", *_SUMMARY_METRICS, "error"]
    frame = pd.DataFrame(rows, columns=columns)
    frame[_SUMMARY_METRICS] = frame[_SUMMARY_METRICS].astype(float)
    return frame.sort_values(["model", "strategy", "ratio"], kind="stable").reset_index(drop=True)


# --- the sweep -----------------------------------------------------------------------------------------------


def run_sweep(spec: SweepSpec, address: str | None = None, tracking_uri: str | None = None, storage: str | None = None,
              resume: bool = False, force: bool = False, max_concurrent: int | None = None, verbose: int = 1,
              on_epoch: EpochHook | None = None,
              connect_timeout: float = session.DEFAULT_CONNECT_TIMEOUT_S) -> SweepOutcome:
    """Run the sweep's new trials on Ray Tune, recording them in MLflow under one parent run for this launch.

    Bad input (resources the cluster cannot give, a tracking server or Ray address that does not answer) raises
    SpecError or InputError before any MLflow data is written. `resume` restores the newest interrupted launch if it
    can (errored trials restart from their checkpoints, under its parent run), else starts afresh. `on_epoch(cfg,
    epoch)` runs in the trial workers before each training epoch (it must pickle).
    """
    storage = session.resolve_storage(storage)
    uri = resolve_tracking_uri(tracking_uri)
    os.environ.pop("MLFLOW_RUN_ID", None)  # local workers inherit it, and it would re-parent every trial run

    check_tracking_server(uri)  # MLflow's own client would retry a dead server for about 4 minutes
    if address is not None:
        session.check_address(address, connect_timeout)  # now, not after the data is loaded; ray.init would hang
    check_writable(storage, uri)  # a read-only --storage or store folder: one line now, not a crash mid-sweep
    if not (resume or force) and spec.search["algorithm"] == "grid" and tracking.store_exists(uri):
        pending, skipped = _pending_grid(spec, uri, force)
        if not pending:  # answered from the store alone: no data to load, no Ray to start
            return _nothing_to_run(spec, skipped)
    officials = preflight(spec)  # models, checkpoints and data the trials will need: fail now, not in every trial
    owns_ray = session.start_ray(address, connect_timeout=connect_timeout)
    try:
        session.check_resources(spec)
        shared = shared_data.publish(officials)  # the trials of a node read one copy of the images
        del officials
        return _launch(spec, uri, storage, resume, force, max_concurrent, verbose, on_epoch, shared)
    finally:
        if owns_ray:
            ray.shutdown()


def _nothing_to_run(spec: SweepSpec, skipped: int) -> SweepOutcome:
    """An empty launch: said in one line, and no parent run is created for it."""
    print(f"nothing to run: all {skipped} trials already finished in experiment {spec.name} (use --force to rerun)")
    return SweepOutcome(spec.name, None, 0, skipped, 0, None, "")


def _launch(spec: SweepSpec, uri: str, storage: str, resume: bool, force: bool, max_concurrent: int | None,
            verbose: int, on_epoch: EpochHook | None, shared: dict) -> SweepOutcome:
    tracking.init_store(uri)  # here, in the driver: trial workers creating the schema in parallel would race
    store, launch_id, lease_s = Store(uri), claims.new_owner_id("launch"), lease_seconds()
    interrupted = _resumable(store, spec, lease_s) if resume else None
    experiment_id = store.experiment_id(spec.name)
    if experiment_id is not None:  # runs left RUNNING by launches that died: close them, saying why
        if not resume:  # (--resume waited for its own launch above)
            claims.outlive_dead_launches(store, experiment_id, lease_s)
        closed = claims.close_dead_runs(store, experiment_id, closer=launch_id, lease_s=lease_s)
        if closed:
            print(f"closed {len(closed)} runs left RUNNING by a launch that died (tag sweep.closed_reason)")
    if resume and interrupted is None:
        print(f"nothing to resume for sweep {spec.name}: starting it afresh")
    pending, skipped = [], 0
    if interrupted is None and spec.search["algorithm"] == "grid":
        pending, skipped = _pending_grid(spec, uri, force)
        if not pending:  # finished meanwhile (another launch), or a store this launch just created
            return _nothing_to_run(spec, skipped)
        if skipped:
            print(f"skipping {skipped} trials already finished in experiment {spec.name}; "
                  f"running {len(pending)} new ones")

    if interrupted is not None:
        parent, experiment_path = interrupted
        print(f"resuming the sweep at {experiment_path}")
        store.update_run(parent, "RUNNING")
        claims.clear_closed_tags(store, parent)  # it was closed as dead (lease expired); it lives again
    else:
        experiment_path = session.new_launch_path(storage, spec.name)
        parent = tracking.start_parent_run(store, spec.name, spec.source_text,
                                           tags={"sweep.tune_path": experiment_path})
    parent_lease = claims.Lease.acquire(store, parent, launch_id, lease_s)  # a dead driver's parent gets closed
    try:
        # with --force the trial must not return a recorded result either
        context = SweepContext(uri, spec.name, parent, session.cache_dir(storage, spec.name), rerun=force,
                               on_epoch=on_epoch, launch_id=launch_id, lease_s=lease_s, shared_data=shared,
                               checkpoint_every_s=spec.checkpoint_every_s,
                               log_every_epoch=spec.scheduler["name"] != "fifo")
        resources = {"cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"],  # memory: GiB -> bytes
                     **({"memory": spec.resources["memory"] * 2**30} if spec.resources.get("memory") else {})}
        trainable = tune.with_resources(tune.with_parameters(sweep_trial, context=context), resources)
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=True) if interrupted is not None \
            else _new_tuner(spec, pending, trainable, experiment_path, max_concurrent, verbose, uri)
        raycompat.retry_oom_killed_trials()  # else one OOM-killed trial raises out of fit and ends the sweep
        if verbose:
            print(f"{len(pending) or spec.num_trials()} trials on Ray; the first one to start trains the shared base "
                  "network, the others wait for it (trial workers take a few seconds to start)")
        with _tune_output(), ServerWatch(uri):  # the progress line says when the tracking server stops answering
            result_grid = tuner.fit()
        _measure_latency(spec, uri, parent)
    except BaseException:
        parent_lease.release()
        tracking.close_children(store, spec.name, parent)
        tracking.end_run(store, parent, "KILLED")
        raise
    frame = summary_frame(result_grid, early_stopping=spec.scheduler["name"] != "fifo")
    return _finish(spec, uri, storage, parent, parent_lease, frame, skipped, experiment_path)


def lease_seconds() -> float:
    """How long a claim outlives its holder's last renewal: $SWEEP_LEASE_SECONDS, else 60 s."""
    return float(os.environ.get("SWEEP_LEASE_SECONDS", claims.DEFAULT_LEASE_S))


def _measure_latency(spec: SweepSpec, uri: str, parent: str) -> None:
    """The measurement phase: every finished trial without latency, one model at a time, on a quiet worker."""
    run_ids = latency.runs_to_measure(uri, spec.name, own_parent=parent)
    if not run_ids:
        return
    here = measures_in_driver()
    print(f"measuring latency of {len(run_ids)} pruned networks, one at a time" + (", in this process" if here else ""))
    if here:
        # Ray is this machine alone and Tune has returned: the driver is idle on the node the trials ran on, where
        # a Ray task would first start a fresh worker (about 5 s of imports) to time networks that take
        # milliseconds. latency_stats pins and restores the thread count; fork_rng keeps the driver's random state.
        with torch.random.fork_rng(devices=[]):
            latency.measure_runs(uri, run_ids)
        return
    # On a cluster the measurement belongs on a worker node (where the trials ran, with the GPU they asked for).
    ray.get(ray.remote(latency.measure_runs).options(num_cpus=spec.trial["measure"]["threads"],
                                                     num_gpus=1 if spec.resources["gpu"] else 0).remote(uri, run_ids))


def measures_in_driver() -> bool:
    """True when the connected Ray is one node, this process's own: the latency phase then runs here. False on a
    multi-node cluster and under Ray Client (ray://), whose driver runs on another machine."""
    if ray.util.client.ray.is_connected():
        return False
    alive = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
    return alive == [ray.get_runtime_context().get_node_id()]


def _finish(spec: SweepSpec, uri: str, storage: str, parent: str, parent_lease: claims.Lease, frame: pd.DataFrame,
            skipped: int, experiment_path: str) -> SweepOutcome:
    """Close the launch: orphaned trial runs, the report, the parent run's status, the summary table. The parent's
    lease is renewed until its status is set: another launch must not take it for dead while the report is written."""
    tracking.close_children(uri, spec.name, parent)
    count = {status: int(n) for status, n in frame["status"].value_counts().items()}
    interrupted, failed, held, stopped = (count.get(s, 0) for s in ("INTERRUPTED", "FAILED", "HELD", "STOPPED"))
    skipped += count.get("SKIPPED", 0)
    ran = count.get("FINISHED", 0) + failed + stopped
    try:
        print(f"report: {report.write_report(spec.name, uri, out_dir=session.reports_dir(storage))['summary'].parent}")
    except report.ReportError as error:  # no finished trial yet: nothing to tabulate
        print(f"no report: {error}", file=sys.stderr)
    parent_lease.release("KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    print(f"\nsweep {spec.name}: {ran} trials ran, {skipped} skipped (already finished), {failed} failed"
          + (f", {held} left to another trial running the same config" if held else ""))
    shown = frame.drop(columns=["error"] if frame["error"].isna().all() else [])
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 80):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if interrupted:
        print(f"interrupted with {interrupted} trials unfinished: `sweep run --resume` continues them")
    elif stopped:
        print(f"{stopped} trials were stopped early by {spec.scheduler['name']}")
    return SweepOutcome(spec.name, parent, ran, skipped, failed, frame, experiment_path, interrupted, held)


# --- one trial, without Ray ---------------------------------------------------------------------------------


def single_config(spec: SweepSpec) -> tuple[dict, int]:
    """The one trial `sweep trial` runs (the first value of every grid or choice) and how many the space holds."""
    ranges = [f"space: {path} samples a range ({domain.kind}); a single trial needs fixed values, a grid or a choice"
              for path, domain in spec.space.items() if domain.kind in ("uniform", "loguniform", "randint")]
    if ranges:
        raise SpecError(ranges)
    configs = dataclasses.replace(spec, search={**spec.search, "algorithm": "grid"}).grid_configs()
    return configs[0], len(configs)


def run_one(spec: SweepSpec, tracking_uri: str | None = None, storage: str | None = None,
            on_report: Callable[[dict, str | None], None] | None = None, force: bool = False) -> dict:
    """One trial in this process, without Ray, logged to MLflow like a sweep's trial (no parent run), sharing the
    sweep's base-model cache; the recorded metrics if this config already finished."""
    uri = resolve_tracking_uri(tracking_uri)
    config, _ = single_config(spec)  # run_trial itself keeps MLFLOW_RUN_ID from re-parenting the run
    tracking.init_store(uri)
    context = SweepContext(uri, spec.name, None, session.cache_dir(session.resolve_storage(storage), spec.name),
                           rerun=force, lease_s=lease_seconds())
    result = run_trial(config, context, report=on_report or (lambda metrics, checkpoint: None))
    if result.get("skipped"):
        return result
    latency.measure_runs(uri, latency.runs_to_measure(uri, spec.name))  # nothing else runs here: measure now
    return tracking.recorded_result(uri, spec.name, tracking.config_hash(config)) or result
