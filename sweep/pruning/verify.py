"""The property that defines correct structural pruning, as code: what a pruned model must compute.

A pruned model equals the original with every removed channel zeroed where it is made (its filters, biases and norm
parameters). One refinement: a LayerNorm over channels computes its mean and variance over the channels that are
kept, which no zeroing can express.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .plan import PrunePlan
from .surgery import _channel_dim, _target


class _Reference(nn.Module):
    def __init__(self, model: nn.Module, kept: dict[int, torch.Tensor]):
        super().__init__()
        self.model = model
        self.kept = kept  # id(LayerNorm weight) -> mask of its kept channels

    def forward(self, *args, **kwargs):
        original = F.layer_norm

        def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
            mask = self.kept.get(id(weight))
            if mask is None:
                return original(x, normalized_shape, weight, bias, eps)
            kept = x[..., mask]
            y = (x - kept.mean(-1, keepdim=True)) / torch.sqrt(kept.var(-1, unbiased=False, keepdim=True) + eps)
            return y * weight + bias if bias is not None else y * weight

        F.layer_norm = layer_norm  # modules look it up on torch.nn.functional at call time
        try:
            return self.model(*args, **kwargs)
        finally:
            F.layer_norm = original


def zeroed_reference(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A copy of ``model`` that computes what ``apply_plan(model, plan)`` must compute."""
    ref = copy.deepcopy(model)
    kept: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, idx in plan.removed.items():
            m = _target(ref, name)
            if isinstance(m, torch.Tensor):
                m.index_fill_(_channel_dim(m), torch.as_tensor(idx), 0)
                continue
            if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:  # (in, out / groups, *k)
                w = m.weight.view(m.groups, m.in_channels // m.groups, m.out_channels // m.groups, -1)
                j = torch.as_tensor(idx, dtype=torch.long)
                w[j // w.shape[2], :, j % w.shape[2]] = 0
            elif getattr(m, "weight", None) is not None:
                m.weight[idx] = 0
            for p in ("bias", "running_mean"):
                t = getattr(m, p, None)
                if t is not None:
                    t[idx] = 0
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                mask = torch.ones(m.normalized_shape[-1], dtype=torch.bool)
                mask[idx] = False
                kept[id(m.weight)] = mask
    return _Reference(ref, kept)


def relative_error(model: nn.Module, pruned: nn.Module, plan: PrunePlan, *inputs: torch.Tensor) -> float:
    """|pruned(x) - reference(x)| / |reference(x)|, both in eval mode."""
    ref = zeroed_reference(model, plan).eval()
    with torch.no_grad():
        expected, got = ref(*inputs), pruned.eval()(*inputs)
    return ((got - expected).norm() / expected.norm()).item()
