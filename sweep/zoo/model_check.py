"""Which registered models the pruner handles, for `sweep models`.

Checking means what the preflight does before a sweep: build the network and trace it for the pruner
(`sweep.pruning.analyse`) at 3x224x224 (32x32 for our CIFAR zoo). Doing that for all ~86 names would take a minute,
so one member of each family is checked (resnet18 for resnet18..152, vit_b_16 for every ViT: a family shares its
building blocks, and so the ops the pruner must understand) and its answer shown for the family. Networks are built
on PyTorch's "meta" device: shapes only, no memory for weights, no weights downloaded. Nothing is cached.
"""

from __future__ import annotations

import re
import warnings

import torch

from sweep.pruning import PruningError, analyse
from sweep.zoo.models import MODELS, build_model, model_names

_FAMILY = re.compile(r"^(regnet_[xy]|[a-z]+(?:_v\d)?)")
_SIZES = {"t": 0, "tiny": 0, "s": 1, "small": 1, "b": 2, "m": 2, "base": 2, "l": 3, "large": 3, "h": 4}


def _cost(name: str) -> tuple:
    """Sort key that puts a family's smallest variant first (mobilenet_v3_small, swin_t, regnet_x_400mf)."""
    return name.endswith("gf"), _SIZES.get(name.rsplit("_", 1)[-1], 1.5), len(name), name


def family(name: str) -> str:
    """resnet18 -> resnet, efficientnet_v2_s -> efficientnet_v2, regnet_y_8gf -> regnet_y; zoo names are their own."""
    if name in MODELS:
        return "cifar_resnet" if re.fullmatch(r"resnet\d+", name) else name
    return _FAMILY.match(name).group(1)


def check(name: str) -> str | None:
    """None if the pruner can trace `name`, else its reason in one line."""
    side = 32 if name in MODELS else 224
    x = torch.zeros(1, 3, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = build_model(name, 10).eval()
            x = x.to("meta")
        except NotImplementedError:  # an initialiser that reads values (RegNet): build it for real
            model = build_model(name, 10).eval()
        try:
            analyse(model, (x,))
        except PruningError as error:
            text = " ".join(str(error).split())
            return text.split(" (fx node")[0].split("; ")[0]
    return None


def pruner_support(names: list[str] | None = None) -> list[tuple[str, bool, str]]:
    """(name, handled, note) for every model: the note gives the pruner's reason or the family member checked."""
    names = model_names() if names is None else names
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(family(name), []).append(name)
    checked = {key: min(members, key=_cost) for key, members in groups.items()}
    reasons = {key: check(name) for key, name in checked.items()}
    rows = []
    for name in names:
        checked_as, reason = checked[family(name)], reasons[family(name)]
        note = (reason or "") if checked_as == name else f"as {checked_as}" + (f": {reason}" if reason else "")
        rows.append((name, reason is None, note))
    return rows
