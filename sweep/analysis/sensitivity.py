"""`sweep sensitivity`: prune each layer group of the base alone at each ratio, no fine-tune, and measure validation
accuracy and loss (Li et al. 2017, Fig. 2), one Ray task and one MLflow child run per layer.

    outcome = run_sensitivity(load_spec("search_spaces/layers_digits.yaml"), ratios=[0.1, 0.3, 0.5, 0.7, 0.9])
    outcome.table            # one row per (layer, ratio)
    outcome.paths            # sensitivity.png, sensitivity.csv, suggested.yaml, summary.md

What a layer does alone tells which layers to keep whole (`prune.ignore`) and how hard to prune the others
(`prune.ratios`): `suggest()` writes that block for a tolerated accuracy drop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from sweep.analysis.common import (
    Setup,
    base_metrics,
    experiment_name,
    in_task,
    log_parent_metrics,
    open_child,
    prepare,
    spec_text,
    start_parent,
    task_options,
)
from sweep.analysis.groups import LayerGroup, layer_groups, prune_group
from sweep.config.names import section_label
from sweep.driver.session import start_ray
from sweep.errors import InputError
from sweep.pruning import NEEDS_CALIBRATION, STRATEGIES
from sweep.report.analyses import write_sensitivity_report
from sweep.store import tracking
from sweep.worker.measure import count_flops
from sweep.worker.train import evaluate, pick_device

KIND = "sensitivity"
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_TOLERANCE = 0.01  # a drop of one accuracy point


@dataclass
class SensitivityOutcome:
    experiment: str
    parent_run_id: str
    table: pd.DataFrame
    paths: dict[str, Path]
    seconds: float


def group_sensitivity(model: torch.nn.Module, example: torch.Tensor, groups: Sequence[LayerGroup],
                      group: LayerGroup, ratios: Sequence[float], strategy: str, val, num_classes: int,
                      device: torch.device | str = "cpu", calibration=None, prune_settings: dict | None = None,
                      seed: int = 0) -> list[dict]:
    """Rows (ratio, removed filters, accuracy, loss, FLOPs reduction) of one group pruned alone at each ratio."""
    settings = prune_settings or {}
    device = torch.device(device)
    model = model.to(device).eval()
    example = example.to(device)
    base_flops = count_flops(model, example)
    rows = []
    for step, ratio in enumerate(ratios):
        result = prune_group(model, example, groups, group, ratio, strategy, calibration, seed=seed,
                             ignore=settings.get("ignore", ()), min_channels=settings.get("min_channels", 1),
                             round_to=settings.get("round_to", 1))
        pruned = result.model.eval()
        metrics = evaluate(pruned, val, device, num_classes)
        rows.append({
            "layer": group.name, "step": step, "ratio": float(ratio),
            "removed": len(result.plan.removed.get(group.name, ())), "width": group.width,
            "accuracy": metrics["accuracy"], "loss": metrics["loss"],
            "flops_reduction": 1 - count_flops(pruned, example) / base_flops,
        })
    return rows


def _layer_task(job: dict, index: int) -> list[dict]:
    """One Ray task: one layer group at every ratio, logged as one MLflow child run (step = ratio index)."""
    in_task(job["resources"])
    group = job["groups"][index]
    run = open_child(job["uri"], job["experiment"], job["parent"], KIND, group.label, {
        "layer": group.name, "layer_index": index, "modules": ",".join(group.modules), "width": group.width,
        "strategy": job["strategy"],
        "ratios": ",".join(f"{r:g}" for r in job["ratios"]),
    })
    try:
        device = pick_device(job["device"])
        rows = group_sensitivity(job["model"], job["example"], job["groups"], group, job["ratios"], job["strategy"],
                                 job["val"], job["num_classes"], device, job["calibration"], job["prune"],
                                 job["seed"])
        for row in rows:
            run.log_metrics({"val_accuracy": row["accuracy"], "val_loss": row["loss"], "ratio": row["ratio"],
                             "removed": row["removed"], "accuracy_drop": job["base_accuracy"] - row["accuracy"],
                             "flops_reduction": row["flops_reduction"]}, step=row["step"])
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
    return [{**row, "run_id": run.run_id} for row in rows]


def run_sensitivity(spec, ratios: Sequence[float] | None = None, strategy: str | None = None,
                    tolerance: float = DEFAULT_TOLERANCE, tracking_uri: str | None = None,
                    storage: str | None = None, address: str | None = None, out_dir: str | Path = "reports",
                    max_batches: int | None = None, experiment: str | None = None,
                    spec_path: str | Path | None = None) -> SensitivityOutcome:
    """The whole command: base once, one Ray task per layer group, then the report from what MLflow recorded."""
    import ray


    start = time.perf_counter()
    ratios = sorted({float(r) for r in (ratios or DEFAULT_RATIOS)})
    if any(not 0 < r < 1 for r in ratios):
        raise InputError(f"--ratios: {ratios} must all lie in (0, 1); use fractions such as 0.1,0.3,0.5")
    strategy = strategy or spec.trial["prune"]["strategy"]
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy: unknown '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    if not 0 <= tolerance < 1:
        raise InputError(f"--tolerance: {tolerance:g} is outside [0, 1); give a fraction such as 0.01 (one point)")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.init_store(uri)
    setup: Setup = prepare(spec, storage, max_batches, calibration=strategy in NEEDS_CALIBRATION,
                           tracking_uri=uri)
    prune_cfg = setup.config["prune"]
    settings = {"ignore": list(prune_cfg["ignore"]), "min_channels": prune_cfg["min_channels"],
                "round_to": prune_cfg["round_to"]}
    groups = layer_groups(setup.model, setup.example, settings["ignore"])
    base = base_metrics(setup)
    name = experiment_name(spec, KIND, experiment)
    parent = start_parent(uri, name, spec_text(spec, spec_path), KIND, {
        "model": section_label(setup.config["model"]), "dataset": section_label(setup.config["dataset"]),
        "strategy": strategy,
        "ratios": ",".join(f"{r:g}" for r in ratios), "tolerance": tolerance, "layers": len(groups),
        "spec": spec.name,
    })
    log_parent_metrics(uri, parent, base)
    started = start_ray(address)
    try:
        job = ray.put({
            "uri": uri, "experiment": name, "parent": parent, "resources": spec.resources, "groups": groups,
            "model": setup.model, "example": setup.example, "val": setup.val, "calibration": setup.calibration,
            "num_classes": setup.num_classes, "ratios": ratios, "strategy": strategy, "prune": settings,
            "seed": setup.config["seed"], "device": setup.config["device"],
            "base_accuracy": base["base_val_accuracy"],
        })
        task = ray.remote(_layer_task).options(**task_options(setup.config, spec.resources))
        rows = [row for part in ray.get([task.remote(job, i) for i in range(len(groups))]) for row in part]
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - start
    log_parent_metrics(uri, parent, {"wall_time_s": seconds})
    paths, table = write_sensitivity_report(name, uri, out_dir, parent)
    tracking.end_run(uri, parent, "FINISHED")
    assert len(table) == len(rows)
    return SensitivityOutcome(name, parent, table, paths, seconds)
