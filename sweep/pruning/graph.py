"""Trace a network with torch.fx and find which channels must be removed together.

Every channel that a Conv2d or Linear produces gets an integer *label*. Walking the traced
graph, each tensor carries the label of each of its channels (dim 1), so wherever a label
goes — BatchNorm, depthwise convs, concat offsets, flatten into a Linear — is recorded as a
*member*: (module, role, label per position). Ops that force channels to be equal
(residual add, squeeze-excitation mul) *tie* labels with a union-find; ties to label 0,
``FIXED``, mean "never remove" (network inputs and outputs, zero padding, unknown
parameters). A *unit* is a set of tied labels, removed as one; a *layer* is the set of
units sharing producers, ranked and rounded together.
"""

from __future__ import annotations

import fnmatch
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
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Upsample, nn.ZeroPad2d,
)
_PASS_FUNCTIONS = {
    "relu", "relu_", "relu6", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh",
    "hardswish", "hardsigmoid", "mish", "softplus", "dropout", "dropout2d", "alpha_dropout",
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool2d", "avg_pool2d", "interpolate",
    "upsample", "clamp", "clamp_", "contiguous", "clone", "detach", "float", "double", "to",
    "stochastic_depth", "neg", "abs",
}
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
    role: str  # "out": conv/linear filters; "in": conv/linear inputs; "bn": batch norm; "dw": depthwise conv
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
    def __init__(self, gm: fx.GraphModule, ignore: tuple[str, ...]):
        self.gm = gm
        self.ignore = ignore
        self.uf = _UnionFind()
        self.slots: dict[fx.Node, list[int]] = {}
        self.members: dict[tuple[str, str], list[int]] = {}
        self.dw_mult: dict[str, int] = {}
        self.producer_labels: dict[str, list[int]] = {}
        self.producer: dict[int, tuple[str, int]] = {}
        self.flops: dict[str, int] = {}

    # -- helpers -----------------------------------------------------------
    def _ignored(self, name: str) -> bool:
        return any(matches(name, i) for i in self.ignore)

    def _fixed_slots(self, node: fx.Node) -> list[int] | None:
        shape = _shape(node)
        return [FIXED] * shape[1] if shape is not None and len(shape) >= 2 else None

    def _member(self, module: str, role: str, labels: list[int]) -> None:
        key = (module, role)
        if key in self.members:  # a module called twice must see the same channels both times
            for a, b in zip(self.members[key], labels):
                self.uf.union(a, b)
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

    def _tensor_args(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if a in self.slots else None)
        return found

    def _unknown(self, node: fx.Node, what: str) -> list[int] | None:
        """An op we do not understand: safe only if no removable channel flows into it."""
        inputs = self._tensor_args(node)
        live = [a for a in inputs if any(not self.uf.fixed(x) for x in self.slots[a])]
        if live:
            producers = sorted({self.producer[x][0] for a in live for x in self.slots[a]
                                if not self.uf.fixed(x) and x in self.producer})
            raise PruningError(
                f"cannot prune through {what} '{_op_name(node)}' in module '{_module_path(node)}' "
                f"(fx node {node.name}): it may mix channels; pass ignore={producers[:4]} "
                "to keep the channels that reach it"
            )
        return self._fixed_slots(node)

    # -- ops ---------------------------------------------------------------
    def _conv(self, node: fx.Node, name: str, m: nn.Conv2d) -> list[int]:
        x = self.slots[node.args[0]]
        out_shape = _shape(node)
        self.flops[name] = self.flops.get(name, 0) + (
            2 * out_shape[0] * m.out_channels * math.prod(out_shape[2:])
            * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        )
        if m.groups == 1:
            self._member(name, "in", x)
            return self._produce(name, m.out_channels)
        if m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
            mult = m.out_channels // m.in_channels
            out = [x[j // mult] for j in range(m.out_channels)]
            if self._ignored(name):
                self._fix(out)
            self._member(name, "dw", out)
            self.dw_mult[name] = mult
            return out
        # Grouped convs keep their group structure: neither side can change width.
        self._fix(x)
        out = self._produce(name, m.out_channels)
        self._fix(out)
        return out

    def _linear(self, node: fx.Node, name: str, m: nn.Linear) -> list[int]:
        shape = _shape(node.args[0])
        if shape is None or len(shape) != 2:
            return self._unknown(node, "Linear on a tensor that is not (batch, features):")
        self.flops[name] = self.flops.get(name, 0) + 2 * shape[0] * m.in_features * m.out_features
        self._member(name, "in", self.slots[node.args[0]])
        return self._produce(name, m.out_features)

    def _call_module(self, node: fx.Node) -> list[int] | None:
        name = str(node.target)
        m = self.gm.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            return self._conv(node, name, m)
        if isinstance(m, nn.Linear):
            return self._linear(node, name, m)
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            x = self.slots[node.args[0]]
            if self._ignored(name):
                self._fix(x)
            self._member(name, "bn", x)
            return x
        if isinstance(m, nn.Flatten):
            return self._flatten(node, m.start_dim, m.end_dim)
        if isinstance(m, _PASS_MODULES):
            return self.slots[node.args[0]]
        return self._unknown(node, f"module {type(m).__name__}")

    def _flatten(self, node: fx.Node, start: int, end: int) -> list[int] | None:
        src = node.args[0]
        shape = _shape(src)
        rank = len(shape)
        start, end = start % rank, end % rank
        if start >= 2:
            return self.slots[src]
        if start == 1 and end == rank - 1:
            spatial = math.prod(shape[2:])
            return [label for label in self.slots[src] for _ in range(spatial)]
        return self._unknown(node, "flatten")

    def _reshape(self, node: fx.Node) -> list[int] | None:
        src = node.args[0]
        before, after = _shape(src), _shape(node)
        if after[:2] == before[:2]:
            return self.slots[src]
        if len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
            sizes = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("shape"),)
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            # A literal width (view(-1, 512 * 7 * 7)) would be wrong after pruning.
            if any(isinstance(s, int) and s != -1 for s in list(sizes)[1:]):
                self._fix(self.slots[src])
            return self._flatten(node, 1, -1)
        return self._unknown(node, "reshape")

    def _binary(self, node: fx.Node) -> list[int] | None:
        out_shape = _shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self._unknown(node, "op")
        rank, width = len(out_shape), out_shape[1]
        aligned: list[list[int]] = []
        operands = [a for a in node.args if isinstance(a, fx.Node)] + \
                   [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
        for a in operands:
            shape = _shape(a)
            if shape is None:
                continue
            dim = 1 - (rank - len(shape))
            if dim < 0 or shape[dim] == 1:
                continue  # broadcast along channels: no channel of its own
            if a in self.slots and len(shape) == rank:
                aligned.append(self.slots[a])
            else:  # a parameter or buffer with one value per channel pins those channels
                aligned.append([FIXED] * width)
        if not aligned:
            return [FIXED] * width
        for other in aligned[1:]:
            for x, y in zip(aligned[0], other):
                self.uf.union(x, y)
        return aligned[0]

    def _cat(self, node: fx.Node) -> list[int] | None:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        if dim % rank == 1:
            return [label for t in tensors for label in self.slots[t]]
        first = self.slots[tensors[0]]
        for t in tensors[1:]:
            for x, y in zip(first, self.slots[t]):
                self.uf.union(x, y)
        return first

    def _getitem(self, node: fx.Node) -> list[int] | None:
        src, index = node.args
        if src not in self.slots:
            return self._unknown(node, "indexing")
        index = index if isinstance(index, tuple) else (index,)
        if index and isinstance(index[0], slice) and index[0] == slice(None):
            rest = index[1:]
            if not rest or rest[0] is Ellipsis:
                return self.slots[src]
            if isinstance(rest[0], slice) and not any(i is None for i in rest):
                return self.slots[src][rest[0]]
        if index and index[0] is Ellipsis and len(index) <= len(_shape(src)) - 1:
            return self.slots[src]
        return self._unknown(node, "indexing")

    def _pad(self, node: fx.Node) -> list[int] | None:
        src = node.args[0]
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        rank = len(_shape(src))
        pairs = len(pad) // 2
        if pairs <= rank - 2:
            return self.slots[src]
        if pairs == rank - 1:
            left, right = pad[2 * (rank - 2)], pad[2 * (rank - 2) + 1]
            if isinstance(left, int) and isinstance(right, int) and left >= 0 and right >= 0:
                return [FIXED] * left + self.slots[src] + [FIXED] * right
        return self._unknown(node, "pad")

    def _reduction(self, node: fx.Node) -> list[int] | None:
        src = node.args[0]
        rank = len(_shape(src))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if dims is None or any(d % rank in (0, 1) for d in dims):
            self._fix(self.slots[src])  # channels are mixed into one value: keep them all
            return self._fixed_slots(node)
        return self.slots[src]

    def _call(self, node: fx.Node) -> list[int] | None:
        name = _op_name(node)
        if node.op == "call_function" and node.target in (operator.getitem,):
            return self._getitem(node)
        if name in _METADATA:
            return None
        if _shape(node) is None:  # returns no tensor (e.g. a tuple): its outputs are opaque
            return self._unknown(node, "op")
        if name in _PASS_FUNCTIONS:
            return self.slots[node.args[0]] if node.args[0] in self.slots else self._unknown(node, "op")
        if name in _ELEMENTWISE_BINARY:
            return self._binary(node)
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, start, end)
        if name in ("view", "reshape"):
            return self._reshape(node)
        if name in ("cat", "concat", "concatenate"):
            return self._cat(node)
        if name == "pad":
            return self._pad(node)
        if name in _REDUCTIONS:
            return self._reduction(node)
        return self._unknown(node, "op")

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                slots = self._fixed_slots(node)
            elif node.op == "output":
                fx.node.map_arg(node.args, lambda a: self._fix(self.slots.get(a, ())))
                continue
            elif node.op == "call_module":
                slots = self._call_module(node)
            else:
                slots = self._call(node)
            if slots is not None:
                self.slots[node] = slots


def analyse(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], ignore=()) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and return its channel dependency graph."""
    gm = trace(model)
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except PruningError:
        raise
    except Exception as exc:
        raise PruningError(
            f"example_inputs: the traced model fails on them ({type(exc).__name__}: {exc}); "
            "pass inputs of the shape the model expects"
        ) from exc
    finally:
        model.train(was_training)
    analyser = _Analyser(gm, tuple(ignore))
    analyser.run()
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
        layer_producers=layer_producers,
        producer=a.producer, module_flops=a.flops, num_units=num_units, unit_layer=unit_layer,
    )
