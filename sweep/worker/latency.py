"""Latency measured after the trials, one model at a time, with a pinned thread count: timed inside a trial that
shares the CPUs it measures its neighbours too (identical pruned networks measured 3 to 48 ms in one sweep). The
conditions are tags (latency.*) on each run; runs a dead launch left unmeasured are measured by the next launch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import tempfile

import torch

from sweep.pruning import load_pruned
from sweep.store import tracking
from sweep.store.store import Store
from sweep.worker.measure import latency_samples
from sweep.worker.train import pick_device
from sweep.zoo.models import build_model

log = logging.getLogger(__name__)


def latency_stats(model: torch.nn.Module, input_shape: tuple[int, int, int], device: torch.device, threads: int,
                  batch_size: int, warmup: int, runs: int) -> dict[str, float]:
    """Median and interquartile range of `runs` timed forward passes, with torch pinned to `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(batch_size, *input_shape, device=device)
        samples = latency_samples(model.to(device), x, device, warmup, runs)
    finally:
        torch.set_num_threads(before)
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return {"latency_ms": statistics.median(samples), "latency_iqr_ms": q3 - q1}


def runs_to_measure(uri: str, experiment: str, own_parent: str | None = None) -> list[str]:
    """FINISHED trial runs without latency (no latency.device tag, which measure_runs writes): this launch's, a dead
    launch's, a single trial's; never another live launch's, which measures its own (else it is logged twice)."""
    # A run killed between its latency metrics and its tags has latency_ms: the check below skips it.
    store = Store(uri)
    runs = tracking.child_runs(store, experiment, "attributes.status = 'FINISHED' and tags.`latency.device` IS NULL")
    experiment_id = store.experiment_id(experiment)
    live = {r.info.run_id for r in tracking.running_parents(store, experiment_id)} if runs else set()
    return [run.info.run_id for run in runs if "latency_ms" not in run.data.metrics
            and run.data.tags.get("mlflow.parentRunId") not in live - {own_parent}]


def _networks(store: Store, run_id: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(base architecture, pruned network, architecture info) rebuilt from the run's checkpoint/pruned.pt."""
    with tempfile.TemporaryDirectory(prefix="sweep-latency-") as tmp:
        path = store.download_artifacts(run_id, "checkpoint/pruned.pt", tmp)
        arch = torch.load(path, map_location="cpu", weights_only=True)["plan"]["info"]["arch"]
        # the model section as the trial recorded it, not validated again: its weights file need not be on this node
        model = arch["model"]
        base = build_model(model.get("name"), arch["num_classes"], None, arch["in_channels"],
                           factory=model.get("factory"), kwargs=model.get("kwargs"))
        pruned, _ = load_pruned(path, base)
    return base, pruned, arch


def measure_runs(uri: str, run_ids: list[str]) -> int:
    """Measure each run's pruned network and its base architecture; log latency, speed-up and how it was taken."""
    store = Store(uri)
    base_latency: dict[str, float] = {}  # per base architecture: many trials share one
    for run_id in run_ids:
        params, trial_run = store.get_run(run_id).data.params, tracking.TrialRun(store, run_id)
        device = pick_device(params.get("device", "auto"))
        try:
            settings = {key: int(params[f"measure.{key}"]) for key in ("threads", "batch_size", "warmup", "runs")}
            base, pruned, arch = _networks(store, run_id)
            shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
            after = latency_stats(pruned.eval(), shape, device, **settings)
            key = json.dumps([arch, settings, str(device)], sort_keys=True, default=str)
            if key not in base_latency:  # weights do not change the time: the base architecture stands for the base
                base_latency[key] = latency_stats(base.eval(), shape, device, **settings)["latency_ms"]
        except Exception as error:  # an older release's run, no checkpoint, out of memory: this run, not the phase
            log.warning("latency of run %s not measured: %s", run_id, error)
            # latency.device marks it as handled, so later launches do not try again; the reason says why
            trial_run.set_tags({"latency.device": "not measured",
                                "latency.skipped": " ".join(str(error).split())[:500]})
            continue
        metrics = {**after, "base_latency_ms": base_latency[key], "speedup": base_latency[key] / after["latency_ms"]}
        trial_run.log_metrics(metrics)
        trial_run.set_tags({"latency.device": str(device), **{f"latency.{k}": v for k, v in settings.items()},
                            "latency.host": socket.gethostname(), "latency.load_1min": f"{os.getloadavg()[0]:.2f}"})
    return len(run_ids)
