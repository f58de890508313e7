"""What `sweep sensitivity` and `sweep criteria` share: the spec's base network (the sweep's own shared base), the
held-out batches, the local or remote Ray, and the MLflow parent and child runs.

The driver loads the data and the base once and hands them to the Ray tasks through the object store, so a task
neither reads the dataset nor needs the base-model cache folder (which on a cluster would have to be shared).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sweep.config.names import KIND_TAG
from sweep.config.schema import trial_config
from sweep.config.spec import SweepSpec
from sweep.driver.session import cache_dir, resolve_storage
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

    name: str  # the spec's name: its base cache and the prefix of the analysis experiments
    config: dict  # the spec's trial dict
    model: nn.Module
    example: torch.Tensor
    val: Batches  # held-out batches: the spec's validation split (or its first `max_batches` batches)
    calibration: Batches | None  # training batches for the data-driven criteria (taylor, apoz)
    num_classes: int
    base_info: dict  # what ensure_base measured when it trained the base
    base_cached: bool


def _materialise(data, batch_size: int, train: bool, seed: int, limit: int | None) -> Batches:
    out: Batches = []
    for x, y in batches(data, batch_size, train, "cpu", seed=seed):
        out.append((x.cpu(), y.cpu()))
        if limit is not None and len(out) >= limit:
            break
    return out


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
    model, info = load_base(cfg.model, path, splits)
    batch_size = config["finetune"]["batch_size"]
    val = _materialise(splits.val, batch_size, False, config["seed"], max_batches)
    calib = None
    if calibration:  # as a trial gathers them for taylor and apoz: the first batches of its training epoch
        calib = _materialise(splits.train, batch_size, True, config["seed"], config["prune"]["calibration_batches"])
    return Setup(spec.name, config, model.eval(), example_input(splits), val, calib, splits.num_classes, info, cached)


def base_metrics(setup: Setup, device: torch.device | str = "cpu") -> dict[str, float]:
    """The base's accuracy and loss on exactly the held-out batches the analysis uses."""
    m = evaluate(setup.model.to(device), setup.val, device, setup.num_classes)
    setup.model.cpu()
    return {"base_val_accuracy": m["accuracy"], "base_val_loss": m["loss"],
            "val_examples": float(sum(len(y) for _, y in setup.val))}


# --- Ray ---------------------------------------------------------------------------------------------------------


def task_options(config: dict, resources: dict) -> dict[str, Any]:
    """One task per layer asks what one trial of the spec asks for."""
    return {"num_cpus": resources.get("cpu", 1), "num_gpus": resources.get("gpu", 0), "max_retries": 1}


def in_task(resources: dict) -> None:
    """Inside a Ray task: as many torch threads as CPUs granted; MLflow's run id must not leak (issue 15713)."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    torch.set_num_threads(max(1, int(resources.get("cpu", 1))))


# --- MLflow ------------------------------------------------------------------------------------------------------


def start_parent(uri: str, experiment: str, spec_text: str, kind: str, params: dict[str, Any]) -> str:
    run_id = tracking.start_parent_run(uri, experiment, spec_text, tags={KIND_TAG: kind})
    TrialRun(uri, run_id).log_params(params)
    return run_id


def log_parent_metrics(uri: str, run_id: str, metrics: dict[str, float]) -> None:
    TrialRun(uri, run_id).log_metrics(metrics)


def open_child(uri: str, experiment: str, parent_run_id: str, kind: str, run_name: str,
               params: dict[str, Any]) -> TrialRun:
    """A child run of one layer. It has no `config_hash` tag: the pruning report and the incremental grid of
    `sweep run` never mistake it for a trial."""
    store = Store(uri)
    experiment_id = tracking.get_or_create_experiment(store, experiment)
    tags = {"mlflow.parentRunId": parent_run_id, KIND_TAG: kind, "sweep.name": experiment,
            "mlflow.runName": run_name, **tracking._base_tags()}
    run = TrialRun(store, store.create_run(experiment_id, tags, run_name).info.run_id)
    run.log_params(params)
    return run


def experiment_name(spec: SweepSpec, kind: str, experiment: str | None = None) -> str:
    """`<spec name>.<kind>`: the analyses of a spec live beside, not inside, its pruning sweep."""
    return experiment or f"{spec.name}.{kind}"


def spec_text(spec: SweepSpec, path: str | Path | None) -> str:
    if path is not None and Path(path).exists():
        return Path(path).read_text(encoding="utf-8")
    import json

    return json.dumps(spec.trial, indent=2, default=str)


def now() -> float:
    return time.perf_counter()
