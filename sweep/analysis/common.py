"""What `sweep sensitivity` and `sweep criteria` share: the spec's base network (the sweep's own shared base), the
held-out batches, one Ray task and one MLflow child run per layer group under a parent run. The driver hands the data
and the base to the tasks through the object store, so a task neither reads the dataset nor needs the base-model
cache folder (which on a cluster would have to be shared)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from sweep.config.names import KIND_TAG
from sweep.config.schema import trial_config
from sweep.config.spec import SweepSpec
from sweep.driver.session import cache_dir, resolve_storage, start_ray
from sweep.store import tracking
from sweep.store.store import Store
from sweep.store.tracking import TrialRun
from sweep.worker.base import ensure_base, example_input, load_base
from sweep.worker.train import evaluate, pick_device, seed_everything
from sweep.worker.trial import load_splits
from sweep.zoo.batching import batches

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Setup:
    """The base network and the data an analysis runs on, all on the CPU (tasks move them to their device)."""

    config: dict  # the spec's trial dict
    model: nn.Module
    example: torch.Tensor
    val: Batches  # held-out batches: the spec's validation split (or its first `max_batches` batches)
    calibration: Batches | None  # training batches for the data-driven criteria (taylor, apoz)
    num_classes: int
    base_cached: bool  # the spec's shared base was found, not trained


@dataclass
class Outcome:
    """What `sweep sensitivity` or `sweep criteria` did, as its report shows it."""

    experiment: str
    parent_run_id: str
    table: pd.DataFrame  # sensitivity: one row per (layer, ratio); criteria: one row per layer group
    paths: dict[str, Path]
    seconds: float
    units: pd.DataFrame | None = None  # criteria: one row per unit: layer, unit, channel, delta_loss, each score


def _materialise(data, batch_size: int, train: bool, seed: int, limit: int | None) -> Batches:
    return [(x.cpu(), y.cpu()) for x, y in islice(batches(data, batch_size, train, "cpu", seed=seed), limit)]


def prepare(spec: SweepSpec, storage: str | None = None, max_batches: int | None = None,
            calibration: bool = True, tracking_uri: str | None = None) -> Setup:
    """Load the spec's dataset, and train (or find) its shared base under ``<storage>/<name>/bases``; on object
    storage the base is claimed in the tracking store, as a sweep's trials claim it."""
    config = spec.trial
    cfg = trial_config(config)
    seed_everything(cfg.seed)
    splits = load_splits(cfg)
    device = pick_device(cfg.device)
    path, cached = ensure_base(cfg, cache_dir(resolve_storage(storage), spec.name), splits, device,
                               tracking_uri=tracking.resolve_tracking_uri(tracking_uri), experiment=spec.name)
    model, _ = load_base(cfg.model, path, splits)
    batch_size = config["finetune"]["batch_size"]
    val = _materialise(splits.val, batch_size, False, config["seed"], max_batches)
    calib = None
    if calibration:  # as a trial gathers them for taylor and apoz: the first batches of its training epoch
        calib = _materialise(splits.train, batch_size, True, config["seed"], config["prune"]["calibration_batches"])
    return Setup(config, model.eval(), example_input(splits), val, calib, splits.num_classes, cached)


def base_metrics(setup: Setup) -> dict[str, float]:
    """The base's accuracy and loss on exactly the held-out batches the analysis uses."""
    m = evaluate(setup.model, setup.val, "cpu", setup.num_classes)
    return {"base_val_accuracy": m["accuracy"], "base_val_loss": m["loss"],
            "val_examples": float(sum(len(y) for _, y in setup.val))}


@contextmanager
def run_layers(spec: SweepSpec, kind: str, store: Store, experiment: str | None, spec_path: str | Path | None,
               params: dict[str, Any], metrics: dict[str, float], task: Callable[[dict, int], Any], job: dict,
               count: int, address: str | None) -> Iterator[tuple[str, TrialRun, list]]:
    """Open the parent run of an analysis (experiment `<spec name>.<kind>`, beside the spec's pruning sweep) with
    its params and metrics, run task(job, i) for i < count as Ray tasks (what one trial of the spec asks for), and
    yield (experiment, parent run, their results) to the block that reports them; the parent ends FINISHED when
    the block does, FAILED if a task or the report fails (never left RUNNING)."""
    import ray

    name = experiment or f"{spec.name}.{kind}"
    text = Path(spec_path).read_text(encoding="utf-8") if spec_path is not None and Path(spec_path).exists() \
        else json.dumps(spec.trial, indent=2, default=str)
    parent = TrialRun(store, tracking.start_parent_run(store, name, text, tags={KIND_TAG: kind}))
    parent.log_params(params)
    parent.log_metrics(metrics)
    started = start_ray(address)
    try:
        shared = ray.put({**job, "uri": store.tracking_uri, "experiment": name, "parent": parent.run_id,
                          "kind": kind, "resources": spec.resources})
        remote = ray.remote(task).options(num_cpus=spec.resources.get("cpu", 1),
                                          num_gpus=spec.resources.get("gpu", 0), max_retries=1)
        yield name, parent, ray.get([remote.remote(shared, i) for i in range(count)])
    except BaseException:
        parent.finish("FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    parent.finish("FINISHED")


@contextmanager
def layer_run(job: dict, run_name: str, params: dict[str, Any]) -> Iterator[TrialRun]:
    """Inside a Ray task: the layer's child run, ended FINISHED, or FAILED if the block raises. It has no
    `config_hash` tag, so the pruning report and the incremental grid of `sweep run` never take it for a trial."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # MLflow's run id must not leak into the task (mlflow issue 15713)
    torch.set_num_threads(max(1, int(job["resources"].get("cpu", 1))))  # as many threads as CPUs granted
    store = Store(job["uri"])
    tags = {"mlflow.parentRunId": job["parent"], KIND_TAG: job["kind"], "sweep.name": job["experiment"],
            "mlflow.runName": run_name, **tracking._base_tags()}
    run = TrialRun(store, store.create_run(tracking.get_or_create_experiment(store, job["experiment"]), tags,
                                           run_name).info.run_id)
    run.log_params(params)
    try:
        yield run
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
