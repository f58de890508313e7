"""Model registry: our small CIFAR zoo plus every torchvision classifier, weights loading, head swaps.

`build_model(name, num_classes, weights, in_channels)` is the one entry point a trial needs: random init,
torchvision's pretrained weights, or a local checkpoint, with the classifier replaced for the target dataset and the
stem adapted to its channel count. Every zoo model traces with torch.fx, because the pruner works on the traced graph.
"""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from sweep.errors import InputError
from sweep.zoo.images import IMAGENET_STATS
from sweep.zoo.plugin import CHECKPOINT_SUFFIXES, looks_like_path, resolve_factory


class ModelError(InputError):
    """Bad model configuration: ModelError(field, text, field, text, ...) reads "field: text..." with every field it
    names kept apart from its words, so that `sweep prune` can name its flags in their place (`named`)."""

    def __init__(self, field: str, *words: str):
        self.field, self.words = field, words
        super().__init__(self.named(str))

    def named(self, name: Callable[[str], str]) -> str:
        """The message with each field as `name` calls it."""
        text = "".join(name(word) if i % 2 else word for i, word in enumerate(self.words))
        return f"{name(self.field)}: {text}" if self.words else name(self.field)


# ---------- CIFAR ResNets (He et al. 2016, section 4.2), module names as in akamaster/pytorch_resnet_cifar10 so
# that its published checkpoints load unchanged.

class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels; no parameters."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4  # a plain int, so fx records a constant

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """6n+2 layers: a 16-channel stem, then n blocks each at 16, 32 and 64 channels."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), 1):
            blocks = [BasicBlock(planes // stride, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # any input size: 8x8 digits as well as 32x32
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # the reference code's init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


# ---------- VGG-16-BN for 32x32 inputs and a small CNN for quick runs

class CifarVGG(nn.Module):
    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in self.CFG:
            if v == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so 8x8 inputs survive all five pools
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers: trains to > 90 % on 8x8 digits in a few CPU seconds."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_channels, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": SmallCNN,
    **{f"resnet{6 * n + 2}": partial(CifarResNet, n) for n in (3, 5, 9, 18)},
    "vgg16_bn_cifar": CifarVGG,
}
small_cnn = SmallCNN  # the zoo's quick network as a factory path too: "sweep.zoo.models:small_cnn"


def model_names() -> list[str]:
    return list(MODELS) + torchvision.models.list_models(module=torchvision.models)


# ---------- heads and stems: found by position, so one rule covers every torchvision family

def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier: the last Linear in module order, or the last Conv2d (SqueezeNet) if none."""
    modules = list(model.named_modules())
    for kind in (nn.Linear, nn.Conv2d):
        found = [(n, m) for n, m in modules if isinstance(m, kind)]
        if found:
            return found[-1]
    raise ModelError("model.name", f"{type(model).__name__} has no Linear or Conv2d layer to use as its head")


def _stem(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ModelError("model.name", f"{type(model).__name__} has no Conv2d layer to take the input channels")


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Transfer learning: a freshly initialised classifier with `num_classes` outputs, in place."""
    name, old = _head(model)
    like = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **like)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None, **like)
    _set_module(model, name, new)
    return model


def _set_in_channels(model: nn.Module, in_channels: int, keep_weights: bool) -> None:
    """Give the first conv `in_channels` inputs; from trained filters if `keep_weights`."""
    name, old = _stem(model)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None, old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    if keep_weights:
        # sum over RGB, shared by the new inputs: a grey image copied to every input channel
        # then gives the same response as that grey image in RGB
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(1, keepdim=True).expand_as(new.weight) / in_channels)
            if old.bias is not None:
                new.bias.copy_(old.bias)
    _set_module(model, name, new)
    if hasattr(model, "transform_input"):  # googlenet/inception renormalise exactly three channels
        model.transform_input = False


# ---------- weights: a torchvision weights name or a local checkpoint

def load_checkpoint_state(path: str | Path) -> dict[str, Tensor]:
    """A checkpoint's state dict: unwraps {"state_dict": ...} / {"model": ...}, strips "module."."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError("model.weights", f"no checkpoint file at '{path}'; give an existing .pt/.pth/.th file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # never pass on torch's advice to retry with weights_only=False
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise ModelError("model.weights", f"cannot load '{path}': it holds pickled objects, not only tensors, "
                             "and is refused for safety; re-save it as a state_dict") from e
        raise ModelError("model.weights", f"cannot load '{path}': not a PyTorch checkpoint (corrupt, or not "
                         "written by torch.save)") from e
    while isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = obj.get("state_dict", obj.get("model"))
        if not isinstance(inner, dict):
            raise ModelError("model.weights", f"'{path}' is not a state dict, nor holds one under 'state_dict'/'model'")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ModelError("model.weights", f"'{path}' holds no tensors; expected a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _torchvision_weights(name: str, weights: str) -> torchvision.models.WeightsEnum:
    if name in MODELS:
        raise ModelError("model.weights", f"'{weights}' is not a file and '{name}' has no torchvision weights; "
                         f"give a checkpoint path ({'/'.join(CHECKPOINT_SUFFIXES)}) or leave weights empty")
    enum = torchvision.models.get_model_weights(name)
    key = weights.removeprefix(f"{enum.__name__}.")
    if key not in enum.__members__:
        choices = ", ".join(enum.__members__)
        raise ModelError("model.weights", f"unknown weights '{weights}' for {name}; choose one of {choices} "
                         f"or a checkpoint path ({'/'.join(CHECKPOINT_SUFFIXES)})")
    return enum[key]


def _load_strict(model: nn.Module, state: dict[str, Tensor], path: str, check: tuple = ("model.name",)) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelError("model.weights", f"'{path}' does not fit {type(model).__name__}: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); check ",
                         *check)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ModelError("model.weights", f"'{path}' has {len(wrong)} tensors of the wrong shape (e.g. {wrong[0]}); "
                         "check ", *check)
    model.load_state_dict(state, strict=True)


def _random(name: str, num_classes: int, in_channels: int) -> nn.Module:
    return MODELS[name](num_classes, in_channels) if name in MODELS else \
        _torchvision(name, num_classes, in_channels, None)


def _from_checkpoint(name: str, path: str, num_classes: int, in_channels: int) -> nn.Module:
    state = load_checkpoint_state(path)
    model = _random(name, num_classes, in_channels)
    # shape the model like the checkpoint (its head and stem sizes), load, then adapt to the target
    head, stem = _head(model)[0] + ".weight", _stem(model)[0] + ".weight"
    if head in state and state[head].shape[0] != num_classes:
        replace_head(model, state[head].shape[0])
    if stem in state:
        _set_in_channels(model, state[stem].shape[1], keep_weights=False)
    _load_strict(model, state, path)
    if _head(model)[1].weight.shape[0] != num_classes:
        replace_head(model, num_classes)
    _set_in_channels(model, in_channels, keep_weights=True)
    return model


def _torchvision(name: str, num_classes: int, in_channels: int, weights: str | None) -> nn.Module:
    """A torchvision network, random or with its named weights (torchvision downloads and caches them)."""
    w = None if weights is None else _torchvision_weights(name, weights)
    model = torchvision.models.get_model(name, **({"num_classes": num_classes} if w is None else {"weights": w}))
    if getattr(model, "aux_logits", False):  # googlenet, inception_v3: (logits, aux...) in train mode; we want logits
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    if w is not None and len(w.meta["categories"]) != num_classes:
        replace_head(model, num_classes)
    _set_in_channels(model, in_channels, keep_weights=w is not None)
    return model


def _from_factory(factory: str, num_classes: int, in_channels: int, kwargs: dict | None) -> nn.Module:
    build = resolve_factory(factory, "model.factory", ModelError)
    kwargs = dict(kwargs or {})
    clash = sorted({"num_classes", "in_channels"} & set(kwargs))
    if clash:
        raise ModelError("model.kwargs", f"{', '.join(clash)} come from the dataset; remove them from ", "model.kwargs")
    try:
        model = build(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as e:
        raise ModelError("model.factory", f"{factory}(num_classes=..., in_channels=..., **", "model.kwargs",
                         f") failed: {e}; the factory must accept num_classes and in_channels as keywords") from e
    if not isinstance(model, nn.Module):
        raise ModelError("model.factory", f"{factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str | None, num_classes: int, weights: str | None = None, in_channels: int = 3, *,
                factory: str | None = None, kwargs: dict | None = None) -> nn.Module:
    """A model by registry name or by factory; `weights` is None, a torchvision weights name, or a checkpoint path.

    `factory="my_pkg.nets:build"` imports `build` and calls `build(num_classes=..., in_channels=..., **kwargs)`; it
    must return an nn.Module built for those classes and channels. `weights` may then be a local checkpoint of it.
    """
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(field, f"must be a positive integer, got {value!r}")
    if factory is not None:
        if name is not None:
            raise ModelError("model", "give either name or factory, not both")
        model = _from_factory(factory, num_classes, in_channels, kwargs)
        if weights is not None:
            if not looks_like_path(str(weights)):
                raise ModelError("model.weights", f"'{weights}' is not a checkpoint file; a factory model loads only a "
                                 f"local checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)})")
            _load_strict(model, load_checkpoint_state(weights), str(weights),
                         check=("model.factory", " and ", "model.kwargs"))
        return model
    if kwargs:
        raise ModelError("model.kwargs", "only a ", "model.factory", " takes kwargs; remove them or use factory")
    names = model_names()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5) or list(MODELS)
        raise ModelError("model.name", f"unknown model '{name}'; choose one of {', '.join(close)}, ... (see `sweep "
                         f"models` for all {len(names)}, or give ", "model.factory:",  # a field given a value
                         " 'pkg.module:function' for your own network)")
    if weights is None:
        return _random(name, num_classes, in_channels)
    weights = str(weights)
    if looks_like_path(weights):
        return _from_checkpoint(name, weights, num_classes, in_channels)
    return _torchvision(name, num_classes, in_channels, weights)


# ---------- normalisation: pretrained weights expect inputs normalised as in their own training

# The public CIFAR ResNet checkpoints of He et al.'s architecture (Yerlan Idelbayev's) were trained on all of CIFAR-10's
# 50,000 training images (a sweep of them on cifar10 must not hold validation out of those: load_dataset's
# val_from_test), normalised with ImageNet's mean and std, not CIFAR's (CIFAR-normalised inputs cost accuracy).
KNOWN_CHECKPOINT_STATS = {f"{stem}.th": IMAGENET_STATS for stem in (
    "resnet20-12fca82f", "resnet32-d509ac18", "resnet44-014dd654", "resnet56-4bfd9763", "resnet110-1d1ed7c2",
    "resnet1202-f3b1deed")}
KNOWN_CHECKPOINT_DATA = {name: ("cifar10",) for name in KNOWN_CHECKPOINT_STATS}


def _names(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ModelError(where, f"trained_on is {value!r}; give a dataset name or a list of them, such as "
                         f"'cifar10' (a plug-in dataset: its factory path)")
    return names


def weights_trained_on(name: str | None, weights: str | None, factory: str | None = None) -> tuple[str, ...]:
    """The datasets the network's starting weights were trained on, as far as they say; () when unknown or random.

    Declared by: a plug-in model's factory function (an attribute, `build.trained_on = "cifar10"`, for the weights it
    builds with), a checkpoint (a `"trained_on"` entry beside its `"state_dict"`), or, for the public CIFAR ResNet
    checkpoints, their file name. Names are as a spec writes the dataset: `cifar10`, or a plug-in's factory path.
    """
    found: tuple[str, ...] = ()
    if factory is not None:
        found += _names(getattr(resolve_factory(factory, "model.factory", ModelError), "trained_on", None),
                        f"model.factory {factory}")
    if weights is None or not looks_like_path(str(weights)):
        return found
    path = Path(weights).expanduser()
    if path.name in KNOWN_CHECKPOINT_DATA:
        return found + KNOWN_CHECKPOINT_DATA[path.name]
    saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    return found + _names(saved.get("trained_on") if isinstance(saved, dict) else None, f"model.weights {path}")


def weights_stats(name: str, weights: str | None) -> tuple | None:
    """(mean, std) the weights were trained with, as torchvision weights' transforms, a checkpoint's {"normalization":
    {"mean", "std"}} or a known public checkpoint's file name say; None: use the dataset's own statistics."""
    if weights is None:
        return None
    if not looks_like_path(str(weights)):
        preset = _torchvision_weights(name, str(weights)).transforms()
        return tuple(preset.mean), tuple(preset.std)
    path = Path(weights).expanduser()
    if path.name in KNOWN_CHECKPOINT_STATS:
        return KNOWN_CHECKPOINT_STATS[path.name]
    saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    stats = saved.get("normalization") if isinstance(saved, dict) else None
    return (tuple(stats["mean"]), tuple(stats["std"])) if isinstance(stats, dict) else None
