"""Slice parameters so that removed channels are physically gone."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def _keep(n: int, removed: list[int] | None) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.as_tensor(removed or [], dtype=torch.long)] = False
    return mask.nonzero().flatten()


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    value = value.detach()  # it comes from indexing, which already copies: no clone needed
    setattr(module, name, nn.Parameter(value, old.requires_grad) if isinstance(old, nn.Parameter) else value)


def _per_group(keep: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(groups that keep any position, their kept positions inside the group: one row each), or None when the
    groups keep unequal counts. Vectorised: a depthwise conv has as many groups as channels."""
    groups, counts = torch.unique_consecutive(keep // size, return_counts=True)  # keep is sorted
    if len(counts) and (counts != counts[0]).any():
        return None
    return groups, keep.view(len(groups), -1) - groups.view(-1, 1) * size


def _conv(m: _ConvNd, out: torch.Tensor, inp: torch.Tensor) -> None:
    # weight: (out, in / groups, *k), or (in, out / groups, *k) when transposed
    full, part = (inp, out) if m.transposed else (out, inp)
    part_size = (m.out_channels if m.transposed else m.in_channels) // m.groups
    full_size = (m.in_channels if m.transposed else m.out_channels) // m.groups
    weight = m.weight.index_select(0, full)
    if m.groups == 1:
        weight = weight.index_select(1, part)
    else:
        parts, fulls = _per_group(part, part_size), _per_group(full, full_size)
        if parts is None or fulls is None or not torch.equal(parts[0], fulls[0]):
            raise ValueError(f"grouped conv: keeping inputs {inp.tolist()} and outputs {out.tolist()} "
                             f"leaves groups of unequal width")
        # each kept row keeps its own group's kept positions (the same count in every group)
        index = parts[1][torch.searchsorted(parts[0], full // full_size)]
        weight = weight.gather(1, index.view(*index.shape, *[1] * (weight.dim() - 2)).expand(
            -1, -1, *weight.shape[2:]))
        m.groups = len(parts[0])
    _set(m, "weight", weight)
    m.out_channels, m.in_channels = len(out), len(inp)


def _norm(m: nn.Module, out: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            _set(m, name, getattr(m, name)[out])
    if isinstance(m, nn.GroupNorm):  # the analysis removes whole groups
        m.num_groups = m.num_groups * len(out) // m.num_channels
        m.num_channels = len(out)
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (len(out),)
    else:
        m.num_features = len(out)


def _channel_dim(p: torch.Tensor) -> int:
    """A per-channel parameter's one dim longer than 1."""
    dims = [d for d, s in enumerate(p.shape) if s > 1]
    if len(dims) != 1:
        raise ValueError(f"parameter of shape {tuple(p.shape)} is not per-channel")
    return dims[0]


def _target(model: nn.Module, name: str) -> nn.Module | torch.Tensor:
    """A module, or a per-channel parameter or buffer (plans name those by their qualified name)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        owner, _, attr = name.rpartition(".")
        value = getattr(model.get_submodule(owner), attr)
        if not isinstance(value, torch.Tensor):
            raise
        return value


def in_out_sizes(m: nn.Module | torch.Tensor) -> tuple[int, int]:
    """(input channels, output channels) of a prunable module or per-channel parameter."""
    if isinstance(m, _ConvNd):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, m.num_channels
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[-1], m.normalized_shape[-1]
    if isinstance(m, _NORMS):
        return m.num_features, m.num_features
    if isinstance(m, torch.Tensor):
        return m.shape[_channel_dim(m)], m.shape[_channel_dim(m)]
    raise TypeError(f"{type(m).__name__} is not prunable")


def sizes_of(model: nn.Module, name: str) -> tuple[int, int]:
    return in_out_sizes(_target(model, name))


def remove_channels(model: nn.Module, removed: dict[str, list[int]], removed_in: dict[str, list[int]]) -> None:
    """Remove output channels ``removed[name]`` and input channels ``removed_in[name]`` in place."""
    for name in sorted(set(removed) | set(removed_in)):
        m = _target(model, name)
        n_in, n_out = in_out_sizes(m)
        out = _keep(n_out, removed.get(name))
        inp = _keep(n_in, removed_in.get(name))
        with torch.no_grad():
            if isinstance(m, _ConvNd):
                _conv(m, out, inp)
            elif isinstance(m, nn.Linear):
                _set(m, "weight", m.weight.index_select(0, out).index_select(1, inp))
                m.out_features, m.in_features = len(out), len(inp)
            elif isinstance(m, torch.Tensor):
                owner, _, attr = name.rpartition(".")
                _set(model.get_submodule(owner), attr, m.index_select(_channel_dim(m), out))
            else:
                _norm(m, out)
            if isinstance(m, (_ConvNd, nn.Linear)) and m.bias is not None:
                _set(m, "bias", m.bias[out])
