"""Slice parameters so that removed channels are physically gone."""

from __future__ import annotations

import torch
from torch import nn


def _keep(n: int, removed: list[int] | None) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    if removed:
        mask[torch.as_tensor(removed, dtype=torch.long)] = False
    return mask.nonzero().flatten()


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    # `value` comes from indexing, which already copies: no clone needed
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.detach())


def _conv(m: nn.Conv2d, out: torch.Tensor, inp: torch.Tensor) -> None:
    depthwise = m.groups > 1 and m.groups == m.in_channels
    weight = m.weight.index_select(0, out) if depthwise else m.weight.index_select(0, out).index_select(1, inp)
    _set(m, "weight", weight)
    if m.bias is not None:
        _set(m, "bias", m.bias[out])
    m.out_channels = len(out)
    m.in_channels = len(inp)
    if depthwise:
        if len(out) % len(inp):
            raise ValueError(f"depthwise conv would get {len(out)} filters for {len(inp)} inputs")
        m.groups = len(inp)


def _linear(m: nn.Linear, out: torch.Tensor, inp: torch.Tensor) -> None:
    _set(m, "weight", m.weight.index_select(0, out).index_select(1, inp))
    if m.bias is not None:
        _set(m, "bias", m.bias[out])
    m.out_features, m.in_features = len(out), len(inp)


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, out: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            _set(m, name, getattr(m, name)[out])
    m.num_features = len(out)


def in_out_sizes(m: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a prunable module."""
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features, m.num_features
    raise TypeError(f"{type(m).__name__} is not prunable")


def remove_channels(model: nn.Module, removed: dict[str, list[int]], removed_in: dict[str, list[int]]) -> None:
    """Remove output channels ``removed[name]`` and input channels ``removed_in[name]`` in place."""
    for name in sorted(set(removed) | set(removed_in)):
        m = model.get_submodule(name)
        n_in, n_out = in_out_sizes(m)
        out = _keep(n_out, removed.get(name))
        inp = _keep(n_in, removed_in.get(name))
        with torch.no_grad():
            if isinstance(m, nn.Conv2d):
                _conv(m, out, inp)
            elif isinstance(m, nn.Linear):
                _linear(m, out, inp)
            else:
                _batchnorm(m, out)
