"""The dependency rule of DESIGN.md, checked: `sweep.pruning` is a library of its own that needs only torch."""

import subprocess
import sys

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
    code = ("import sys; from sweep.trial import sweep_trial; "
            "heavy = ('matplotlib', 'sweep.report', 'sweep.orchestrate', 'optuna'); "
            "print(sorted(m for m in heavy if m in sys.modules)); "
            "print(sweep_trial.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]", "sweep.trial"], out.stdout + out.stderr
    from sweep import orchestrate, trial

    assert orchestrate.sweep_trial is trial.sweep_trial  # the trainable Tune gets


def test_the_tune_workers_of_forked_trials_import_no_torch():
    """Under `resources.process: fork` a trial's Tune worker only relays: importing torch or MLflow there would
    cost each trial the process it saves (what the trainable and its relay import, checked in a fresh interpreter)."""
    code = ("import sys; from sweep.forked import forked_trial; from sweep.progress import quiet_ray_logs; "
            "from ray import tune; "
            "print(sorted(m for m in ('torch', 'torchvision', 'mlflow', 'sweep.trial') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]"], out.stdout + out.stderr
