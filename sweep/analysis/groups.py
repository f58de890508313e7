"""Layer groups of a network, and pruning one of them (or several, each at its own ratio) with the real pruner.

A *layer group* is what the pruner ranks and rounds together (a `ChannelGraph.layers` entry): the filters of one
conv, or every conv tied to one residual stream. Its name is its first producer in module order; the others are
listed in `modules` ("conv1 +9 tied" for a CIFAR ResNet's stream, whose 16 channels run through every stage).

    groups = layer_groups(model, example)
    one = prune_group(model, example, groups, groups[3], 0.5, "l1")        # that group alone, 50 % of its filters
    per = prune_per_layer(model, example, {"layer1.*.conv1": 0.625}, "l1")  # a spec's prune.ratios
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sweep.pruning import ChannelGraph, PruneResult, analyse, prune
from sweep.pruning.criteria import Calibration
from sweep.pruning.plan import PrunePlan


@dataclass
class LayerGroup:
    index: int  # position in ChannelGraph.layers (of the graph analysed with the same ignore list)
    name: str  # first producer module in model order
    modules: list[str]  # every producer module whose filters are these units
    width: int  # the channels a ratio applies to (the pruner's layer_width: the narrowest producer)
    units: list[int] = field(default_factory=list)  # unit indices in the graph

    @property
    def label(self) -> str:
        return self.name if len(self.modules) == 1 else f"{self.name} +{len(self.modules) - 1} tied"


def groups_of(model: nn.Module, graph: ChannelGraph) -> list[LayerGroup]:
    """The layer groups of an analysed model, in the order of their first producer in the model."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    producers: list[set[str]] = [set() for _ in graph.layers]
    for label, (module, _) in graph.producer.items():
        if graph.unit_of_label[label] >= 0:
            producers[graph.unit_layer[graph.unit_of_label[label]]].add(module)
    groups = []
    for i, modules in enumerate(producers):
        ranked = sorted(modules, key=lambda m: order.get(m, len(order)))
        groups.append(LayerGroup(i, ranked[0], ranked, graph.layer_width[i], list(graph.layers[i])))
    return sorted(groups, key=lambda g: order.get(g.name, len(order)))


def layer_groups(model: nn.Module, example: torch.Tensor, ignore: Sequence[str] = ()) -> list[LayerGroup]:
    """Every group of filters the pruner can remove from ``model`` (apart from ``ignore``)."""
    return groups_of(model, analyse(model, (example,), tuple(ignore)))


def prune_group(model: nn.Module, example: torch.Tensor, groups: Sequence[LayerGroup], group: LayerGroup,
                ratio: float, strategy: str = "l1", calibration: Calibration | None = None,
                ignore: Sequence[str] = (), min_channels: float = 1, round_to: int = 1,
                seed: int = 0) -> PruneResult:
    """``prune()`` of ``group`` alone at ``ratio``, every other group ignored: exactly what a sweep with that ratio
    and every other layer in ``prune.ignore`` removes (the group is scored on the whole network as usual)."""
    others = [m for g in groups if g.index != group.index for m in g.modules]
    return prune(model, example, strategy=strategy, ratio=ratio, scope="local", calibration=calibration,
                 min_channels=min_channels, round_to=round_to, ignore=[*ignore, *others], seed=seed)


def prune_per_layer(model: nn.Module, example: torch.Tensor, ratios: dict[str, float], strategy: str = "l1",
                    ignore: Sequence[str] = (), calibration: Calibration | None = None, seed: int = 0
                    ) -> tuple[nn.Module, PrunePlan]:
    """Prune each layer group at the ratio of the first pattern of ``ratios`` that matches one of its convs (0: keep
    it whole); groups that match no pattern, or match ``ignore``, keep every filter: a spec's
    ``prune: {ratio: 0, ratios: {...}}``."""
    result = prune(model, example, strategy=strategy, ratio=0, ratios=dict(ratios), calibration=calibration,
                   ignore=list(ignore), seed=seed)
    return result.model, result.plan
