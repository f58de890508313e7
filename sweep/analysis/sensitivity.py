"""`sweep sensitivity`: prune each layer group of the base alone at each ratio, no fine-tune, and measure validation
accuracy and loss (Li et al. 2017, Fig. 2), one Ray task and one MLflow child run per layer.

    outcome = run_sensitivity(load_spec("search_spaces/layers_digits.yaml"), ratios=[0.1, 0.3, 0.5, 0.7, 0.9])
    outcome.table            # one row per (layer, ratio)
    outcome.paths            # sensitivity.png, sensitivity.csv, suggested.yaml (a prune: block), summary.md
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from sweep.analysis.common import Outcome, base_metrics, layer_run, prepare, run_layers
from sweep.analysis.groups import LayerGroup, layer_groups, prune_group
from sweep.config.names import section_label
from sweep.errors import InputError
from sweep.pruning import NEEDS_CALIBRATION, STRATEGIES
from sweep.report.analyses import write_analysis
from sweep.store import tracking
from sweep.store.store import Store
from sweep.worker.measure import count_flops
from sweep.worker.train import evaluate, pick_device

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_TOLERANCE = 0.01  # a drop of one accuracy point


def _layer_task(job: dict, index: int) -> int:
    """One Ray task: one layer group pruned alone at every ratio, logged as one MLflow child run (step: the ratio's
    index); returns how many steps it logged."""
    group: LayerGroup = job["groups"][index]
    with layer_run(job, group.label, {
        "layer": group.name, "layer_index": index, "modules": ",".join(group.modules), "width": group.width,
        "strategy": job["strategy"], "ratios": ",".join(f"{r:g}" for r in job["ratios"]),
    }) as run:
        device = pick_device(job["device"])
        model, example = job["model"].to(device).eval(), job["example"].to(device)
        base_flops = count_flops(model, example)
        rows = []
        for ratio in job["ratios"]:
            result = prune_group(model, example, job["groups"], group, ratio, job["strategy"], job["calibration"],
                                 seed=job["seed"], **job["prune"])
            pruned = result.model.eval()
            m = evaluate(pruned, job["val"], device, job["num_classes"])
            rows.append({"val_accuracy": m["accuracy"], "val_loss": m["loss"], "ratio": float(ratio),
                         "removed": len(result.plan.removed.get(group.name, ())),
                         "accuracy_drop": job["base_accuracy"] - m["accuracy"],
                         "flops_reduction": 1 - count_flops(pruned, example) / base_flops})
        for step, metrics in enumerate(rows):
            run.log_metrics(metrics, step=step)
    return len(rows)


def run_sensitivity(spec, ratios: Sequence[float] | None = None, strategy: str | None = None,
                    tolerance: float = DEFAULT_TOLERANCE, tracking_uri: str | None = None,
                    storage: str | None = None, address: str | None = None, out_dir: str | Path = "reports",
                    max_batches: int | None = None, experiment: str | None = None,
                    spec_path: str | Path | None = None) -> Outcome:
    """The whole command: base once, one Ray task per layer group, then the report from what MLflow recorded."""
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
    setup = prepare(spec, storage, max_batches, calibration=strategy in NEEDS_CALIBRATION, tracking_uri=uri)
    settings = {k: setup.config["prune"][k] for k in ("ignore", "min_channels", "round_to")}
    groups = layer_groups(setup.model, setup.example, settings["ignore"])
    base = base_metrics(setup)
    store = Store(uri)
    params = {"model": section_label(setup.config["model"]), "dataset": section_label(setup.config["dataset"]),
              "strategy": strategy, "ratios": ",".join(f"{r:g}" for r in ratios), "tolerance": tolerance,
              "layers": len(groups), "spec": spec.name}
    job = {"groups": groups, "model": setup.model, "example": setup.example, "val": setup.val,
           "calibration": setup.calibration, "num_classes": setup.num_classes, "ratios": ratios, "strategy": strategy,
           "prune": settings, "seed": setup.config["seed"], "device": setup.config["device"],
           "base_accuracy": base["base_val_accuracy"]}
    with run_layers(spec, "sensitivity", store, experiment, spec_path, params, base, _layer_task, job, len(groups),
                    address) as (name, parent, parts):
        seconds = time.perf_counter() - start
        parent.log_metrics({"wall_time_s": seconds})
        paths, table = write_analysis("sensitivity", name, store, out_dir, parent.run_id)
    assert len(table) == sum(parts)
    return Outcome(name, parent.run_id, table, paths, seconds)
