"""Structural filter pruning for CNNs: a library of its own (imports only torch).

    from sweep.pruning import prune
    result = prune(model, torch.randn(1, 3, 224, 224), strategy="l1", ratio=0.5)
    result.model, result.plan
"""

from .criteria import NEEDS_CALIBRATION, STRATEGIES
from .graph import ChannelGraph, PruningError, analyse
from .plan import PrunePlan, apply_plan, load_pruned, save_pruned
from .prune import SCOPES, TARGETS, PruneResult, prune
from .verify import relative_error, zeroed_reference

__all__ = [
    "STRATEGIES", "NEEDS_CALIBRATION", "SCOPES", "TARGETS", "ChannelGraph", "PruningError", "analyse",
    "PrunePlan", "apply_plan", "load_pruned", "save_pruned", "PruneResult", "prune", "relative_error",
    "zeroed_reference",
]
