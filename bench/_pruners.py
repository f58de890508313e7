"""The two pruners the coverage benches compare, each as (model, example) -> (pruned model, PrunePlan): ours, and
Torch-Pruning's MetaPruner at the same settings (L1 at 0.5, local, the classifier kept) with its groups read back
as our plan, so one equivalence check judges both; and how those benches run one model and side in a process of
its own (memory, crashes, a time limit). Not a bench: the smoke test skips `_` files."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable

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


def installed_sides(sides: list[str]) -> list[str]:
    """The sides asked for, less Torch-Pruning's where it is not installed (said in a line)."""
    if "tp" in sides and importlib.util.find_spec("torch_pruning") is None:
        print("torch_pruning is not installed (pip install -e '.[bench]'): the tp side is left out")
        return [s for s in sides if s != "tp"]
    return sides


def child(run_one: Callable[[str, str], dict], name: str, side: str) -> None:
    """A bench's `--one MODEL SIDE` process: its result as the last line of stdout, nothing else said."""
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    print(json.dumps(run_one(name, side)))


def in_own_process(script: str, threads: int, name: str, side: str, timeout: float) -> dict:
    """`script --one name side` in a child process: its result, or why there is none (crashed, killed, timeout)."""
    try:
        proc = subprocess.run([sys.executable, script, "--threads", str(threads), "--one", name, side],
                              capture_output=True, text=True, timeout=timeout, env=os.environ, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"over {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode == -9:  # SIGKILL: the kernel's OOM killer, when memory ran out
        return {"status": "killed", "note": "SIGKILL (out of memory?)"}
    return {"status": "crashed", "note": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def print_counts(results: dict[str, dict[str, dict]], sides: list[str]) -> None:
    """Per side, how many models ended in each status."""
    for side in sides:
        counts: dict[str, int] = {}
        for row in results.values():
            counts[row[side]["status"]] = counts.get(row[side]["status"], 0) + 1
        print(f"{side}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(results)})")
