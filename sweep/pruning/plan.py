"""PrunePlan: which channels were removed, as JSON, re-applicable to a fresh model."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .graph import ChannelGraph
from .surgery import in_out_sizes, remove_channels, sizes_of


@dataclass
class PrunePlan:
    """Channels removed from the ORIGINAL model, by qualified module name.

    ``removed``: output channels of every conv, Linear and norm layer that lost some, and of per-channel parameters
    (e.g. ConvNeXt's ``layer_scale``), named by their qualified name. ``removed_in``: input channels of every conv
    and Linear that lost some (after a flatten, a channel is several consecutive Linear inputs).
    """

    removed: dict[str, list[int]] = field(default_factory=dict)
    removed_in: dict[str, list[int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "removed_in": self.removed_in, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePlan:
        try:
            return cls(
                removed={k: [int(i) for i in v] for k, v in d["removed"].items()},
                removed_in={k: [int(i) for i in v] for k, v in d.get("removed_in", {}).items()},
                info=dict(d.get("info", {})),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"plan: not a PrunePlan dict ({exc!r}); expected keys 'removed', 'removed_in'") from exc

    def channel_counts(self, base_model: nn.Module) -> list[tuple[str, str, int, int]]:
        """(module, type, channels before, after) for every conv and linear of ``base_model``."""
        return [(name, type(m).__name__, in_out_sizes(m)[1], in_out_sizes(m)[1] - len(self.removed.get(name, ())))
                for name, m in base_model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]

    def then(self, later: PrunePlan, original: nn.Module) -> PrunePlan:
        """This plan followed by ``later`` (whose indices refer to the model this plan produced)."""
        def compose(first: dict[str, list[int]], second: dict[str, list[int]], axis: int) -> dict[str, list[int]]:
            # a module this plan left whole still has its original indices
            out = {name: sorted(idx) for name, idx in second.items() if name not in first}
            for name in first:
                size = sizes_of(original, name)[axis]
                gone = set(first.get(name, ()))
                kept = [i for i in range(size) if i not in gone]
                gone |= {kept[i] for i in second.get(name, ())}
                out[name] = sorted(gone)
            return out

        return PrunePlan(compose(self.removed, later.removed, 1), compose(self.removed_in, later.removed_in, 0),
                         {**self.info, **later.info})


def plan_for(graph: ChannelGraph, removed_units: list[int]) -> PrunePlan:
    """The plan that removes exactly these units from the analysed model."""
    gone = torch.zeros(graph.num_units + 1, dtype=torch.bool)
    gone[torch.as_tensor(removed_units, dtype=torch.long)] = True
    gone[-1] = False
    plan = PrunePlan()
    for m in graph.members:
        idx = gone[m.units].nonzero().flatten().tolist()
        if not idx:
            continue
        if m.role == "in":
            plan.removed_in[m.module] = idx
        else:
            plan.removed[m.module] = idx
            if m.role == "dw":  # a depthwise conv's inputs are its outputs' channels
                plan.removed_in[m.module] = sorted({i // m.mult for i in idx})
    return plan


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A pruned copy of ``model`` (the same architecture the plan was made on); ``model`` is untouched."""
    pruned = copy.deepcopy(model)
    try:
        remove_channels(pruned, plan.removed, plan.removed_in)
    except (AttributeError, IndexError, TypeError, RuntimeError) as exc:
        raise ValueError(f"plan: does not fit this model ({exc}); apply it to the base model it was made from") from exc
    return pruned


def save_pruned(f: str | Path | BinaryIO, model: nn.Module, plan: PrunePlan) -> None:
    """Save plan + state_dict (no pickled modules), loadable with ``torch.load(weights_only=True)``."""
    torch.save({"plan": plan.to_dict(), "state_dict": model.state_dict()}, f)


def load_pruned(f: str | Path | BinaryIO | bytes, base_model: nn.Module,
                map_location: str | torch.device = "cpu") -> tuple[nn.Module, PrunePlan]:
    """Rebuild a pruned model from its base architecture and a checkpoint written by ``save_pruned``."""
    if isinstance(f, bytes):
        f = io.BytesIO(f)
    try:
        ckpt = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint: cannot be read safely ({type(exc).__name__}: {str(exc)[:200]}); "
                         "expected a file written by sweep.pruning.save_pruned") from exc
    if not isinstance(ckpt, dict) or "plan" not in ckpt or "state_dict" not in ckpt:
        raise ValueError("checkpoint: not a pruned checkpoint (needs 'plan' and 'state_dict'); "
                         "expected a file written by sweep.pruning.save_pruned")
    plan = PrunePlan.from_dict(ckpt["plan"])
    model = apply_plan(base_model, plan)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint: weights do not fit the pruned {type(base_model).__name__} "
                         f"({str(exc).splitlines()[0]}); load it with the base model it was pruned from") from exc
    return model, plan
