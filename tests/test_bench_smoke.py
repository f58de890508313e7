"""Benchmarks that cannot rot unseen: every bench/ script's `--smoke` form (the same code path at tiny sizes) runs in a
subprocess and prints its table and its ratio line, and benches use sweep's public names only (no private name, no
patched module attribute), so a change to sweep that breaks a bench fails here."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))  # `_` files: helpers, not benches
# Benches that start a local Ray: they run in a test class of their own, so the two test processes share the load.
RAY_BENCHES = {"criteria_study_gpu.py", "data_sharing.py", "sweep_overhead.py", "tune_snapshot.py"}
NUMBER = r"-?\d+\.\d+"
# Per bench: a line of its table, and its ratio line (or the summary that stands for one).
EXPECTED = {
    "base_sharing.py": [r"^shared +2 +1 ", rf"^shared / caching-off wall = {NUMBER} \(ideal .* = {NUMBER}\)$"],
    "coverage.py": [r"^resnet18 +equivalent ", r"^ours: equivalent 1 \(of 1\)$"],
    "criteria_study_gpu.py": [r"^control +0\.0 +\d+ +1\.00$", r"^oracle +0\.5 +1 +\d+ ",
                              rf"^pruned / unpruned fine-tune images/s \(median over 2 settings\) = {NUMBER}$"],
    "data_sharing.py": [rf"^\| shared \| 1 \| {NUMBER} \| 1\.00x \|",
                        rf"^1 trials, shared against per-trial copy: {NUMBER}x the PSS$"],
    "fpgm_cost.py": [rf"^classifier\.0 \(1024, 10240\): exact sums {NUMBER} s; fpgm against exact: Spearman {NUMBER}",
                     rf"^  fpgm +{NUMBER} +\(x{NUMBER} l1, best runs\)$"],
    "latency_repeatability.py": [rf"^\| small_cnn \| beside 2 training processes \| {NUMBER} \|.* \| {NUMBER} \|$",
                                 rf"^\| resnet20 \| measurement phase \| {NUMBER} \|.* \| {NUMBER} \|$"],
    "prune_speed.py": [rf"^resnet18 +{NUMBER} +{NUMBER} +{NUMBER} \|", rf"^our time / Torch-Pruning's = {NUMBER} "],
    "speedup.py": [r"^resnet18 +0\.50 +8 ", rf"^speed-up / FLOPs factor at 50 % .*: cpu round_to=1: {NUMBER}"],
    "store_scale.py": [rf"^finished_trials +{NUMBER} +{NUMBER} +{NUMBER}$",
                       rf"^driver pre-Tune queries: empty {NUMBER} s, full {NUMBER} s, full / empty = {NUMBER}$",
                       rf"^sweep report on 40 runs: load_runs {NUMBER} s"],
    "sweep_overhead.py": [rf"^sweep Tune fit +{NUMBER} +{NUMBER}$", rf"^  sweep fine-tune \(train_time_s\) +{NUMBER}$",
                          rf"^overhead ratio, 1-epoch trials: sweep \(excl\. latency phase and report\) / plain = "
                          rf"{NUMBER}; with them {NUMBER}$"],
    "timm_coverage.py": [r"^LCNet +lcnet_050 +\| equivalent ", r"^ours: equivalent 1 \(of 1\)$"],
    "train_throughput.py": [rf"^cpu +small_cnn +256 +\d+ +\d+ +{NUMBER}$",
                            rf"^ours / plain images/s: cpu small_cnn {NUMBER}x$"],
    "tune_snapshot.py": [rf"^ +2 +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$",
                         rf"^num_to_keep=2 / num_to_keep=1 wall = {NUMBER}$"],
    "verify_sweep.py": [r"^sweep verify_smoke: 2 active trial runs .* 2 FINISHED, 2 distinct config hashes", r"^OK$"],
}


def _smoke(script: str) -> None:
    if script not in EXPECTED:
        pytest.fail(f"bench/{script} is new: give it a --smoke form and add the lines it prints to EXPECTED here")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=540, check=False)
    tail = f"\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"bench/{script} --smoke exited {proc.returncode}{tail}"
    for pattern in EXPECTED[script]:
        assert re.search(pattern, proc.stdout, re.MULTILINE), f"bench/{script} --smoke printed no {pattern!r}{tail}"


class TestSmoke:
    @pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in RAY_BENCHES])
    def test_runs_and_prints_its_table_and_ratio(self, script):
        _smoke(script)


def test_a_missing_optional_library_leaves_its_side_out_with_a_note():
    # torch_pruning made unimportable in the bench's process; only its side asked for, so no model is pruned
    blocked = ("import runpy, sys; sys.modules['torch_pruning'] = None; "
               "sys.argv = ['coverage.py', '--smoke', '--sides', 'tp']; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", blocked], cwd=BENCH, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch_pruning is not installed" in proc.stdout and "the tp side is left out" in proc.stdout, proc.stdout


class TestSmokeOnRay:
    @pytest.mark.parametrize("script", [s for s in SCRIPTS if s in RAY_BENCHES])
    def test_runs_and_prints_its_table_and_ratio(self, script):
        _smoke(script)


# --- public names only --------------------------------------------------------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(source: str) -> list[str]:
    """What a bench's source does with sweep beyond its public names: an imported private name, a private attribute
    of something imported from sweep, an assignment to an attribute of it (a patch), or setattr/delattr on it."""
    tree = ast.parse(source)
    bound: set[str] = set()  # names in the bench that stand for sweep modules or objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sweep":
            for alias in node.names:
                if _private(alias.name) or any(_private(part) for part in node.module.split(".")):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sweep":
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    bound.add(alias.asname or "sweep")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and _root(node) in bound:
            found.append(f"line {node.lineno}: private attribute {node.attr} of {_root(node)}")
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and _root(target) in bound:
                found.append(f"line {node.lineno}: assigns {target.attr} on {_root(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") \
                and node.args and _root(node.args[0]) in bound:
            found.append(f"line {node.lineno}: {node.func.id} on {_root(node.args[0])}")
    return found


def test_the_check_finds_each_kind_of_private_use():
    bad = ("from sweep.driver.launch import _trial_dirname, run_sweep\n"
           "from sweep.pruning import criteria\n"
           "import sweep.worker.trial as T\n"
           "def f():\n"
           "    from sweep.store import claims\n"
           "    limit = criteria._EXACT_LIMIT\n"
           "    claims.claim_trial = None\n"
           "    T.TrialState.save = None\n"
           "    setattr(T, 'run_trial', None)\n")
    found = private_uses(bad)
    assert sorted(int(f.split(":")[0].split()[1]) for f in found) == [1, 6, 7, 8, 9], found
    good = ("import torch\nfrom sweep.pruning import prune\nfrom sweep.store import tracking\n"
            "x = tracking.config_hash({})\ntorch.nn.modules.batchnorm._BatchNorm\nprune.__doc__\n")
    assert private_uses(good) == []


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_uses_public_names_of_sweep_only(script):
    assert private_uses((BENCH / script).read_text()) == []
