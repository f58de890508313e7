"""The oracle criterion (Molchanov et al. 2017): each unit's measured loss change when it alone is removed.

A unit (a filter, or the tied filters of a residual stream) is removed by zeroing it where it is made: its filters,
biases and norm parameters, in a copy of the model (``sweep.pruning.verify.zeroed_reference``). That is what pruning
it computes (the pruner's tested equivalence property), for grouped, depthwise and transposed convs and LayerNorms
too; Molchanov et al. zero the feature map, which is the same thing.

Cost: (units + 1) forward passes over every calibration batch, per pruning step, and a copy of the model per unit; a
trial caps the batches with ``prune.oracle_batches``. `sweep criteria` measures the same quantity on held-out batches
through ``loss_changes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .graph import ChannelGraph, PruningError
from .plan import PrunePlan
from .verify import zeroed_reference

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def unit_plan(graph: ChannelGraph, unit: int) -> PrunePlan:
    """The plan that removes this one unit: its positions in every member that makes it (all but the readers)."""
    removed = {}
    for member in graph.members:
        idx = (member.units == unit).nonzero().flatten().tolist()
        if idx and member.role != "in":
            removed[member.module] = idx
    return PrunePlan(removed=removed)


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
    """(loss of the whole network, loss change per unit of ``units``): each unit removed alone from a copy of the
    model, the loss measured on ``batches`` (re-iterated once per unit, so a list). ``model`` itself is untouched; it
    and its copies are evaluated in eval mode on the device its parameters are on."""
    was_training = model.training
    model.eval()
    try:
        base = mean_loss(model, batches)
        changes = torch.empty(len(units), dtype=torch.float64)
        for i, unit in enumerate(units):
            changes[i] = mean_loss(zeroed_reference(model, unit_plan(graph, unit)).eval(), batches) - base
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
