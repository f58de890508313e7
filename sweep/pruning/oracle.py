"""The oracle criterion (Molchanov et al. 2017): each unit's measured loss change when it alone is removed, by
zeroing it where it is made (``zeroed_reference``: what pruning it computes). Its cost, and `sweep criteria`'s use of
``loss_changes``: docs/analyses.md ("Criteria agreement and the oracle")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .graph import ChannelGraph, PruningError, _eval_mode
from .plan import plan_for
from .verify import zeroed_reference

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


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
    with _eval_mode(model):
        base = mean_loss(model, batches)
        changes = torch.empty(len(units), dtype=torch.float64)
        for i, unit in enumerate(units):
            changes[i] = mean_loss(zeroed_reference(model, plan_for(graph, [unit])).eval(), batches) - base
    return base, changes


def oracle(model: nn.Module, graph: ChannelGraph, calibration: Batches | None, generator: torch.Generator
           ) -> torch.Tensor:
    """The loss change when the unit alone is removed, on the calibration batches: the cheapest units go first (greedy
    when several go at once: docs/analyses.md)."""
    if calibration is None:
        raise PruningError("calibration: strategy 'oracle' needs data; pass calibration=[(inputs, targets), ...]")
    if iter(calibration) is calibration:  # a one-pass iterator: kept, since each unit is measured on every batch
        calibration = list(calibration)
    return loss_changes(model, graph, range(graph.num_units), calibration)[1]
