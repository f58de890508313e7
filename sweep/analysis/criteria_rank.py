"""`sweep criteria`: how well each strategy's filter scores rank the filters against the oracle, the held-out loss
change when one unit (a filter, or the tied filters of a residual stream) is removed (Molchanov et al. 2017, Table
1), per layer group; docs/analyses.md says how the oracle is measured and why the scores are the pruner's own.

    outcome = run_criteria(load_spec("search_spaces/layers_digits.yaml"))
    outcome.table            # one row per layer group: Spearman rho of each strategy against the oracle
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import nn

from sweep.analysis.common import Outcome, base_metrics, layer_run, prepare, run_layers
from sweep.analysis.groups import LayerGroup, groups_of
from sweep.config.names import section_label
from sweep.errors import InputError
from sweep.pruning import NEEDS_CALIBRATION, STRATEGIES, ChannelGraph, analyse
from sweep.pruning.criteria import Criterion
from sweep.pruning.oracle import loss_changes
from sweep.report.analyses import write_analysis
from sweep.store import tracking
from sweep.store.store import Store
from sweep.worker.train import pick_device


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy's, ties at their average rank); NaN when either side is constant or
    shorter than 2."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} and {len(b)} values; give equally long sequences")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.clip(spearmanr(a, b).statistic, -1.0, 1.0))


def oracle(model: nn.Module, graph: ChannelGraph, units: Sequence[int], batches, device: torch.device | str = "cpu"
           ) -> tuple[float, np.ndarray]:
    """(base loss, loss change per unit): each unit removed alone from a copy of ``model``, the held-out loss measured;
    what the pruner's own `oracle` criterion computes (sweep.pruning.oracle.loss_changes) on its calibration batches."""
    model = model.to(torch.device(device))
    base, changes = loss_changes(model, graph, units, batches)
    return base, changes.numpy()


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
    group: LayerGroup = job["groups"][index]
    with layer_run(job, group.label, {
        "layer": group.name, "layer_index": index, "modules": ",".join(group.modules), "units": len(group.units),
        "strategies": ",".join(job["scores"]),
    }) as run:
        base, changes = oracle(job["model"], job["graph"], group.units, job["val"], pick_device(job["device"]))
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
        run.store.log_text(run.run_id, units.to_csv(index=False), "oracle.csv")
    return {"metrics": metrics, "units": units}


def run_criteria(spec, strategies: Sequence[str] | None = None, layers: int | Sequence[str] | None = None,
                 tracking_uri: str | None = None, storage: str | None = None, address: str | None = None,
                 out_dir: str | Path = "reports", max_batches: int | None = None, experiment: str | None = None,
                 spec_path: str | Path | None = None, extra_criteria: dict[str, Criterion] | None = None
                 ) -> Outcome:
    """Scores of every strategy once in the driver, the oracle on Ray (one task per layer group), then the report;
    ``extra_criteria`` (name -> criterion function, as in STRATEGIES) are judged along, without being registered."""
    start = time.perf_counter()
    # the oracle criterion by default too would cost (units + 1) x batches forward passes to correlate with itself
    strategies = list(strategies or [s for s in STRATEGIES if s != "oracle"])
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise InputError(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.init_store(uri)
    setup = prepare(spec, storage, max_batches, tracking_uri=uri,
                    calibration=bool(set(strategies) & NEEDS_CALIBRATION) or bool(extra_criteria))
    graph = analyse(setup.model, (setup.example,), tuple(setup.config["prune"]["ignore"]))
    groups = groups_of(setup.model, graph)
    first = {g.index: g.name for g in groups}
    channels: dict[int, int] = {}  # per unit: its output channel in its group's first producer ('filter k')
    for label, (module, channel) in graph.producer.items():
        unit = graph.unit_of_label[label]
        if unit >= 0 and module == first[graph.unit_layer[unit]]:
            channels.setdefault(unit, channel)
    chosen = _pick(groups, layers)
    # each strategy's score per unit as prune() computes it: one generator per strategy, seeded
    registry, seed = {**STRATEGIES, **(extra_criteria or {})}, setup.config["seed"]
    scores = {name: registry[name](setup.model, graph, setup.calibration, torch.Generator().manual_seed(seed))
              .double().cpu().numpy() for name in [*strategies, *(extra_criteria or {})]}
    store = Store(uri)
    params = {"model": section_label(setup.config["model"]), "dataset": section_label(setup.config["dataset"]),
              "strategies": ",".join(scores), "layers": len(chosen), "layer_groups": len(groups), "spec": spec.name,
              "oracle": "loss change on held-out batches when the unit's channel is zeroed at every consumer"}
    job = {"groups": chosen, "model": setup.model, "example": setup.example, "val": setup.val, "graph": graph,
           "device": setup.config["device"], "scores": scores, "channels": channels}
    with run_layers(spec, "criteria", store, experiment, spec_path, params, base_metrics(setup), _layer_task, job,
                    len(chosen), address) as (name, parent, results):
        units = pd.concat([r["units"] for r in results], ignore_index=True)
        seconds = time.perf_counter() - start
        # per strategy, the mean over the layers whose correlation is defined
        means = pd.DataFrame([r["metrics"] for r in results]).filter(like="spearman_").mean().dropna()
        parent.log_metrics({**means.add_prefix("mean_").to_dict(), "wall_time_s": seconds})
        store.log_text(parent.run_id, units.to_csv(index=False), "oracle_units.csv")
        paths, table = write_analysis("criteria", name, store, out_dir, parent.run_id)
    return Outcome(name, parent.run_id, table, paths, seconds, units)
