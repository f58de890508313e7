"""Trace a network with torch.fx and find which channels must be removed together.

Every channel that a conv or Linear produces gets an integer *label*. Walking the traced
graph, each tensor carries the label of each of its channels and the dim they sit on (1, or
the last one in channels-last code), so wherever a label goes — norm layers, depthwise and
grouped convs, concat offsets, flatten into a Linear, a permute — is recorded as a
*member*: (module, role, label per position). Ops that force channels to be equal
(residual add, squeeze-excitation mul) *tie* labels with a union-find; ties to label 0,
``FIXED``, mean "never remove" (network inputs and outputs, zero padding, unknown
parameters). A *unit* is a set of tied labels, removed as one; a *layer* is the set of
units sharing producers, ranked and rounded together.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

FIXED = 0


class PruningError(ValueError):
    """The pruner refuses: the message names the argument, op or module and the fix."""


# Modules and functions that keep every channel where it is (0 stays 0 for the
# element-wise ones, which the zeroed-channel equivalence relies on).
_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)
# These act on the dims after the channels, so they need channels-first tensors.
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_POINTWISE_FUNCTIONS = {
    "relu", "relu_", "relu6", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh",
    "hardswish", "hardsigmoid", "mish", "softplus", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "clamp", "clamp_", "contiguous", "clone", "detach", "float", "double", "to",
    "stochastic_depth", "neg", "abs",
}
_SPATIAL_FUNCTIONS = {
    f"{kind}_pool{d}d" for kind in ("adaptive_avg", "adaptive_max", "max", "avg") for d in (1, 2, 3)
} | {"interpolate", "upsample"}
_ELEMENTWISE_BINARY = {"add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul",
                       "truediv", "div", "div_", "itruediv"}
_METADATA = {"size", "dim", "getattr", "numel", "_assert", "is_floating_point"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [FIXED]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == FIXED:  # keep FIXED as the root of its class
            ra, rb = rb, ra
        self.parent[rb] = ra

    def fixed(self, x: int) -> bool:
        return self.find(x) == self.find(FIXED)


@dataclass
class Member:
    """Where channels of the network are stored in one module's parameters."""

    module: str
    # "out": conv/linear filters; "in": conv/linear inputs; "bn": a norm layer's channels; "dw": depthwise
    # conv; "param": a per-channel parameter, ``module`` being its qualified name
    role: str
    labels: list[int]
    mult: int = 1  # depthwise: output channels per input channel
    units: torch.Tensor | None = None  # unit index per position, -1 where fixed


@dataclass
class ChannelGraph:
    """The result of analysing a network: what can be removed, and from where."""

    members: list[Member]
    unit_of_label: list[int]  # label -> unit index, -1 when the label is fixed
    layers: list[list[int]]  # unit indices ranked and rounded together
    producer_sizes: list[list[tuple[int, int]]]  # per layer, per producer: (channels, removable units)
    layer_producers: list[list[str]]  # per layer, its producer modules in the order of producer_sizes
    producer: dict[int, tuple[str, int]]  # label -> (module, output channel)
    module_flops: dict[str, int]  # conv/linear FLOPs of one forward of the example inputs
    kept_whole: dict[str, str] = field(default_factory=dict)  # module -> type: unknown types nothing live reached
    num_units: int = 0
    unit_layer: list[int] = field(default_factory=list)
    clamped: set[int] = field(default_factory=set)  # layers the guards stopped short of the asked ratio

    @property
    def layer_width(self) -> list[int]:
        """Channels a ratio applies to: the narrowest producer's, so none loses more than the ratio
        (a CIFAR ResNet's 16-wide stem is tied through zero padding to its 64-wide last stage)."""
        return [min(width for width, _ in sizes) for sizes in self.producer_sizes]

    @property
    def total_flops(self) -> int:
        return sum(self.module_flops.values())


def matches(name: str, pattern: str) -> bool:
    """How ``ignore`` and ``ratios`` name modules: exactly, by a parent module, or by a shell pattern."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] or "<root>"
    return "<root>"


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    target = node.target
    return getattr(target, "__name__", str(target)).strip("_") if not isinstance(target, str) else target


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; all mean the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PruningError(
            f"model: {type(model).__name__} cannot be traced by torch.fx ({first}); "
            "remove data-dependent control flow from forward() or prune a traceable model"
        ) from exc


class _Analyser:
    def __init__(self, gm: fx.GraphModule, model: nn.Module, ignore: tuple[str, ...]):
        self.gm = gm
        self.model = model  # the traced copy holds only the parameters of modules it traced through
        self.ignore = ignore
        self.uf = _UnionFind()
        self.slots: dict[fx.Node, list[int]] = {}  # labels along the tensor's channel axis
        self.axis: dict[fx.Node, int] = {}  # which dim that is (1, or the last one when channels-last)
        self.pieces: dict[fx.Node, list[tuple[list[int], int]]] = {}  # chunk/split results: (labels, axis) each
        self.members: dict[tuple[str, str], list[int]] = {}
        self.dw_mult: dict[str, int] = {}
        self.producer_labels: dict[str, list[int]] = {}
        self.producer: dict[int, tuple[str, int]] = {}
        self.flops: dict[str, int] = {}
        self.kept_whole: dict[str, str] = {}  # parametrised modules of unknown type that nothing live reached
        # A tensor's channel count read at run time (x.shape[1], x.size(1), numel) shrinks with the pruning:
        self.shapes: dict[fx.Node, fx.Node] = {}  # a whole-shape value -> the tensor it describes
        self.reads: dict[fx.Node, set[fx.Node]] = {}  # a value -> the tensors whose channel count it carries
        self.same_width: list[tuple[fx.Node, fx.Node]] = []  # (read tensor, tensor a view shapes with that count)

    # -- helpers -----------------------------------------------------------
    def _ignored(self, name: str) -> bool:
        return any(matches(name, i) for i in self.ignore)

    def _fixed_slots(self, node: fx.Node) -> tuple[list[int], int] | None:
        shape = _shape(node)
        return ([FIXED] * shape[1], 1) if shape is not None and len(shape) >= 2 else None

    def _member(self, module: str, role: str, labels: list[int]) -> None:
        key = (module, role)
        if key in self.members:  # a module called twice must see the same channels both times
            self._tie(self.members[key], labels)
        else:
            self.members[key] = list(labels)

    def _produce(self, module: str, n: int) -> list[int]:
        if module not in self.producer_labels:
            labels = [self.uf.new() for _ in range(n)]
            for i, label in enumerate(labels):
                self.producer[label] = (module, i)
                if self._ignored(module):
                    self.uf.union(FIXED, label)
            self.producer_labels[module] = labels
        return self.producer_labels[module]

    def _fix(self, labels) -> None:
        for label in labels:
            self.uf.union(FIXED, label)

    def _tie(self, a, b) -> None:
        for x, y in zip(a, b):
            self.uf.union(x, y)

    def _tie_blocks(self, labels: list[int], blocks: int) -> None:
        """Tie position r of every block: a removal then takes the same positions from each block,
        which keeps the blocks (conv groups, chunks, a reshaped factor) equal in width."""
        size = len(labels) // blocks
        for k in range(1, blocks):
            self._tie(labels[:size], labels[k * size:(k + 1) * size])

    def _live(self, node) -> bool:
        return node in self.slots and any(not self.uf.fixed(x) for x in self.slots[node])

    def _tensor_args(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs),
                        lambda a: found.append(a) if a in self.slots or a in self.pieces else None)
        return found

    def _unknown(self, node: fx.Node, what: str):
        """An op we do not understand: safe only if no removable channel flows into it."""
        labels = [x for a in self._tensor_args(node)
                  for x in (self.slots[a] if a in self.slots else [y for p, _ in self.pieces[a] for y in p])]
        live = sorted({self.producer[x][0] for x in labels if not self.uf.fixed(x) and x in self.producer})
        if live:
            raise PruningError(
                f"cannot prune through {what} '{_op_name(node)}' in module '{_module_path(node)}' "
                f"(fx node {node.name}): it may mix channels; pass ignore={live[:4]} "
                "to keep the channels that reach it"
            )
        return self._fixed_slots(node)

    def _channels(self, node: fx.Node, dim: int) -> list[int] | None:
        """The labels along ``dim``, or None when removable channels sit on another dim. A tensor with
        no removable channel has fixed channels along any dim."""
        shape = _shape(node)
        dim %= len(shape)
        if self.axis.get(node, 1) == dim:
            return self.slots[node]
        return None if self._live(node) else [FIXED] * shape[dim]

    def _arg(self, node: fx.Node, i: int, name: str, default=None):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    # -- modules -----------------------------------------------------------
    def _conv(self, node: fx.Node, name: str, m: nn.modules.conv._ConvNd):
        src = node.args[0]
        x = self._channels(src, 1)
        if x is None:
            return self._unknown(node, f"{type(m).__name__} on a channels-last tensor:")
        spatial = math.prod((_shape(src) if m.transposed else _shape(node))[2:])
        # per output (input, for a transposed conv) position: one multiply-add per weight it meets
        self.flops[name] = self.flops.get(name, 0) + 2 * _shape(node)[0] * spatial * m.weight.numel()
        if m.groups == 1:
            self._member(name, "in", x)
            return self._produce(name, m.out_channels), 1
        if m.groups == m.in_channels:
            mult = m.out_channels // m.in_channels
            out = [x[j // mult] for j in range(m.out_channels)]
            if self._ignored(name):
                self._fix(out)
            self._member(name, "dw", out)
            self.dw_mult[name] = mult
            return out, 1
        # Grouped conv: remove the same positions from every group, on each side, so the groups stay equal.
        self._tie_blocks(x, m.groups)
        self._member(name, "in", x)
        out = self._produce(name, m.out_channels)
        self._tie_blocks(out, m.groups)
        return out, 1

    def _linear(self, node: fx.Node, name: str, m: nn.Linear):
        src = node.args[0]
        shape = _shape(src)
        x = self._channels(src, -1)
        if x is None:
            return self._unknown(node, "Linear on a tensor whose last dim is not its channels:")
        self.flops[name] = self.flops.get(name, 0) + 2 * math.prod(shape[:-1]) * m.in_features * m.out_features
        self._member(name, "in", x)
        return self._produce(name, m.out_features), len(shape) - 1

    def _norm(self, node: fx.Node, name: str, m: nn.Module):
        src = node.args[0]
        rank, axis = len(_shape(src)), self.axis.get(src, 1)
        if isinstance(m, nn.LayerNorm):
            dims = range(rank - len(m.normalized_shape), rank)
            if axis not in dims:
                return self.slots[src], axis  # statistics per channel: channels stay independent
            if len(m.normalized_shape) != 1:
                return self._unknown(node, "LayerNorm over channels and other dims:")
        elif axis != 1:
            return self._unknown(node, f"{type(m).__name__} on a channels-last tensor:")
        x = self.slots[src]
        if isinstance(m, nn.GroupNorm):  # whole groups only: a group's statistics span all its channels
            size = len(x) // m.num_groups
            for k in range(m.num_groups):
                self._tie(x[k * size:(k + 1) * size], x[k * size + 1:(k + 1) * size])
        if self._ignored(name):
            self._fix(x)
        self._member(name, "bn", x)
        return x, axis

    def _call_module(self, node: fx.Node):
        name = str(node.target)
        m = self.gm.get_submodule(name)
        if isinstance(m, nn.modules.conv._ConvNd):
            return self._conv(node, name, m)
        if isinstance(m, nn.Linear):
            return self._linear(node, name, m)
        if isinstance(m, _NORMS):
            return self._norm(node, name, m)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, m.start_dim, m.end_dim)
        if isinstance(m, _POINTWISE_MODULES):
            return self.slots[node.args[0]], self.axis[node.args[0]]
        if isinstance(m, _SPATIAL_MODULES):
            return self._spatial(node)
        if any(True for _ in m.parameters()):
            self.kept_whole[name] = type(m).__name__
        return self._unknown(node, f"module {type(m).__name__}")

    # -- functions and methods ---------------------------------------------
    def _spatial(self, node: fx.Node):
        """Pooling and resizing act on the dims after the channels."""
        src = node.args[0]
        if src not in self.slots:
            return self._unknown(node, "op")
        if self.axis[src] != 1:
            return self._unknown(node, "spatial op on a channels-last tensor:")
        return self.slots[src], 1

    def _layer_norm(self, node: fx.Node):
        """F.layer_norm as a LayerNorm's own forward calls it (e.g. torchvision's LayerNorm2d)."""
        src = node.args[0]
        shape, axis = _shape(src), self.axis.get(src, 1)
        normalized = self._arg(node, 1, "normalized_shape")
        if axis < len(shape) - len(normalized):
            return self.slots[src], axis
        weight = self._arg(node, 2, "weight")
        owner = weight.target.rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
        module = self.model.get_submodule(owner) if owner is not None else None
        # its forward passes self.normalized_shape, which surgery updates; a literal shape would not follow
        if len(normalized) != 1 or not isinstance(module, nn.LayerNorm):
            return self._unknown(node, "layer_norm over channels, not from a LayerNorm module,")
        x = self.slots[src]
        if self._ignored(owner):
            self._fix(x)
        self._member(owner, "bn", x)
        return x, axis

    def _param_member(self, node: fx.Node, aligned_dim: int, labels: list[int]) -> None:
        """A per-channel parameter (e.g. ConvNeXt's layer scale) sliced with the channels it scales."""
        shape = _shape(node)
        if sum(s > 1 for s in shape) == 1 and shape[aligned_dim] == len(labels) and not self._ignored(node.target):
            self._member(node.target, "param", labels)
        else:
            self._fix(labels)

    def _binary(self, node: fx.Node):
        out_shape = _shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self._unknown(node, "op")
        rank = len(out_shape)
        operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        live = [a for a in operands if self._live(a)]
        if not live:
            return self._fixed_slots(node)
        axes = {self.axis[a] + rank - len(_shape(a)) for a in live}
        if len(axes) > 1:
            return self._unknown(node, "op on tensors with channels on different dims:")
        t = axes.pop()
        width = out_shape[t]
        for a in live:
            if len(self.slots[a]) != width:  # one channel broadcast over all: keep it
                self._fix(self.slots[a])
        live = [a for a in live if len(self.slots[a]) == width]
        if not live:
            return self._fixed_slots(node)
        labels = self.slots[live[0]]
        for a in live[1:]:
            self._tie(labels, self.slots[a])
        if _op_name(node).strip("i").rstrip("_") in ("add", "sub") and any(
                isinstance(a, (int, float)) and a != 0 for a in node.args):
            self._fix(labels)  # a zeroed channel plus a constant is no longer zero
        for a in operands:
            shape = _shape(a)
            if a in live or shape is None:
                continue
            dim = t - (rank - len(shape))
            if dim < 0 or shape[dim] == 1:
                continue  # broadcast along channels: no channel of its own
            if a.op == "get_attr":
                self._param_member(a, dim, labels)
            else:  # another tensor with one value per channel pins those channels
                self._fix(labels)
        return labels, t

    def _cat(self, node: fx.Node):
        tensors = self._arg(node, 0, "tensors")
        rank = len(_shape(node))
        dim = self._arg(node, 1, "dim", 0) % rank
        live = [t for t in tensors if self._live(t)]
        if not live:
            return self._fixed_slots(node)
        axes = {self.axis[t] for t in live}
        if len(axes) > 1:
            return self._unknown(node, "cat of tensors with channels on different dims:")
        t = axes.pop()
        if dim == t:
            return [x for a in tensors for x in (self.slots[a] if a in live else [FIXED] * _shape(a)[t])], t
        first = self.slots[live[0]]
        for a in tensors:
            if a in live:
                self._tie(first, self.slots[a])
            elif _shape(a)[t] > 1:
                self._fix(first)
        return first, t

    def _chunk(self, node: fx.Node) -> None:
        """torch.chunk/split along channels: pieces of equal width, so every piece loses the same positions."""
        src = node.args[0]
        name = _op_name(node)
        shape = _shape(src)
        labels, axis = self.slots[src], self.axis[src]
        size_arg = self._arg(node, 1, "chunks" if name == "chunk" else "split_size_or_sections")
        dim = self._arg(node, 2, "dim", 0) % len(shape)
        metas = node.meta["tensor_meta"]
        if dim != axis:
            self.pieces[node] = [(labels, axis) for _ in metas]
            return
        widths = [tuple(meta.shape)[axis] for meta in metas]
        # chunk(n) recomputes the cut from the pruned width; split's sizes are literals in the code
        if name == "chunk" and isinstance(size_arg, int) and len(set(widths)) == 1:
            self._tie_blocks(labels, len(widths))
        else:
            self._fix(labels)
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        self.pieces[node] = [(labels[o:o + w], axis) for o, w in zip(offsets, widths)]

    def _getitem(self, node: fx.Node):
        src, index = node.args
        if src in self.pieces:
            return self.pieces[src][index] if isinstance(index, int) else self._unknown(node, "indexing")
        if src not in self.slots:
            return self._unknown(node, "indexing")
        labels, axis = self.slots[src], self.axis[src]
        rank = len(_shape(src))
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) or not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index):
            return self._unknown(node, "indexing")
        consumed = sum(not (i is None or i is Ellipsis) for i in index)
        dim, out_dim, new_axis = 0, 0, None
        for i in index:
            if i is Ellipsis:
                skip = rank - consumed
                if dim <= axis < dim + skip:
                    new_axis = out_dim + axis - dim
                dim, out_dim = dim + skip, out_dim + skip
            elif i is None:
                out_dim += 1
            else:
                if dim == axis:
                    if i != slice(None):  # literal positions would pick other channels once some are gone
                        self._fix(labels)
                        return self._fixed_slots(node)
                    new_axis = out_dim
                dim += 1
                out_dim += isinstance(i, slice)
        if new_axis is None:  # the channel dim is beyond the index
            new_axis = out_dim + axis - dim
        return labels, new_axis

    def _pad(self, node: fx.Node):
        src = node.args[0]
        pad = self._arg(node, 1, "pad")
        rank, axis = len(_shape(src)), self.axis[src]
        pairs = len(pad) // 2
        if pairs <= rank - 1 - axis:
            return self.slots[src], axis
        if pairs == rank - axis:
            left, right = pad[2 * (rank - 1 - axis)], pad[2 * (rank - 1 - axis) + 1]
            if isinstance(left, int) and isinstance(right, int) and left >= 0 and right >= 0:
                return [FIXED] * left + self.slots[src] + [FIXED] * right, axis
        return self._unknown(node, "pad")

    def _reduction(self, node: fx.Node):
        src = node.args[0]
        rank, axis = len(_shape(src)), self.axis[src]
        dims = self._arg(node, 1, "dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if dims is None or not isinstance(dims, (tuple, list)) or any(d % rank in (0, axis) for d in dims):
            self._fix(self.slots[src])  # channels are mixed into one value: keep them all
            return self._fixed_slots(node)
        keepdim = self._arg(node, 2, "keepdim", False)
        return self.slots[src], axis - (0 if keepdim else sum(d % rank < axis for d in dims))

    def _permute(self, node: fx.Node):
        src = node.args[0]
        rank, axis = len(_shape(src)), self.axis[src]
        name = _op_name(node)
        if name in ("transpose", "swapaxes"):
            a, b = (d % rank for d in node.args[1:3])
            order = list(range(rank))
            order[a], order[b] = b, a
        else:
            order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            order = [d % rank for d in (order or node.kwargs["dims"])]
        return self.slots[src], order.index(axis)

    def _unsqueeze(self, node: fx.Node):
        src = node.args[0]
        rank, axis = len(_shape(node)), self.axis[src]
        dim = self._arg(node, 1, "dim") % rank
        return self.slots[src], axis + (dim <= axis)

    def _flatten(self, node: fx.Node, start: int, end: int):
        rank = len(_shape(node.args[0]))
        start, end = start % rank, end % rank
        sizes = [None] * start + [-1] + [None] * (rank - 1 - end)
        return self._reshape(node, sizes)

    def _reshape(self, node: fx.Node, sizes=None):
        """How the channel dim maps through view/reshape/flatten: kept, merged with its neighbours (each
        channel repeats over them), or split into several dims of which exactly one's size is computed
        at run time (ShuffleNet's view(n, groups, c // groups, h, w)): the others become fixed factors."""
        src = node.args[0]
        before, after = _shape(src), _shape(node)
        labels, axis = self.slots[src], self.axis[src]
        if sizes is None:
            sizes = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            if len(sizes) != len(after):  # a whole shape computed at run time (x.view(y.shape))
                sizes = [None] * len(after)
        # a literal width would be wrong after pruning; -1 and sizes computed at run time follow it
        literal = [isinstance(s, int) and s != -1 for s in sizes]
        head = math.prod(before[:axis])
        prefix = [math.prod(after[:k]) for k in range(len(after) + 1)]
        tail = head * before[axis]
        if head in prefix and tail in prefix:  # the channel dim maps onto whole output dims
            k0 = prefix.index(head)
            while k0 < len(after) and after[k0] == 1 and prefix[k0 + 1] != tail:
                k0 += 1
            k1 = prefix.index(tail, k0) - 1
            if k0 == k1:
                if literal[k0]:
                    self._fix(labels)
                return labels, k0
            dynamic = [k for k in range(k0, k1 + 1) if not literal[k]]
            if len(dynamic) != 1:
                self._fix(labels)
                return self._fixed_slots(node)
            t = dynamic[0]
            inner = math.prod(after[t + 1:k1 + 1])
            blocks = [[labels[j] for j in range(len(labels)) if (j // inner) % after[t] == r]
                      for r in range(after[t])]
            for block in blocks:
                self._tie(block, block[1:])
            return [block[0] for block in blocks], t
        for k in range(len(after)):  # the channel dim merges with neighbours into output dim k
            if prefix[k] <= head and tail <= prefix[k + 1] and head % prefix[k] == 0 and prefix[k + 1] % tail == 0:
                if literal[k]:
                    self._fix(labels)
                inner = prefix[k + 1] // tail  # positions of the merged dims after the channel dim
                return [labels[(j // inner) % len(labels)] for j in range(after[k])], k
        return self._unknown(node, "reshape")

    def _size_read(self, node: fx.Node, name: str) -> bool:
        """Note what a shape, size or numel read (or arithmetic on one) carries; True when ``node`` is one."""
        src = node.args[0] if node.args else None
        if name == "getattr" and len(node.args) > 1 and node.args[1] == "shape" and src in self.slots:
            self.shapes[node] = src
        elif name == "size" and src in self.slots:
            dim = self._arg(node, 1, "dim")
            if dim is None:
                self.shapes[node] = src
            elif dim % len(_shape(src)) == self.axis[src]:
                self.reads[node] = {src}
        elif name == "numel" and src in self.slots:
            self.reads[node] = {src}
        elif node.target is operator.getitem and src in self.shapes:
            tensor, index = self.shapes[src], node.args[1]
            positions = range(len(_shape(tensor)))
            picked = positions[index] if isinstance(index, (int, slice)) else positions
            if self.axis[tensor] in (picked if isinstance(picked, range) else [picked]):
                self.reads[node] = {tensor}
        else:
            return False
        return True

    def _carried(self, node: fx.Node) -> set[fx.Node]:
        """The tensors whose run-time channel count reaches ``node`` through its arguments."""
        found: set[fx.Node] = set()
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.update(
            self.reads.get(a, ()) or ({self.shapes[a]} if a in self.shapes else ())))
        return found

    def _follow_sizes(self, node: fx.Node, name: str) -> None:
        """A channel count read at run time must still be right once channels are gone. Arithmetic on it carries
        it on; a view of a tensor may take it when both end up equally wide (checked in `settle_widths`, as in
        ShuffleNet's channel shuffle); anything else that takes it keeps those channels whole (MaxViT's attention
        reshapes its output to its input's width)."""
        carried = self._carried(node)
        if not carried:
            return
        src = node.args[0] if node.args else None
        if _shape(node) is None:  # an int or a tuple of them
            self.reads[node] = carried
        elif name in ("view", "reshape") and src in self.slots:
            self.same_width += [(read, src) for read in carried]
        else:
            for read in carried:
                self._fix(self.slots[read])

    def settle_widths(self) -> None:
        """Keep whole both sides of a view whose run-time width and the tensor it shapes would differ: their
        channels must be the same channel groups (a shuffle holds them in another order and split over dims)."""
        for read, shaped in self.same_width:
            roots = [{self.uf.find(x) for x in self.slots[n]} for n in (read, shaped)]
            if roots[0] != roots[1]:
                self._fix(self.slots[read])
                self._fix(self.slots[shaped])

    def _call(self, node: fx.Node):
        name = _op_name(node)
        if self._size_read(node, name):
            return None
        self._follow_sizes(node, name)
        if node.op == "call_function" and node.target in (operator.getitem,):
            return self._getitem(node)
        if name in _METADATA:
            return None
        if name in ("chunk", "split") and node.args and node.args[0] in self.slots \
                and isinstance(node.meta.get("tensor_meta"), (tuple, list)):
            return self._chunk(node)
        if _shape(node) is None:  # returns no tensor (e.g. a tuple): its outputs are opaque
            return self._unknown(node, "op")
        first = node.args[0] if node.args else None
        if name in ("cat", "concat", "concatenate"):
            return self._cat(node)
        if name in _ELEMENTWISE_BINARY:  # `1 - x` too: the tensor need not come first
            return self._binary(node)
        if first not in self.slots:
            return self._unknown(node, "op")
        if name in _POINTWISE_FUNCTIONS:
            return self.slots[first], self.axis[first]
        if name in _SPATIAL_FUNCTIONS:
            return self._spatial(node)
        if name == "flatten":
            return self._flatten(node, self._arg(node, 1, "start_dim", 0), self._arg(node, 2, "end_dim", -1))
        if name in ("view", "reshape"):
            return self._reshape(node)
        if name in ("permute", "transpose", "swapaxes"):
            return self._permute(node)
        if name == "unsqueeze":
            return self._unsqueeze(node)
        if name == "layer_norm":
            return self._layer_norm(node)
        if name == "pad":
            return self._pad(node)
        if name in _REDUCTIONS:
            return self._reduction(node)
        return self._unknown(node, "op")

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                result = self._fixed_slots(node)
            elif node.op == "output":
                fx.node.map_arg(node.args, lambda a: self._fix(self.slots.get(a, ())))
                continue
            elif node.op == "call_module":
                result = self._call_module(node)
            else:
                result = self._call(node)
            if result is not None:
                self.slots[node], self.axis[node] = result


def analyse(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], ignore=()) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and return its channel dependency graph."""
    gm = trace(model)
    was_training = model.training
    gm.eval()
    try:
        # ShapeProp prints a traceback before raising; the error below says it in one line
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except PruningError:
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc
        first = (str(cause).strip().splitlines() or [""])[0]
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        raise PruningError(
            f"example_inputs: {type(model).__name__} fails on inputs of shape {shapes} "
            f"({type(cause).__name__}: {first}); pass inputs of the shape the model expects"
        ) from exc
    finally:
        model.train(was_training)
    analyser = _Analyser(gm, model, tuple(ignore))
    analyser.run()
    analyser.settle_widths()
    return _finish(analyser)


def _finish(a: _Analyser) -> ChannelGraph:
    uf = a.uf
    members = [Member(module, role, labels, a.dw_mult.get(module, 1)) for (module, role), labels in a.members.items()]
    members += [Member(module, "out", labels) for module, labels in a.producer_labels.items()]

    unit_of_root: dict[int, int] = {}
    unit_of_label = [-1] * len(uf.parent)
    for label in range(1, len(uf.parent)):
        if uf.fixed(label):
            continue
        root = uf.find(label)
        unit_of_label[label] = unit_of_root.setdefault(root, len(unit_of_root))
    num_units = len(unit_of_root)
    for m in members:
        m.units = torch.as_tensor([unit_of_label[x] for x in m.labels], dtype=torch.long)

    # Units are in one layer when they share a producer module (residual stages span many).
    layer_uf = _UnionFind()
    for _ in range(num_units + len(a.producer_labels)):
        layer_uf.new()
    module_index = {m: num_units + 1 + i for i, m in enumerate(a.producer_labels)}
    for label, (module, _) in a.producer.items():
        unit = unit_of_label[label]
        if unit >= 0:
            layer_uf.union(unit + 1, module_index[module])
    layers_by_root: dict[int, list[int]] = {}
    for unit in range(num_units):
        layers_by_root.setdefault(layer_uf.find(unit + 1), []).append(unit)
    layers = list(layers_by_root.values())
    unit_layer = [0] * num_units
    for i, units in enumerate(layers):
        for u in units:
            unit_layer[u] = i
    layer_modules: list[set[str]] = [set() for _ in layers]
    for label, (module, _) in a.producer.items():
        if unit_of_label[label] >= 0:
            layer_modules[unit_layer[unit_of_label[label]]].add(module)

    def sizes(module: str) -> tuple[int, int]:  # tied outputs (e.g. a depthwise multiplier) count once
        labels = a.producer_labels[module]
        units = len({unit_of_label[x] for x in labels if unit_of_label[x] >= 0})
        return units + sum(unit_of_label[x] < 0 for x in labels), units

    layer_producers = [sorted(modules) for modules in layer_modules]
    producer_sizes = [[sizes(m) for m in modules] for modules in layer_producers]
    return ChannelGraph(
        members=members, unit_of_label=unit_of_label, layers=layers, producer_sizes=producer_sizes,
        layer_producers=layer_producers, kept_whole=a.kept_whole,
        producer=a.producer, module_flops=a.flops, num_units=num_units, unit_layer=unit_layer,
    )
