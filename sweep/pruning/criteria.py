"""Importance criteria: one score per removable unit, higher means keep.

Each criterion is one function ``(model, graph, calibration, generator) -> Tensor[num_units]`` in the ``STRATEGIES``
registry. A unit's score aggregates (means) the scores of its members, so tied channels of a residual stream are
judged together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .graph import ChannelGraph, PruningError, _eval_mode
from .oracle import oracle

Calibration = Iterable[tuple[torch.Tensor, torch.Tensor]]
Criterion = Callable[[nn.Module, ChannelGraph, "Calibration | None", torch.Generator], torch.Tensor]


def _binned(graph: ChannelGraph, member) -> torch.Tensor:
    """The member's unit per position, with fixed positions sent to an extra, discarded bin."""
    return torch.where(member.units < 0, graph.num_units, member.units)


def _mean_per_unit(graph: ChannelGraph, parts) -> torch.Tensor:
    """Average per-position scores over every position that belongs to each unit."""
    total = torch.zeros(graph.num_units + 1, dtype=torch.float64)
    count = torch.zeros(graph.num_units + 1, dtype=torch.float64)
    for member, scores in parts:
        units = _binned(graph, member)
        total.index_add_(0, units, scores.detach().double().cpu())
        count.index_add_(0, units, torch.ones(len(units), dtype=torch.float64))
    return (total / count.clamp(min=1))[:-1]


def _filter_rows(module: nn.Module) -> torch.Tensor:
    """One row per output channel: the weights that compute it."""
    w = module.weight.detach()
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:  # (in, out / groups, *k)
        g = module.groups
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(1, 2).reshape(module.out_channels, -1)
    return w.flatten(1)


def _filters(model: nn.Module, graph: ChannelGraph, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Score each producer's filters and average them per unit."""
    # Reduce in the weights' own precision: a float64 copy of VGG's 4096x25088 Linear alone costs a second.
    return _mean_per_unit(graph, (
        (m, score(_filter_rows(model.get_submodule(m.module))).double())
        for m in graph.members if m.role == "out" and not bool((m.units < 0).all())  # the output layer: never scored
    ))


def random_scores(model, graph, calibration, generator) -> torch.Tensor:
    return torch.rand(graph.num_units, generator=generator, dtype=torch.float64)


def l1(model, graph, calibration, generator) -> torch.Tensor:
    """Sum of absolute filter weights (Li et al. 2017)."""
    return _filters(model, graph, lambda w: torch.linalg.vector_norm(w, 1, dim=1))


def l2(model, graph, calibration, generator) -> torch.Tensor:
    return _filters(model, graph, lambda w: w.norm(dim=1))


# FPGM's pairwise distances are exact up to _EXACT_LIMIT multiply-adds (rows^2 x dim); over it (VGG's classifier)
# inner products come from a Gaussian sketch of the centred rows, squared norms stay exact (why, and why k = 256:
# docs/benchmarks/fpgm-cost.md).
_EXACT_LIMIT = 10**10
_SKETCH_DIM = 256


def _sketch_dim(rows: int, dim: int) -> int | None:
    """The projection width FPGM uses for a layer of this shape, or None for exact distances (a sketch of fewer
    than 4 x k rows saves little)."""
    exact = rows * rows * dim <= _EXACT_LIMIT or rows < 4 * _SKETCH_DIM or dim <= _SKETCH_DIM
    return None if exact else _SKETCH_DIM


def _distance_sums(w: torch.Tensor, sketch_dim: int | None | str = "auto") -> torch.Tensor:
    """Sum of Euclidean distances from each row to all rows, from one Gram matrix product.

    ``sketch_dim``: "auto" decides by the layer's shape (``_sketch_dim``); None is exact; an int projects."""
    # Centred rows: distances are unchanged and |a|^2 + |b|^2 - 2ab cancels far less; float32 because a
    # 4096-wide Linear is 4096^2 x in_features of work.
    w = w.float()
    k = _sketch_dim(*w.shape) if sketch_dim == "auto" else sketch_dim
    mean = w.mean(0)
    if k is None:
        w = w - mean
        sq = (w * w).sum(1)
        gram = w @ w.T
    else:
        g = torch.Generator().manual_seed(0)  # fixed: the same weights always get the same scores
        proj = (torch.randn(w.shape[1], k, generator=g, dtype=torch.float32) / k**0.5).to(w.device)
        sq = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
        sketch = torch.empty(w.shape[0], k, dtype=w.dtype, device=w.device)
        for i in range(0, w.shape[0], 256):  # centred in blocks: no second copy of a 400 MB matrix
            block = w[i:i + 256] - mean
            sq[i:i + 256] = torch.linalg.vector_norm(block, dim=1).square()
            torch.mm(block, proj, out=sketch[i:i + 256])
        gram = sketch @ sketch.T
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0).sqrt_().sum(1)


def fpgm(model, graph, calibration, generator) -> torch.Tensor:
    """Distance to the layer's other filters (He et al. 2019): filters near the geometric median are redundant."""
    return _filters(model, graph, _distance_sums)


def bn_scale(model, graph, calibration, generator) -> torch.Tensor:
    """|gamma| of the batch norms over the channel (Liu et al. 2017); units with no BN fall back to L1."""
    bns = [m for m in graph.members
           if m.role == "bn" and getattr(model.get_submodule(m.module), "weight", None) is not None]
    scores = _mean_per_unit(graph, ((m, model.get_submodule(m.module).weight.abs()) for m in bns))
    covered = _mean_per_unit(graph, ((m, torch.ones(len(m.units))) for m in bns)) > 0
    return torch.where(covered, scores, l1(model, graph, calibration, generator))


def _consumers(model: nn.Module, graph: ChannelGraph):
    """Conv/linear inputs that carry removable channels, with each position's weight
    (1/repeats, so a channel flattened into H*W Linear inputs counts like one conv input)."""
    inputs = [(m.module, _binned(graph, m)) for m in graph.members if m.role == "in" and not bool((m.units < 0).all())]
    return [(model.get_submodule(name), units, 1 / torch.bincount(units, minlength=graph.num_units + 1).double()[units])
            for name, units in inputs]


def _per_sample(x: torch.Tensor, linear: bool) -> torch.Tensor:
    """(N, C, ...) -> (N, C): mean over spatial positions; a Linear's (N, ..., C) input has them in the middle."""
    if x.dim() <= 2:
        return x.double()
    return x.double().flatten(1, -2).mean(1) if linear else x.double().flatten(2).mean(2)


def _run_calibration(model: nn.Module, graph: ChannelGraph, calibration, pre_hook, backward: bool) -> None:
    if calibration is None:
        raise PruningError("calibration: this strategy needs data; pass calibration=[(inputs, targets), ...]")
    device = next(model.parameters()).device
    handles = [mod.register_forward_pre_hook(pre_hook(units, weights, isinstance(mod, nn.Linear)))
               for mod, units, weights in _consumers(model, graph)]
    seen = 0
    with _eval_mode(model):
        try:
            for inputs, targets in calibration:
                inputs, targets = inputs.to(device), targets.to(device)
                if backward:
                    model.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(model(inputs), targets)
                    loss.backward()
                else:
                    with torch.no_grad():
                        model(inputs)
                seen += 1
        finally:
            for h in handles:
                h.remove()
            model.zero_grad(set_to_none=True)
    if seen == 0:
        raise PruningError("calibration: no batches were given; pass at least one (inputs, targets) batch")


def taylor(model, graph, calibration, generator) -> torch.Tensor:
    """First-order Taylor estimate of the loss change when a channel is removed (Molchanov et al. 2017):
    |sum over its consumers of mean_hw(activation * gradient)|, averaged over samples."""
    n_bins = graph.num_units + 1
    batch_sums: list[torch.Tensor] = []
    total = torch.zeros(n_bins, dtype=torch.float64)
    samples = 0

    def pre_hook(units, weights, linear):
        def hook(module, args):
            x = args[0]
            if not x.requires_grad:
                return

            def on_grad(grad, x=x.detach()):  # noqa: B008 - binds this layer's input now, as the loop moves on
                contrib = _per_sample(x * grad, linear) * weights.to(x.device)
                acc = torch.zeros(x.shape[0], n_bins, dtype=torch.float64, device=x.device)
                batch_sums.append(acc.index_add_(1, units.to(x.device), contrib).cpu())
            x.register_hook(on_grad)
        return hook

    def batches():  # sums each batch's contributions before taking the absolute value
        nonlocal total, samples
        for batch in calibration:
            batch_sums.clear()
            yield batch
            if batch_sums:
                per_sample = torch.stack(batch_sums).sum(0)
                total += per_sample.abs().sum(0)
                samples += per_sample.shape[0]

    _run_calibration(model, graph, None if calibration is None else batches(), pre_hook, backward=True)
    return (total / max(samples, 1))[:-1]


def apoz(model, graph, calibration, generator) -> torch.Tensor:
    """1 - Average Percentage of Zeros of the channel's activations at its consumers (Hu et al. 2016)."""
    zeros = torch.zeros(graph.num_units + 1, dtype=torch.float64)
    count = torch.zeros(graph.num_units + 1, dtype=torch.float64)

    def pre_hook(units, weights, linear):
        def hook(module, args):
            z = _per_sample((args[0] == 0).double(), linear).cpu()
            zeros.index_add_(0, units, (z * weights).sum(0))
            count.index_add_(0, units, weights * z.shape[0])
        return hook

    _run_calibration(model, graph, calibration, pre_hook, backward=False)
    return 1.0 - (zeros / count.clamp(min=1e-12))[:-1]


STRATEGIES: dict[str, Criterion] = {
    "random": random_scores,
    "l1": l1,
    "l2": l2,
    "bn_scale": bn_scale,
    "taylor": taylor,
    "apoz": apoz,
    "fpgm": fpgm,
    "oracle": oracle,  # measured, not estimated: (units + 1) x batches forward passes (sweep.pruning.oracle)
}
NEEDS_CALIBRATION = frozenset({"taylor", "apoz", "oracle"})
