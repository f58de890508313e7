"""`sweep criteria`: how well each strategy's filter scores rank the filters against the oracle (Molchanov et al.
2017, Table 1), per layer group, for any model.

The oracle of a unit (a filter, or the tied filters of a residual stream) is the measured change of the mean
cross-entropy on held-out batches when that unit is removed: zeroed where it is made (its filters, biases and norm
parameters), which is exactly what the pruner's removal computes (its tested equivalence property) and what
Molchanov et al. do (they zero the feature map). The pruner's `oracle` criterion measures it
(sweep.pruning.oracle.loss_changes); here it is measured on held-out batches rather than calibration batches.

    outcome = run_criteria(load_spec("search_spaces/layers_digits.yaml"))
    outcome.table            # one row per layer group: Spearman rho of each strategy against the oracle

Scores come from `sweep.pruning.STRATEGIES` on the whole network, as `prune()` computes them (taylor and apoz on the
spec's calibration batches of the training split), so the ranking judged is the one the pruner acts on. The
correlation is with |delta loss| (Molchanov's oracle-abs, their Table 1); `spearman_signed_*` uses the signed change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

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
from sweep.analysis.groups import LayerGroup, groups_of
from sweep.config.names import section_label
from sweep.driver.session import start_ray
from sweep.errors import InputError
from sweep.pruning import NEEDS_CALIBRATION, STRATEGIES, ChannelGraph, analyse
from sweep.pruning.oracle import loss_changes
from sweep.report.analyses import write_criteria_report
from sweep.store import tracking
from sweep.store.store import Store
from sweep.worker.train import pick_device

KIND = "criteria"
Criterion = Callable[[nn.Module, ChannelGraph, object, torch.Generator], torch.Tensor]


# --- rank correlation --------------------------------------------------------------------------------------------


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranked = np.empty(len(values))
    ordered = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and ordered[j + 1] == ordered[i]:
            j += 1
        ranked[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranked


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN when either side is constant or shorter
    than 2."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} and {len(b)} values; give equally long sequences")
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    if denominator == 0:
        return float("nan")
    return float(np.clip((ra * rb).sum() / denominator, -1.0, 1.0))


# --- the oracle --------------------------------------------------------------------------------------------------


def oracle(model: nn.Module, graph: ChannelGraph, units: Sequence[int], batches, device: torch.device | str = "cpu"
           ) -> tuple[float, np.ndarray]:
    """(base loss, loss change per unit): each unit removed alone from a copy of ``model``, the held-out loss
    measured; the pruner's own `oracle` criterion computes it (sweep.pruning.oracle.loss_changes) on its calibration
    batches."""
    model = model.to(torch.device(device))
    base, changes = loss_changes(model, graph, units, batches)
    return base, changes.numpy()


def criterion_scores(model: nn.Module, graph: ChannelGraph, strategies: Sequence[str],
                     extra: dict[str, Criterion] | None = None, calibration=None, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Each strategy's score per unit, computed as prune() computes them (one generator per strategy, seeded)."""
    registry = {**STRATEGIES, **(extra or {})}
    out = {}
    for name in [*strategies, *(extra or {})]:
        generator = torch.Generator().manual_seed(seed)
        out[name] = registry[name](model, graph, calibration, generator).double().cpu().numpy()
    return out


# --- the sweep ---------------------------------------------------------------------------------------------------


@dataclass
class CriteriaOutcome:
    experiment: str
    parent_run_id: str
    table: pd.DataFrame  # one row per layer group: layer, units, spearman_<strategy>..., plus a last "mean" row
    units: pd.DataFrame  # one row per unit: layer, unit, channel, delta_loss, score per strategy
    paths: dict[str, Path]
    seconds: float


def _pick(groups: list[LayerGroup], layers: int | Sequence[str] | None) -> list[LayerGroup]:
    if layers is None:
        return groups
    if isinstance(layers, int):
        if layers < 1:
            raise InputError(f"--layers: {layers} is less than 1; give a count or layer names")
        if layers >= len(groups):
            return groups
        return [groups[int(i)] for i in np.unique(np.linspace(0, len(groups) - 1, layers).round())]
    names = {g.name: g for g in groups}
    missing = [n for n in layers if n not in names]
    if missing:
        raise InputError(f"--layers: {missing} are not layer groups; choose from {', '.join(names)}")
    return [names[n] for n in layers]


def _layer_task(job: dict, index: int) -> dict:
    """One Ray task: the oracle of every unit of one layer group, its correlation with each strategy, one child run."""
    in_task(job["resources"])
    group: LayerGroup = job["groups"][index]
    run = open_child(job["uri"], job["experiment"], job["parent"], KIND, group.label, {
        "layer": group.name, "layer_index": index, "modules": ",".join(group.modules), "units": len(group.units),
        "strategies": ",".join(job["scores"]),
    })
    try:
        graph = job["graph"]
        base, changes = oracle(job["model"], graph, group.units, job["val"], pick_device(job["device"]))
        metrics = {"base_loss": base, "oracle_mean_abs": float(np.abs(changes).mean()),
                   "oracle_max": float(changes.max())}
        for name, scores in job["scores"].items():
            chosen = scores[group.units]
            metrics[f"spearman_{name}"] = spearman(chosen, np.abs(changes))
            metrics[f"spearman_signed_{name}"] = spearman(chosen, changes)
        run.log_metrics({k: v for k, v in metrics.items() if not np.isnan(v)})
        units = pd.DataFrame({"layer": group.name, "unit": group.units,
                              "channel": [job["channels"][u] for u in group.units], "delta_loss": changes,
                              **{name: scores[group.units] for name, scores in job["scores"].items()}})
        with _tmp_csv(units, "oracle.csv") as path:
            run.log_artifact(path)
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
    return {"layer": group.name, "metrics": metrics, "units": units, "run_id": run.run_id}


def _first_channel(model: nn.Module, graph: ChannelGraph, groups: list[LayerGroup]) -> dict[int, int]:
    """Per unit: its output channel in its group's first producer (what a person calls 'filter k')."""
    names = {g.index: g.name for g in groups}
    found: dict[int, int] = {}
    for label, (module, channel) in graph.producer.items():
        unit = graph.unit_of_label[label]
        if unit >= 0 and module == names[graph.unit_layer[unit]]:
            found.setdefault(unit, channel)
    return found


def run_criteria(spec, strategies: Sequence[str] | None = None, layers: int | Sequence[str] | None = None,
                 tracking_uri: str | None = None, storage: str | None = None, address: str | None = None,
                 out_dir: str | Path = "reports", max_batches: int | None = None, experiment: str | None = None,
                 spec_path: str | Path | None = None, extra_criteria: dict[str, Criterion] | None = None
                 ) -> CriteriaOutcome:
    """Scores of every strategy once in the driver, the oracle on Ray (one task per layer group), then the report.

    ``extra_criteria`` (name -> criterion function, as in STRATEGIES) are judged along, without being registered.
    """
    import ray


    start = time.perf_counter()
    # the oracle criterion by default too would cost (units + 1) x batches forward passes to correlate with itself
    strategies = list(strategies or [s for s in STRATEGIES if s != "oracle"])
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise InputError(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.init_store(uri)
    setup: Setup = prepare(spec, storage, max_batches,
                           calibration=bool(set(strategies) & NEEDS_CALIBRATION) or bool(extra_criteria),
                           tracking_uri=uri)
    ignore = tuple(setup.config["prune"]["ignore"])
    graph = analyse(setup.model, (setup.example,), ignore)
    groups = groups_of(setup.model, graph)
    chosen = _pick(groups, layers)
    scores = criterion_scores(setup.model, graph, strategies, extra_criteria, setup.calibration, setup.config["seed"])
    base = base_metrics(setup)
    name = experiment_name(spec, KIND, experiment)
    parent = start_parent(uri, name, spec_text(spec, spec_path), KIND, {
        "model": section_label(setup.config["model"]), "dataset": section_label(setup.config["dataset"]),
        "strategies": ",".join(scores), "layers": len(chosen), "layer_groups": len(groups), "spec": spec.name,
        "oracle": "loss change on held-out batches when the unit's channel is zeroed at every consumer",
    })
    log_parent_metrics(uri, parent, base)
    started = start_ray(address)
    try:
        job = ray.put({
            "uri": uri, "experiment": name, "parent": parent, "resources": spec.resources, "groups": chosen,
            "model": setup.model, "example": setup.example, "val": setup.val,
            "graph": graph, "device": setup.config["device"], "scores": scores,
            "channels": _first_channel(setup.model, graph, groups),
        })
        task = ray.remote(_layer_task).options(**task_options(setup.config, spec.resources))
        results = ray.get([task.remote(job, i) for i in range(len(chosen))])
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    units = pd.concat([r["units"] for r in results], ignore_index=True)
    seconds = time.perf_counter() - start
    means = {}
    for s in scores:
        for key in (f"spearman_{s}", f"spearman_signed_{s}"):
            values = [r["metrics"][key] for r in results if not np.isnan(r["metrics"][key])]
            if values:
                means[f"mean_{key}"] = float(np.mean(values))
    log_parent_metrics(uri, parent, {**means, "wall_time_s": seconds})
    with _tmp_csv(units, "oracle_units.csv") as path:
        Store(uri).log_artifact(parent, path)
    paths, table = write_criteria_report(name, uri, out_dir, parent)
    tracking.end_run(uri, parent, "FINISHED")
    return CriteriaOutcome(name, parent, table, units, paths, seconds)


class _tmp_csv:
    def __init__(self, frame: pd.DataFrame, filename: str):
        self.frame, self.filename = frame, filename

    def __enter__(self) -> Path:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="sweep-criteria-")
        path = Path(self._dir.name) / self.filename
        self.frame.to_csv(path, index=False)
        return path

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()
