"""Trace a network with torch.fx and find which channels must be removed together: every channel a conv or Linear
produces gets a *label*; ops that force channels to be equal *tie* labels with a union-find (label 0, ``FIXED``:
never remove). Members, units and layers: docs/design.md ("The analysis")."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import itertools
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches  # private, but in every torch from 2.1 on
from torch.fx.passes.shape_prop import ShapeProp

from .surgery import _NORMS

FIXED = 0


class PruningError(ValueError):
    """The pruner refuses: the message names the argument, op or module and the fix."""


# Modules and functions that keep every channel where it is (0 stays 0: the zeroed-channel equivalence relies on it).
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
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d,
)
# Padding with zeros keeps a zeroed channel zero; any other constant would not.
_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
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
_NORM_STATE = ("weight", "bias", "running_mean", "running_var")
# Ops that carry a parameter to where it is used without mixing its entries: a view, or a scalar factor.
_PARAM_CARRIERS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "to", "float", "double",
                   "mul", "truediv", "div", "add", "sub", "neg"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [FIXED]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = x = self.parent[self.parent[x]]  # path halving
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = sorted((self.find(a), self.find(b)))  # FIXED (0) stays the root of its class
        self.parent[rb] = ra

    def fixed(self, x: int) -> bool:
        return self.find(x) == FIXED


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
    return (list(stack.values())[-1][0] if stack else "") or "<root>"


def _op_name(node: fx.Node) -> str:
    if isinstance(node.target, str):  # a module or method name
        return node.target
    return getattr(node.target, "__name__", str(node.target)).strip("_")


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_FIXED_METADATA = {"device", "dtype", "layout", "is_cuda", "ndim", "requires_grad", "is_sparse"}


class _ConcreteProxy(fx.Proxy):
    """What a proxy of `_ConcreteTracer` adds: it knows the value its node takes on the example inputs, so Python
    that needs a plain value (``int``, ``range``, ``if``) gets it, and the tracer notes that the graph is specialised
    on it."""

    def __len__(self) -> int:  # a rank, or a batch size: nothing pruning changes
        return len(self.node.meta["concrete"])

    def __int__(self) -> int:
        return int(self.tracer.concrete(self))

    __index__ = __int__

    def __float__(self) -> float:
        return float(self.tracer.concrete(self))

    def __getattr__(self, k: str):
        # metadata pruning cannot change: plain values, so that code may pass them on (torch.autocast(v.device.type))
        if k in _FIXED_METADATA:
            return getattr(self.node.meta["concrete"], k)
        return _ConcreteAttribute(self, k)


class _ConcreteAttribute(_ConcreteProxy, fx.proxy.Attribute):
    pass


class _ConcreteTracer(fx.Tracer):
    """torch.fx tracing that runs each op on the example inputs as it records it (one forward pass), so control flow
    takes the example's branch: sound when the branch reads only metadata (docs/design.md, "The analysis")."""

    def __init__(self, inputs: tuple[torch.Tensor, ...]):
        super().__init__()
        self.inputs = list(inputs)
        self.decided: list[fx.Node] = []  # nodes whose value the Python code used as a plain value

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def current_module(self) -> str:
        return next(reversed(self.module_stack.values()))[0] if self.module_stack else ""

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        a, kw = fx.node.map_arg((node.args, node.kwargs), self._value)
        # fx patches Module.__call__ and __getattr__ while it traces; the value is computed without them
        with _maybe_revert_all_patches():
            if kind == "placeholder":
                node.meta["concrete"] = self.inputs.pop(0) if self.inputs else (node.args[0] if node.args else None)
            else:
                node.meta["concrete"] = _run(self.root, kind, target, a, kw)
        # a value computed from tensor contents (item(), tolist()) stays data whatever is done with it
        node.meta["data"] = kind == "call_method" and target in ("item", "tolist") or any(
            n.meta.get("data") for n in node.all_input_nodes)
        return proxy

    def _value(self, node: fx.Node):
        if "concrete" not in node.meta:  # a parameter or constant fx added as an argument (create_arg)
            node.meta["concrete"] = _fetch(self.root, node.target)
        return node.meta["concrete"]

    def concrete(self, proxy: fx.Proxy):
        node = proxy.node
        value = node.meta["concrete"]
        if isinstance(value, torch.Tensor) or node.meta.get("data"):
            module = self.current_module()
            raise PruningError(
                f"model: forward() of module '{module or '<root>'}' branches on tensor values (fx node {node.name}), "
                "so torch.fx cannot trace it and no single forward pass shows every path; move that decision out "
                "of forward() or prune a traceable model")
        self.decided.append(node)
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj))

    def iter(self, obj: fx.Proxy):
        return (obj[i] for i in range(len(obj)))  # each item stays in the graph


def _fetch(root: nn.Module, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(owner), attr)


def _run(root: nn.Module, op: str, target, args, kwargs):
    """The value of one fx node of ``root``'s graph, given its arguments' values."""
    if op == "get_attr":
        return _fetch(root, target)
    if op == "call_function":
        return target(*args, **kwargs)
    if op == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return root.get_submodule(target)(*args, **kwargs)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for a while, then each module's own mode back (a frozen BatchNorm in a training model stays so)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def trace(model: nn.Module, inputs: tuple[torch.Tensor, ...] = ()) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The model's graph, and the nodes it is specialised on (none unless plain torch.fx failed and `_ConcreteTracer`
    traced it). In eval mode: a norm layer traced through (timm's BatchNormAct2d) would otherwise bake in
    training=True, and the shape pass would move its running statistics."""
    with _eval_mode(model):
        try:
            return fx.symbolic_trace(model), []
        except Exception as exc:  # fx raises many types; all mean the same to the user
            symbolic = exc
        if not inputs:
            raise PruningError(
                f"model: {type(model).__name__} cannot be traced by torch.fx ({_first_line(symbolic)}); "
                "remove data-dependent control flow from forward() or prune a traceable model") from symbolic
        tracer = _ConcreteTracer(inputs)
        try:
            with torch.no_grad():
                graph = tracer.trace(model)
        except PruningError:
            raise
        except Exception as exc:
            module = tracer.current_module()
            raise PruningError(
                f"model: {type(model).__name__} cannot be traced by torch.fx ({_first_line(symbolic)}), nor along "
                f"one forward pass: module '{module or '<root>'}' fails ({type(exc).__name__}: {_first_line(exc)}); "
                "remove data-dependent control flow from its forward() or prune a traceable model") from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__), tracer.decided


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
        self.per_filter: dict[tuple, list[str] | None] = {}  # `_check_per_filter` by computation and shapes
        # A tensor's channel count read at run time (x.shape[1], x.size(1), numel) shrinks with the pruning:
        self.shapes: dict[fx.Node, fx.Node] = {}  # a whole-shape value -> the tensor it describes
        self.reads: dict[fx.Node, set[fx.Node]] = {}  # a value -> the tensors whose channel count it carries
        self.same_width: list[tuple[fx.Node, fx.Node]] = []  # (read tensor, tensor a view shapes with that count)
        # functions and methods by name, once their first argument is a tensor with channels
        self.handlers = {
            **dict.fromkeys(_POINTWISE_FUNCTIONS, lambda n: (self.slots[n.args[0]], self.axis[n.args[0]])),
            **dict.fromkeys(_SPATIAL_FUNCTIONS, self._spatial), "unsqueeze": self._unsqueeze,
            "flatten": lambda n: self._flatten(n, self._arg(n, 1, "start_dim", 0), self._arg(n, 2, "end_dim", -1)),
            "view": self._reshape, "reshape": self._reshape, "layer_norm": self._layer_norm,
            **dict.fromkeys(("permute", "transpose", "swapaxes"), self._permute),
            # per-channel statistics: each channel is normalised on its own (group_norm ties whole groups)
            **dict.fromkeys(("batch_norm", "instance_norm", "group_norm"), self._functional_norm),
            **dict.fromkeys(("conv1d", "conv2d", "conv3d", "linear"), self._functional_layer),
            "softmax": self._softmax, "log_softmax": self._softmax, "matmul": self._matmul, "bmm": self._matmul,
            **dict.fromkeys(("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm"), self._reduction),
            "pad": self._pad,
        }

    def _ignored(self, name: str) -> bool:
        return any(matches(name, i) for i in self.ignore)

    def _fixed_slots(self, node: fx.Node) -> tuple[list[int], int] | None:
        shape = _shape(node)
        return ([FIXED] * shape[1], 1) if shape is not None and len(shape) >= 2 else None

    def _member(self, module: str, role: str, labels: list[int]) -> None:
        if role in ("bn", "dw") and self._ignored(module):  # an ignored norm or depthwise conv keeps its channels
            self._fix(labels)
        key = (module, role)
        if key in self.members:  # a module called twice must see the same channels both times
            self._tie(self.members[key], labels)
        else:
            self.members[key] = list(labels)

    def _produce(self, module: str, n: int) -> list[int]:
        if module not in self.producer_labels:
            labels = [self.uf.new() for _ in range(n)]
            self.producer.update((label, (module, i)) for i, label in enumerate(labels))
            if self._ignored(module):
                self._fix(labels)
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
        self._tie(labels, [labels[i % (len(labels) // blocks)] for i in range(len(labels))])

    def _tie_groups(self, labels: list[int], groups: int) -> None:
        """Whole groups only: a group's statistics span all its channels."""
        self._tie(labels, [labels[i - i % (len(labels) // groups)] for i in range(len(labels))])

    def _live(self, node) -> bool:
        return node in self.slots and any(not self.uf.fixed(x) for x in self.slots[node])

    def _unknown(self, node: fx.Node, what: str):
        """An op we do not understand: safe only if no removable channel flows into it."""
        labels: list[int] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: labels.extend(
            self.slots[a] if a in self.slots else [y for p, _ in self.pieces.get(a, ()) for y in p]))
        live = sorted({self.producer[x][0] for x in labels if not self.uf.fixed(x) and x in self.producer})
        if live:
            raise PruningError(f"cannot prune through {what} '{_op_name(node)}' in module '{_module_path(node)}' "
                               f"(fx node {node.name}): it may mix channels; pass ignore={live[:4]} "
                               "to keep the channels that reach it")
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

    def _conv(self, node: fx.Node, name: str, m: nn.modules.conv._ConvNd):
        src = node.args[0]
        x = self._channels(src, 1)
        if x is None:
            return self._unknown(node, f"{type(m).__name__} on a channels-last tensor:")
        spatial = math.prod((_shape(src) if m.transposed else _shape(node))[2:])
        # per output (input, for a transposed conv) position: one multiply-add per weight it meets
        self.flops[name] = self.flops.get(name, 0) + 2 * _shape(node)[0] * spatial * m.weight.numel()
        if m.groups > 1 and m.groups == m.in_channels:
            mult = m.out_channels // m.in_channels
            out = [x[j // mult] for j in range(m.out_channels)]
            self._member(name, "dw", out)
            self.dw_mult[name] = mult
            return out, 1
        # Grouped conv (or one group): remove the same positions from every group, on each side, so they stay equal.
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
        if isinstance(m, nn.GroupNorm):
            self._tie_groups(x, m.num_groups)
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
        if isinstance(m, _SPATIAL_MODULES) or isinstance(m, _CONSTANT_PADS) and m.value == 0:
            return self._spatial(node)
        if any(True for _ in m.parameters()):
            self.kept_whole[name] = type(m).__name__
        return self._unknown(node, f"module {type(m).__name__}")

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
        source = self._param_source(self._arg(node, 2, "weight"))
        owner = source.target.rpartition(".")[0] if source is not None else None
        module = self.model.get_submodule(owner) if owner is not None else None
        # its forward passes self.normalized_shape, which surgery updates; a literal shape would not follow
        if len(normalized) != 1 or not isinstance(module, nn.LayerNorm):
            return self._unknown(node, "layer_norm over channels, not from a LayerNorm module,")
        x = self.slots[src]
        self._member(owner, "bn", x)
        return x, axis

    def _param_source(self, node) -> fx.Node | None:
        """The parameter or buffer (its get_attr node) that ``node`` is, seen through views and scalar factors."""
        while isinstance(node, fx.Node) and node.op != "get_attr":
            tensors = [a for a in node.all_input_nodes if _shape(a) is not None]
            if _op_name(node) not in _PARAM_CARRIERS or len(tensors) != 1 or tensors[0] is not node.args[0] \
                    or any(isinstance(a, fx.Node) and a is not tensors[0] for a in node.args[1:]):
                return None
            node = tensors[0]
        return node if isinstance(node, fx.Node) else None

    def _functional_norm(self, node: fx.Node):
        """F.batch_norm / instance_norm / group_norm as a norm layer's own forward calls it (timm's norm + act
        layers, a GroupNorm subclass): the module is sliced as a norm layer; weights of any other module are
        sliced as per-channel parameters."""
        src, name = node.args[0], _op_name(node)
        x, axis = self.slots[src], self.axis[src]
        if not self._live(src):
            return x, axis
        if axis != 1:
            return self._unknown(node, f"{name} on a channels-last tensor:")
        params = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        sources = [self._param_source(a) for a in params]
        if any(p is None for p in sources):
            return self._unknown(node, f"{name} with statistics or weights that are not parameters:")
        owners = {p.target.rpartition(".")[0] for p in sources}
        owner = owners.pop() if len(owners) == 1 else None
        module = self.model.get_submodule(owner) if owner is not None else None
        if name == "group_norm":
            groups = self._arg(node, 1, "num_groups")
            # its forward passes self.num_groups, which surgery updates; a literal count would not follow
            if not isinstance(module, nn.GroupNorm) or groups != module.num_groups:
                return self._unknown(node, "group_norm not from a GroupNorm module:")
            self._tie_groups(x, groups)
        if isinstance(module, _NORMS) and all(p.target.rpartition(".")[2] in _NORM_STATE for p in sources):
            self._member(owner, "bn", x)
        else:
            for p in sources:
                shape = _shape(p)
                self._param_member(p, max(range(len(shape)), key=shape.__getitem__), x)
        return x, axis

    def _functional_layer(self, node: fx.Node):
        """F.linear / F.conv*d with a Linear's or a conv's weight: as is (timm's Linear subclass, a conv that pads
        first), or a conv weight computed from the conv's parameters (weight standardisation: ScaledStdConv2d)."""
        weight, bias = self._arg(node, 1, "weight"), self._arg(node, 2, "bias")
        linear = _op_name(node) == "linear"
        if not isinstance(weight, fx.Node) or linear and weight.op != "get_attr":
            return self._unknown(node, "op")
        owner = weight.target.rpartition(".")[0] if weight.op == "get_attr" else _weight_owner(self.gm, weight)
        m = self.model.get_submodule(owner) if owner is not None else None
        if not isinstance(m, nn.Linear if linear else nn.modules.conv._ConvNd) \
                or not (bias is None or isinstance(bias, fx.Node) and bias.target == f"{owner}.bias") \
                or not linear and (m.transposed or self._arg(node, 6, "groups", 1) != m.groups):
            return self._unknown(node, "op")
        if weight.op != "get_attr":
            return self._standardised_conv(node, owner, m, weight)
        if weight.target != f"{owner}.weight":
            return self._unknown(node, "op")
        return self._linear(node, owner, m) if linear else self._conv(node, owner, m)

    def _standardised_conv(self, node: fx.Node, name: str, m: nn.modules.conv._ConvNd, weight: fx.Node):
        """A conv whose weight is computed from its own parameters, each filter on its own (`_check_per_filter`):
        its filters can go; its inputs stay, since the computation (a filter's mean and variance) spans them."""
        # the same code on parameters of the same shapes computes the same way: NFNet checks each kind once
        key = (type(m), _signature(weight), tuple((n.target.rpartition(".")[2], _shape(n))
                                                  for n in _ancestors(weight) if n.op == "get_attr"))
        if key not in self.per_filter:
            self.per_filter[key] = _check_per_filter(self.gm, m, name, weight)
        per_filter = self.per_filter[key]
        if per_filter is None:
            return self._unknown(node, f"conv with a weight computed from '{name}' that mixes filters:")
        src = node.args[0]
        self._fix(self.slots.get(src, ()))
        spatial = math.prod(_shape(node)[2:])
        self.flops[name] = self.flops.get(name, 0) + 2 * _shape(node)[0] * spatial * m.weight.numel()
        out = self._produce(name, m.out_channels)
        if m.groups > 1:  # every group keeps all its inputs, so each loses the same positions (or none: depthwise)
            self._tie_blocks(out, m.groups)
            if m.groups == m.in_channels:
                self._fix(out)
        for attr in per_filter:
            self._member(f"{name}.{attr}", "param", out)
        return out, 1

    def _matmul(self, node: fx.Node):
        """a @ b keeps a's rows and b's columns apart: channels there stay channels (global context attention pools
        each channel over an attention map); channels on the contracted dim, or on both sides, would mix."""
        a, b = node.args[0], node.args[1]
        live = [t for t in (a, b) if isinstance(t, fx.Node) and self._live(t)]
        if not live:
            return self._fixed_slots(node)
        t = live[0]
        side = 2 if t is a else 1  # a's rows, or b's columns
        if len(live) == 2 or any(len(_shape(x)) < 2 for x in (a, b) if isinstance(x, fx.Node)) \
                or self.axis[t] != len(_shape(t)) - side:
            return self._unknown(node, "op")
        return self.slots[t], len(_shape(node)) - side

    def _softmax(self, node: fx.Node):
        src = node.args[0]
        if self._arg(node, 1, "dim") % len(_shape(src)) == self.axis[src]:
            return self._unknown(node, "op")
        return self.slots[src], self.axis[src]  # over another dim (split attention's radix): channels apart

    def _param_member(self, node: fx.Node, aligned_dim: int, labels: list[int]) -> None:
        """A per-channel parameter (e.g. ConvNeXt's layer scale) sliced with the channels it scales."""
        shape = _shape(node)
        if sum(s > 1 for s in shape) == 1 and shape[aligned_dim] == len(labels) and not self._ignored(node.target):
            self._member(node.target, "param", labels)
        else:
            self._fix(labels)

    def _binary(self, node: fx.Node):
        out_shape = _shape(node)  # a tensor: `_call` sees to it
        if len(out_shape) < 2:
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
        self._fix([x for a in live if len(self.slots[a]) != out_shape[t] for x in self.slots[a]])  # broadcast: keep
        live = [a for a in live if len(self.slots[a]) == out_shape[t]]
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

    def _cat(self, node: fx.Node, stack: bool = False):
        """cat, or stack (a cat on a new dim): joined on another dim than channels, all keep the same channels."""
        tensors = self._arg(node, 0, "tensors")
        dim = self._arg(node, 1, "dim", 0) % len(_shape(node))
        live = [t for t in tensors if self._live(t)]
        if not live:
            return self._fixed_slots(node)
        axes = {self.axis[t] for t in live}
        if len(axes) > 1:
            return self._unknown(node, f"{'stack' if stack else 'cat'} of tensors with channels on different dims:")
        t = axes.pop()
        if dim == t and not stack:
            return [x for a in tensors for x in (self.slots[a] if a in live else [FIXED] * _shape(a)[t])], t
        first = self.slots[live[0]]
        for a in tensors:
            if a in live:
                self._tie(first, self.slots[a])
            elif stack or _shape(a)[t] > 1:
                self._fix(first)
        return first, t + (stack and dim <= t)

    def _chunk(self, node: fx.Node) -> None:
        """torch.chunk/split along channels: pieces of equal width, so every piece loses the same positions."""
        src, metas = node.args[0], node.meta["tensor_meta"]
        labels, axis = self.slots[src], self.axis[src]
        if self._arg(node, 2, "dim", 0) % len(_shape(src)) != axis:
            self.pieces[node] = [(labels, axis) for _ in metas]
            return
        widths = [tuple(meta.shape)[axis] for meta in metas]
        # chunk(n) recomputes the cut from the pruned width; split's sizes are literals in the code
        if _op_name(node) == "chunk" and isinstance(self._arg(node, 1, "chunks"), int) and len(set(widths)) == 1:
            self._tie_blocks(labels, len(widths))
        else:
            self._fix(labels)
        self.pieces[node] = [(labels[o:o + w], axis) for o, w in zip(itertools.accumulate([0] + widths), widths)]

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
        # spell the index out in full: the Ellipsis (or the end) stands for every dim the index does not name
        k = next((j for j, i in enumerate(index) if i is Ellipsis), len(index))
        index = index[:k] + (slice(None),) * (rank - sum(i is not None and i is not Ellipsis for i in index)) \
            + index[k + 1:]
        dim = out_dim = 0
        for i in index:
            if dim == axis and i is not None:
                if i != slice(None):  # literal positions would pick other channels once some are gone
                    self._fix(labels)
                    return self._fixed_slots(node)
                return labels, out_dim
            dim += i is not None
            out_dim += i is None or isinstance(i, slice)

    def _pad(self, node: fx.Node):
        src = node.args[0]
        pad = self._arg(node, 1, "pad")
        rank, axis = len(_shape(src)), self.axis[src]
        pairs = len(pad) // 2
        if self._arg(node, 3, "value", None):  # a constant border would make a zeroed channel non-zero
            self._fix(self.slots[src])
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
        if _op_name(node) in ("transpose", "swapaxes"):
            a, b = (d % rank for d in node.args[1:3])
            return self.slots[src], {a: b, b: a}.get(axis, axis)
        order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        order = [d % rank for d in (order or node.kwargs["dims"])]
        return self.slots[src], order.index(axis)

    def _unsqueeze(self, node: fx.Node):
        src = node.args[0]
        dim = self._arg(node, 1, "dim") % len(_shape(node))
        return self.slots[src], self.axis[src] + (dim <= self.axis[src])

    def _flatten(self, node: fx.Node, start: int, end: int):
        rank = len(_shape(node.args[0]))
        return self._reshape(node, [None] * (start % rank) + [-1] + [None] * (rank - 1 - end % rank))

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

    def _counts(self, node: fx.Node) -> set[fx.Node]:
        """The tensors whose run-time channel count ``node`` carries (a count, or a whole shape)."""
        return self.reads.get(node, set()) | ({self.shapes[node]} if node in self.shapes else set())

    def _follow_sizes(self, node: fx.Node, name: str) -> None:
        """A channel count read at run time must still be right once channels are gone. Arithmetic on it carries
        it on; a view of a tensor may take it when both end up equally wide (checked in `settle_widths`, as in
        ShuffleNet's channel shuffle); anything else that takes it keeps those channels whole (MaxViT's attention
        reshapes its output to its input's width)."""
        carried: set[fx.Node] = set()
        fx.node.map_arg((node.args, node.kwargs), lambda a: carried.update(self._counts(a)))
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

    def keep_decided(self, decided: list[fx.Node]) -> None:
        """A graph traced along one forward pass holds only the branches its channel counts chose: keep the
        channels whose count a branch, a loop or a literal read, so that the pruned model chooses the same."""
        for node in decided:
            self._fix([x for tensor in self._counts(node) for x in self.slots[tensor]])

    def settle_widths(self) -> None:
        """Keep whole both sides of a view whose run-time width and the tensor it shapes would differ: their
        channels must be the same channel groups (a shuffle holds them in another order and split over dims)."""
        for read, shaped in self.same_width:
            roots = [{self.uf.find(x) for x in self.slots[n]} for n in (read, shaped)]
            if roots[0] != roots[1]:
                self._fix(self.slots[read] + self.slots[shaped])

    def _call(self, node: fx.Node):
        name = _op_name(node)
        if self._size_read(node, name):
            return None
        self._follow_sizes(node, name)
        if node.target is operator.getitem:
            return self._getitem(node)
        if name in _METADATA:
            return None
        if name in ("chunk", "split") and node.args and node.args[0] in self.slots \
                and isinstance(node.meta.get("tensor_meta"), (tuple, list)):
            return self._chunk(node)
        if _shape(node) is None:  # returns no tensor (e.g. a tuple): its outputs are opaque
            return self._unknown(node, "op")
        if name in ("cat", "concat", "concatenate", "stack"):
            return self._cat(node, stack=name == "stack")
        if name in _ELEMENTWISE_BINARY:  # `1 - x` too: the tensor need not come first
            return self._binary(node)
        if (node.args[0] if node.args else None) not in self.slots or name not in self.handlers:
            return self._unknown(node, "op")
        return self.handlers[name](node)

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


def _ancestors(weight: fx.Node) -> list[fx.Node]:
    """The nodes ``weight`` is computed from, in graph order."""
    seen, todo = set(), [weight]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += n.all_input_nodes
    return [n for n in weight.graph.nodes if n in seen]


def _signature(weight: fx.Node) -> tuple:
    """What computes ``weight``, up to which module's parameters it reads: ops, constants and how they connect."""
    nodes = _ancestors(weight)
    position = {n: i for i, n in enumerate(nodes)}
    return tuple((n.op, n.target.rpartition(".")[2] if n.op == "get_attr" else n.target,
                  repr(fx.node.map_arg((n.args, n.kwargs), lambda a: ("node", position[a])))) for n in nodes)


def _weight_owner(gm: fx.GraphModule, weight: fx.Node) -> str | None:
    """The one module whose parameters, and nothing else (no input), a computed weight is made of."""
    nodes = _ancestors(weight)
    if any(n.op == "placeholder" for n in nodes):
        return None
    owners = {n.target.rpartition(".")[0] for n in nodes if n.op == "get_attr"}
    return owners.pop() if len(owners) == 1 else None


def _evaluate(gm: fx.GraphModule, weight: fx.Node, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """``weight`` computed with the parameters in ``values`` (by qualified name) replacing the module's."""
    env: dict[fx.Node, object] = {}
    for n in _ancestors(weight):
        if n.op == "get_attr" and n.target in values:
            env[n] = values[n.target]
        else:
            env[n] = _run(gm, n.op, n.target, *fx.node.map_arg((n.args, n.kwargs), env.__getitem__))
    return env[weight]


def _check_per_filter(gm: fx.GraphModule, m: nn.modules.conv._ConvNd, name: str, weight: fx.Node) -> list[str] | None:
    """The parameters besides weight and bias that a per-filter weight computation uses (a gain per filter), or
    None when filters mix or a zeroed filter's weight is not zero (how it is checked: docs/design.md)."""
    params = {n.target for n in _ancestors(weight) if n.op == "get_attr"}
    extra = sorted(t.rpartition(".")[2] for t in params if t != f"{name}.weight")
    state = {t: _fetch(gm, t).detach() for t in params}
    n_out = m.out_channels
    if any(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n_out
           or (t != f"{name}.weight" and v[0].numel() != 1) for t, v in state.items()):
        return None
    with torch.no_grad():
        base = _evaluate(gm, weight, state)
        if base.shape != m.weight.shape:
            return None
        g = torch.Generator().manual_seed(0)
        noise = {t: torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5 for t, v in state.items()}
        index = torch.arange(n_out)
        for bit in range(max(1, (n_out - 1).bit_length())):
            for chosen in (index >> bit & 1 == 1, index >> bit & 1 == 0):
                if not chosen.any():
                    continue
                moved = {t: v + noise[t] * chosen.view(-1, *[1] * (v.dim() - 1)) for t, v in state.items()}
                changed = (_evaluate(gm, weight, moved) != base).flatten(1).any(1)
                if (changed & ~chosen).any():
                    return None
        zeroed = {t: torch.cat([torch.zeros_like(v[:1]), v[1:]]) for t, v in state.items()}
        if _evaluate(gm, weight, zeroed)[0].any():
            return None
    return extra


def analyse(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], ignore=()) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and return its channel dependency graph."""
    gm, decided = trace(model, example_inputs)
    try:
        # ShapeProp prints a traceback before raising; the error below says it in one line
        with _eval_mode(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        first = (str(cause).strip().splitlines() or [""])[0]
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        raise PruningError(
            f"example_inputs: {type(model).__name__} fails on inputs of shape {shapes} "
            f"({type(cause).__name__}: {first}); pass inputs of the shape the model expects"
        ) from exc
    analyser = _Analyser(gm, model, tuple(ignore))
    analyser.run()
    analyser.settle_widths()
    analyser.keep_decided(decided)
    graph = _finish(analyser)
    if graph.producer and graph.num_units == 0 and not ignore:  # the model itself, not the caller's ignore list
        modules = list(dict.fromkeys(module for module, _ in graph.producer.values()))
        raise PruningError(
            f"model: no channel of {type(model).__name__} can be removed (module '{modules[0]}' and its "
            f"{len(modules) - 1} other convs and Linears): every one feeds the output or a layer the pruner keeps "
            f"whole (the inputs of a weight-standardised conv stay, and with them the channels of the layer before)")
    return graph


def _finish(a: _Analyser) -> ChannelGraph:
    uf = a.uf
    members = [Member(module, role, labels, a.dw_mult.get(module, 1)) for (module, role), labels in a.members.items()]
    members += [Member(module, "out", labels) for module, labels in a.producer_labels.items()]

    unit_of_root: dict[int, int] = {}
    unit_of_label = [-1] + [-1 if uf.fixed(x) else unit_of_root.setdefault(uf.find(x), len(unit_of_root))
                            for x in range(1, len(uf.parent))]
    num_units = len(unit_of_root)
    unit_table = torch.as_tensor(unit_of_label, dtype=torch.long)
    for m in members:
        m.units = unit_table[torch.as_tensor(m.labels, dtype=torch.long)]

    # Units are in one layer when they share a producer module (residual stages span many).
    layer_uf = _UnionFind()  # node u + 1 is unit u
    layer_uf.parent += range(1, num_units + 1)
    live_units = {module: [unit_of_label[x] + 1 for x in labels if unit_of_label[x] >= 0]
                  for module, labels in a.producer_labels.items()}
    for units in live_units.values():
        for u in units[1:]:
            layer_uf.union(units[0], u)
    layers_by_root: dict[int, list[int]] = {}
    for unit in range(num_units):
        layers_by_root.setdefault(layer_uf.find(unit + 1), []).append(unit)
    layers = list(layers_by_root.values())
    layer_of_root = {root: i for i, root in enumerate(layers_by_root)}
    unit_layer = [layer_of_root[layer_uf.find(unit + 1)] for unit in range(num_units)]
    layer_producers = [sorted(module for module, units in live_units.items() if units and unit_layer[units[0] - 1] == i)
                       for i in range(len(layers))]
    # per producer, (channels, removable units): tied outputs (e.g. a depthwise multiplier) count once
    sizes = {m: (len(labels) - len(live_units[m]) + len(set(live_units[m])), len(set(live_units[m])))
             for m, labels in a.producer_labels.items()}
    producer_sizes = [[sizes[m] for m in modules] for modules in layer_producers]
    return ChannelGraph(
        members=members, unit_of_label=unit_of_label, layers=layers, producer_sizes=producer_sizes,
        layer_producers=layer_producers, kept_whole=a.kept_whole,
        producer=a.producer, module_flops=a.flops, num_units=num_units, unit_layer=unit_layer,
    )
