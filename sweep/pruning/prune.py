"""prune(): score units, pick which to remove, cut them out; one-shot or iterative."""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .criteria import NEEDS_CALIBRATION, STRATEGIES, Calibration
from .graph import ChannelGraph, PruningError, analyse, matches
from .plan import PrunePlan, plan_for
from .surgery import in_out_sizes, remove_channels

log = logging.getLogger("sweep.pruning")
SCOPES = ("local", "global")
TARGETS = ("channels", "flops")


@dataclass
class PruneResult:
    model: nn.Module
    plan: PrunePlan


def _keep_at_least(width: int, min_channels: float) -> int:
    if isinstance(min_channels, float) and min_channels < 1:
        return max(1, math.ceil(min_channels * width))
    return max(1, int(min_channels))


def _round_removal(width: int, k: int, round_to: int) -> int:
    """Largest removal <= k that leaves a width that is a multiple of round_to (or the full width)."""
    if round_to <= 1 or k == 0:
        return k
    kept = math.ceil((width - k) / round_to) * round_to
    return max(0, width - min(kept, width))


def _limits(graph: ChannelGraph, min_channels: float) -> list[int]:
    """How many units each layer may lose without any of its producers going below the minimum."""
    return [max(0, min(min(units, width - _keep_at_least(width, min_channels)) for width, units in sizes))
            for sizes in graph.producer_sizes]


def _select_local(graph, scores, ratio, limits, round_to) -> list[int]:
    """``ratio``: one fraction for every layer, or one per layer."""
    removed = []
    for i, units in enumerate(graph.layers):
        width = graph.layer_width[i]
        wanted = int((ratio[i] if isinstance(ratio, list) else ratio) * width + 1e-9)
        if wanted > limits[i]:
            graph.clamped.add(i)
        k = _round_removal(width, min(limits[i], wanted), round_to)
        idx = torch.as_tensor(units)
        removed += idx[torch.argsort(scores[idx], stable=True)][:k].tolist()
    return removed


def _select_global(graph, scores, ratio, limits, round_to) -> list[int]:
    # Molchanov et al.'s layer-wise L2 normalisation makes scores comparable across layers; we scale it by
    # sqrt(width) (i.e. divide by the RMS) so that a 4096-wide Linear is not emptied before a 64-wide conv loses any.
    normalised = scores.clone()
    for units in graph.layers:
        idx = torch.as_tensor(units)
        normalised[idx] = scores[idx] * len(units) ** 0.5 / (scores[idx].norm() + 1e-12)
    budget = int(ratio * sum(graph.layer_width) + 1e-9)
    chosen: list[list[int]] = [[] for _ in graph.layers]
    for u in torch.argsort(normalised).tolist():
        if budget == 0:
            break
        layer = graph.unit_layer[u]
        if len(chosen[layer]) < limits[layer]:
            chosen[layer].append(u)
            budget -= 1
        else:
            graph.clamped.add(layer)
    removed = []
    for i, units in enumerate(chosen):  # drop the best of the chosen until the width is round
        removed += units[:_round_removal(graph.layer_width[i], len(units), round_to)]
    return removed


def _estimated_flops(graph: ChannelGraph, model: nn.Module, plan: PrunePlan) -> float:
    """FLOPs after removing ``plan`` from the analysed model: conv/linear FLOPs scale with kept inputs x outputs."""
    total = 0.0
    for name, flops in graph.module_flops.items():
        m = model.get_submodule(name)
        n_in, n_out = in_out_sizes(m)
        keep_out = 1 - len(plan.removed.get(name, ())) / n_out
        keep_in = 1 - len(plan.removed_in.get(name, ())) / n_in
        depthwise = isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels
        total += flops * (keep_out if depthwise else keep_out * keep_in)
    return total


def _one_step(model, graph, scores, ratio, scope, target, flops_goal, limits, round_to) -> PrunePlan:
    select = _select_local if scope == "local" else _select_global
    if target == "channels":
        return plan_for(graph, select(graph, scores, ratio, limits, round_to))
    # FLOPs target: the smallest channel ratio whose estimate reaches the goal (bisection).
    lo, hi = 0.0, 1.0
    best = plan_for(graph, select(graph, scores, hi, limits, round_to))
    if _estimated_flops(graph, model, best) > flops_goal:
        log.warning("target: FLOPs can fall only to %.0f, not %.0f, without emptying a layer or touching "
                    "the output; pruning as far as the guards allow", _estimated_flops(graph, model, best), flops_goal)
        return best
    graph.clamped.clear()  # the search probes ratios beyond the answer: report only the answer's clamps
    for _ in range(24):
        mid = (lo + hi) / 2
        plan = plan_for(graph, select(graph, scores, mid, limits, round_to))
        if _estimated_flops(graph, model, plan) <= flops_goal:
            hi, best = mid, plan
        else:
            lo = mid
    return best


def _layer_ratios(graph: ChannelGraph, ratio: float, ratios: Mapping[str, float]) -> list[float]:
    """Each layer's ratio: that of the first pattern matching its narrowest producer (ties by name);
    if that producer matches none, the next narrowest that does; else ``ratio``."""
    out = []
    for producers, sizes in zip(graph.layer_producers, graph.producer_sizes):
        found = {}
        for _, name in sorted((width, name) for name, (width, _) in zip(producers, sizes)):
            pattern = next((p for p in ratios if matches(name, p)), None)
            if pattern is not None:
                found.setdefault(ratios[pattern], (name, pattern))
        if len(found) > 1:
            log.warning("ratios: coupled layers %s must lose the same channels but match patterns with different "
                        "ratios; using %r from its narrowest matching producer %s",
                        sorted(producers), next(iter(found.values()))[1], next(iter(found.values()))[0])
        out.append(next(iter(found), ratio))
    return out


def _check_args(strategy, ratio, scope, target, calibration, min_channels, round_to, steps, ratios) -> None:
    if strategy not in STRATEGIES:
        raise PruningError(f"strategy: unknown '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    low_ok = ratios is not None and ratio == 0  # ratio=0 with ratios: prune only the listed layers
    if not isinstance(ratio, (int, float)) or not (0 < ratio < 1 or low_ok):
        raise PruningError(f"ratio: {ratio!r} is outside (0, 1); use a fraction such as 0.5")
    if ratios is not None:
        if scope != "local" or target != "channels":
            raise PruningError(f"ratios: per-layer ratios need scope='local' and target='channels', not "
                               f"scope={scope!r}, target={target!r}; drop ratios or use the defaults")
        for pattern, value in ratios.items():
            if not isinstance(pattern, str) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise PruningError(f"ratios: {pattern!r}: {value!r} must be a fraction in [0, 1) keyed by a "
                                   "module name or shell pattern")
    if scope not in SCOPES:
        raise PruningError(f"scope: unknown '{scope}'; choose 'local' or 'global'")
    if target not in TARGETS:
        raise PruningError(f"target: unknown '{target}'; choose 'channels' or 'flops'")
    if strategy in NEEDS_CALIBRATION and calibration is None:
        raise PruningError(f"calibration: strategy '{strategy}' needs data; pass calibration=[(inputs, targets), ...]")
    if not (isinstance(min_channels, int) and min_channels >= 1) and not (
            isinstance(min_channels, float) and 0 < min_channels < 1):
        raise PruningError(f"min_channels: {min_channels!r} must be an int >= 1 or a fraction in (0, 1)")
    if not isinstance(round_to, int) or round_to < 1:
        raise PruningError(f"round_to: {round_to!r} must be an int >= 1")
    if not isinstance(steps, int) or steps < 1:
        raise PruningError(f"steps: {steps!r} must be an int >= 1")


def _check_prunable(model: nn.Module, graph: ChannelGraph) -> None:
    """Never a silent no-op: say why nothing can be removed, and which layers the pruner does not know."""
    unknown = ", ".join(f"'{n}' ({t})" for n, t in graph.kept_whole.items())
    if not graph.producer:
        raise PruningError(f"model: {type(model).__name__} has no conv or Linear layer the pruner can shrink"
                           + (f"; layers of types it does not know: {unknown}" if unknown else ""))
    if graph.kept_whole:
        log.warning("model: layers of types the pruner does not know keep all their channels: %s", unknown)
    if graph.num_units == 0:  # what `ignore` left (a model with nothing removable of its own is refused by analyse)
        log.warning("model: no channel of %s can be removed outside the ignored modules", type(model).__name__)


def _own_tensors(copied: nn.Module, original: nn.Module) -> None:
    """Give ``copied`` its own copy of every tensor it still shares with ``original`` (tied ones stay tied)."""
    theirs = {id(t) for t in itertools.chain(original.parameters(), original.buffers())}
    clones: dict[int, torch.Tensor] = {}
    for m in copied.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None and id(t) in theirs:
                    if id(t) not in clones:
                        clone = t.detach().clone()
                        clones[id(t)] = nn.Parameter(clone, t.requires_grad) if isinstance(t, nn.Parameter) else clone
                    table[name] = clones[id(t)]


def _step_ratio(ratio: float, step: int, steps: int) -> float:
    """The fraction of what is left to remove at ``step`` so that ``ratio`` is reached evenly by ``steps``."""
    done, goal = ratio * (step - 1) / steps, ratio * step / steps
    return 1 - (1 - goal) / (1 - done)


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    strategy: str = "l1",
    ratio: float = 0.5,
    scope: str = "local",
    target: str = "channels",
    calibration: Calibration | None = None,
    min_channels: int | float = 1,
    round_to: int = 1,
    ignore: Sequence[str] = (),
    steps: int = 1,
    callback: Callable[[nn.Module, int], None] | None = None,
    seed: int = 0,
    ratios: Mapping[str, float] | None = None,
) -> PruneResult:
    """Remove conv filters (and everything that depends on them) from a copy of ``model``.

    ``ratio`` is the fraction of channels (target="channels") or of FLOPs (target="flops")
    to remove. With ``steps > 1`` pruning is iterative: after each step but the last,
    ``callback(model, step)`` may fine-tune the partly pruned model in place; scores are
    recomputed on the updated weights. ``calibration`` (an iterable of (inputs, targets),
    re-iterated each step) feeds taylor and apoz.

    ``ratios`` sets per-layer channel ratios in [0, 1) (0 keeps the layer whole), keyed by module
    names or shell patterns matched like ``ignore``; the first matching pattern in dict order wins;
    other layers take ``ratio``, which may then be 0 (prune only the listed layers). Channels that
    must be removed together (a residual stream, say) form one group with several producers: the
    group takes the ratio of its narrowest producer that matches a pattern (ties by name), the same
    producer whose width the ratio is counted in. Only with scope="local" and target="channels".
    """
    _check_args(strategy, ratio, scope, target, calibration, min_channels, round_to, steps, ratios)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if ratios is not None:
        names = [n for n, _ in model.named_modules()]
        unknown = [p for p in ratios if not any(matches(n, p) for n in names)]
        if unknown:
            raise PruningError(f"ratios: {unknown} match no module of {type(model).__name__}; "
                               "use module names as in model.named_modules() or shell patterns such as 'layer*.conv1'")
    # Without calibration nothing writes to the copy's tensors before surgery replaces those it slices, so the copy
    # starts out sharing them and owns them after each step: copying a ResNet-50's weights was 40 % of prune time.
    shared = strategy not in NEEDS_CALIBRATION
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())} if shared else {}
    current = copy.deepcopy(model, memo)  # a memo of the original's tensors: the copy shares them
    plan = PrunePlan(info={"strategy": strategy, "ratio": ratio, "scope": scope, "target": target,
                           "steps": steps, "min_channels": min_channels, "round_to": round_to})
    if ratios is not None:
        plan.info["ratios"] = dict(ratios)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        graph = analyse(current, inputs, ignore)
        if step == 1:
            _check_prunable(model, graph)
            base_flops = graph.total_flops
        goal = ratio * step / steps
        step_ratio = _step_ratio(ratio, step, steps) if ratios is None else [
            _step_ratio(r, step, steps) for r in _layer_ratios(graph, ratio, ratios)]
        scores = STRATEGIES[strategy](current, graph, calibration, generator)
        step_plan = _one_step(current, graph, scores, step_ratio, scope, target,
                              base_flops * (1 - goal), _limits(graph, min_channels), round_to)
        if graph.clamped and target == "channels":
            log.warning("ratio: %d layer(s) cannot lose a fraction %.3g of their channels without going below "
                        "min_channels=%s or touching channels that must stay (output, padding, ignore); "
                        "pruned them as far as allowed", len(graph.clamped),
                        max(step_ratio) if isinstance(step_ratio, list) else step_ratio, min_channels)
        remove_channels(current, step_plan.removed, step_plan.removed_in)
        if shared:
            _own_tensors(current, model)
        plan = plan.then(step_plan, model)
        if callback is not None and step < steps:
            callback(current, step)
    if not plan.removed and graph.num_units:
        log.warning("ratio: nothing was removed from %s: %s of each layer rounds down to 0 channels",
                    type(model).__name__, ratio if ratios is None else "the ratio asked")
    return PruneResult(current, plan)
