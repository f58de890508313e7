"""The two pruners the coverage benches compare, each as (model, example) -> (pruned model, PrunePlan): ours, and
Torch-Pruning's MetaPruner at the same settings (L1 at 0.5, local, the classifier kept) with its groups read back
as our plan, so one equivalence check judges both. Not a bench: the smoke test skips `_` files."""

from __future__ import annotations

import copy

import torch


def ours(model: torch.nn.Module, x: torch.Tensor):
    from sweep.pruning import prune

    result = prune(model, x, strategy="l1", ratio=0.5)
    return result.model, result.plan


def torch_pruning(model: torch.nn.Module, x: torch.Tensor):
    import torch_pruning as tp

    from sweep.pruning import PrunePlan
    from sweep.pruning.surgery import sizes_of

    pruned = copy.deepcopy(model)
    names = {id(m): n for n, m in pruned.named_modules()} | {id(p): n for n, p in pruned.named_parameters()}
    head = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)][-1:] or \
        [[m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)][-1]]
    pruner = tp.pruner.MetaPruner(pruned, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=head, global_pruning=False)
    plan = PrunePlan()
    alive: dict[str, list[int]] = {}  # original channel of each current one: a module several groups touch
    for group in pruner.step(interactive=True):  # (DenseNet's norms after a cat) is indexed as it is now
        now: dict[str, set[int]] = {}
        for dep, idxs in group:
            if dep.handler.__name__ == "prune_out_channels" and id(dep.target.module) in names:
                now.setdefault(names[id(dep.target.module)], set()).update(int(i) for i in idxs)
        for name, idxs in now.items():
            if name not in alive:
                try:
                    alive[name] = list(range(sizes_of(model, name)[1]))
                except TypeError:  # a module type we do not prune: take its indices as they are
                    alive[name] = list(range(max(idxs) + 1))
            gone = {alive[name][i] for i in idxs}
            plan.removed.setdefault(name, []).extend(sorted(gone))
            alive[name] = [c for c in alive[name] if c not in gone]
        group.prune()
    return pruned, plan
