"""The oracle criterion (Molchanov et al. 2017): each unit's measured loss change when it alone is removed.

A unit (a filter, or the tied filters of a residual stream) is removed by zeroing its channel where it is read: the
input slices of every conv and Linear that consumes it. That is what the pruner's removal computes (its tested
equivalence property) and what Molchanov et al. do (they zero the feature map); zeroing the producer's weights alone
would leave its BatchNorm's shift, and on a residual stream the shortcut, feeding the channel.

Cost: (units + 1) forward passes over every calibration batch, per pruning step; a trial caps the batches with
``prune.oracle_batches``. `sweep criteria` measures the same quantity on held-out batches through ``loss_changes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .graph import ChannelGraph, PruningError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _reads(model: nn.Module, graph: ChannelGraph, units: Sequence[int]
           ) -> dict[int, list[tuple[nn.Parameter, torch.Tensor]]]:
    """Per unit, in the order of ``units``: (weight of a consumer, the input positions that carry the unit)."""
    wanted = set(units)
    reads: dict[int, list] = {u: [] for u in units}
    for member in graph.members:
        if member.role != "in":
            continue
        weight = model.get_submodule(member.module).weight
        for u in set(member.units.tolist()) & wanted:
            reads[u].append((weight, (member.units == u).nonzero().flatten()))
    return reads


def mean_loss(model: nn.Module, batches: Batches) -> float:
    """Mean cross-entropy per sample over the batches, summed in float64 (as sweep's evaluation does)."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        total += nn.functional.cross_entropy(model(inputs).float(), targets, reduction="sum").double()
        seen += len(targets)
    if seen == 0:
        raise PruningError("calibration: no batches were given; pass at least one (inputs, targets) batch")
    return total.item() / seen


@torch.no_grad()
def loss_changes(model: nn.Module, graph: ChannelGraph, units: Sequence[int], batches: Batches
                 ) -> tuple[float, torch.Tensor]:
    """(loss of the whole network, loss change per unit of ``units``): each unit removed alone, the loss measured on
    ``batches`` (re-iterated once per unit, so a list), the unit restored.

    ``model`` is modified during the call and restored exactly (the zeroed slices are copied back); it is evaluated in
    eval mode on the device its parameters are on."""
    was_training = model.training
    model.eval()
    try:
        base = mean_loss(model, batches)
        changes = torch.empty(len(units), dtype=torch.float64)
        for i, reads in enumerate(_reads(model, graph, units).values()):
            saved = [(w, pos, w[:, pos].clone()) for w, pos in reads]
            try:
                for w, pos, _ in saved:
                    w[:, pos] = 0
                changes[i] = mean_loss(model, batches) - base
            finally:
                for w, pos, values in saved:
                    w[:, pos] = values
    finally:
        model.train(was_training)
    return base, changes


def oracle(model: nn.Module, graph: ChannelGraph, calibration: Batches | None, generator: torch.Generator
           ) -> torch.Tensor:
    """The loss change when the unit alone is removed, on the calibration batches: the units whose removal costs
    least (or lowers the loss) go first. One-shot local pruning removes each layer's cheapest units together, a greedy
    approximation: removing several at once may cost more than the sum of their single costs."""
    if calibration is None:
        raise PruningError("calibration: strategy 'oracle' needs data; pass calibration=[(inputs, targets), ...]")
    if iter(calibration) is calibration:  # a one-pass iterator: kept, since each unit is measured on every batch
        calibration = list(calibration)
    return loss_changes(model, graph, range(graph.num_units), calibration)[1]
