"""The dependency rules of docs/design.md, checked: `sweep.pruning` is a library of its own that needs only torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CODE = """
import sys, importlib.metadata as md, re
import torch
import torch.fx
torch.fx.symbolic_trace(torch.nn.Conv2d(3, 8, 3))  # what torch itself loads, lazily, to trace a model
with_torch = set(sys.modules)
from sweep.pruning import prune
prune(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)),
      torch.randn(1, 3, 8, 8), strategy="l1", ratio=0.5)
loaded = {m.split(".")[0] for m in set(sys.modules) - with_torch} - set(sys.stdlib_module_names)

def requirements(dist):  # torch and what it requires, transitively (sympy, networkx, ...): torch's own business
    seen, todo = set(), [dist]
    while todo:
        name = re.split(r"[^A-Za-z0-9_.-]", todo.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [r for r in (md.requires(name) or []) if "extra ==" not in r]
        except md.PackageNotFoundError:
            pass
    return seen

allowed = requirements("torch")
providers = md.packages_distributions()
foreign = [m for m in loaded if not any(d.lower().replace("_", "-") in allowed for d in providers.get(m, []))]
print(sorted(foreign))
"""


def test_the_pruner_imports_nothing_but_torch():
    # A fresh interpreter, so what other tests imported does not count.
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['sweep']", out.stdout + out.stderr


def test_ruff_is_clean():
    """The lint configuration in pyproject.toml holds for the whole tree (ruff comes with the test extra)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "sweep", "tests", "bench"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_trial_workers_import_neither_the_driver_nor_plotting():
    """Ray imports the trainable's module in every trial worker: it must not bring the driver's orchestration or the
    report's plotting along (seconds of every worker's start), only what a trial runs."""
    code = ("import sys; from sweep.worker.trial import sweep_trial; "
            "heavy = ('matplotlib', 'sweep.report', 'sweep.driver', 'sweep.analysis', 'optuna'); "
            "print(sorted(m for m in heavy if m in sys.modules)); "
            "print(sweep_trial.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]", "sweep.worker.trial"], out.stdout + out.stderr
    from sweep.driver import launch
    from sweep.worker import trial

    assert launch.sweep_trial is trial.sweep_trial  # the trainable Tune gets


# The folders of sweep/ are its layers, top first (docs/design.md, "Layers"). A module may import from its own folder
# and from any folder below its own; sweep/errors.py (the one exception type for bad input) from anywhere.
LAYERS = ["cli", "analysis", "driver", "report", "worker", "store", "config", "zoo", "pruning"]
PACKAGE = Path(__file__).resolve().parents[1] / "sweep"


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported sweep module, inside a function) for every import of a sweep module in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, ast.ImportFrom)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sweep":
            targets = [f"sweep.{a.name}" for a in node.names] if node.module == "sweep" else [node.module]
            found += [(node.lineno, target, id(node) in nested) for target in targets]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "." * node.level + (node.module or ""), id(node) in nested))
    return found


def _folder(module_or_path: str) -> str:
    parts = module_or_path.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_down_the_layers():
    wrong = []
    for module, path in _modules().items():
        mine = "cli" if module == "sweep.cli" else _folder(module)
        for line, target, _ in _imports(path):
            if target.startswith("."):  # relative imports only inside sweep.pruning, which must stand alone
                if mine != "pruning":
                    wrong.append(f"{path.name}:{line} relative import {target}")
                continue
            theirs = _folder(target)
            if theirs == "errors" or theirs == mine:
                continue
            if mine == "errors" or theirs not in LAYERS or LAYERS.index(theirs) <= LAYERS.index(mine):
                wrong.append(f"{module}:{line} imports {target} ({mine} -> {theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles_between_modules():
    """Imports at module level form no cycle (an import inside a function does not hide one: the rule above)."""
    modules = _modules()
    edges = {m: {t for _, t, _ in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def cycle_from(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (found := cycle_from(nxt, stack + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(modules):
        if start not in state and (found := cycle_from(start, [start])):
            raise AssertionError(" -> ".join(found))


def test_the_layer_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself can fail: a store module that imports the driver is reported."""
    fake = tmp_path / "sweep"
    (fake / "store").mkdir(parents=True)
    (fake / "store" / "x.py").write_text("from sweep.driver.launch import run_sweep\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="store -> driver"):
        test_every_import_points_down_the_layers()
