"""torch and torchvision must be one matching pair: the same build (CPU, or the same CUDA) and versions released
together. A mismatch (easy to get: a CPU torch from the CPU index beside a CUDA torchvision from PyPI) otherwise ends
the first trial with `RuntimeError: operator torchvision::nms does not exist`, which names neither cause nor fix.
Commands that build models call `torch_pair_problem()` first: one line naming both versions and the fix, or None.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

INDEX = "https://download.pytorch.org/whl"
# the messages torchvision raises on import when its compiled operators do not fit this torch
_SYMPTOMS = ("torchvision::", "different CUDA major versions", "Couldn't load custom C++ ops")


def _split(version: str) -> tuple[tuple[int, ...], str]:
    """'2.5.1+cpu' -> ((2, 5, 1), 'cpu'): the release numbers and the build tag ('' for a PyPI wheel)."""
    release, _, tag = version.partition("+")
    numbers = re.match(r"\d+(\.\d+)*", release)
    return (tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()), tag


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision released with a torch 2.x: 0.(minor + 15).patch (2.0.x had 0.15.(x + 1))."""
    major, minor, patch = (*_split(torch_version)[0], 0, 0, 0)[:3]
    if major != 2:
        return None
    return f"0.15.{patch + 1}" if minor == 0 else f"0.{minor + 15}.{patch}"


def _describe(build: str) -> str:
    if build == "cpu":
        return "a CPU build"
    return f"a CUDA {build[2:-1]}.{build[-1]} build" if re.fullmatch(r"cu\d{3,}", build) else f"a {build} build"


def fix_command(torch_version: str) -> str:
    """The pip command that installs the torchvision of this torch, the same build, keeping torch."""
    release, tag = _split(torch_version)
    vision = matching_torchvision(torch_version) or "<the torchvision of your torch, see github.com/pytorch/vision>"
    index = f" --index-url {INDEX}/{tag}" if tag else ""
    # a local tag (+cpu) already satisfies `==0.20.1`: without --force-reinstall pip would keep the wrong build
    return f"pip install --force-reinstall --no-deps torch=={'.'.join(map(str, release))} torchvision=={vision}{index}"


def pair_problem(torch_version: str, vision_version: str, torch_cuda: str | None = None,
                 import_error: str | None = None) -> str | None:
    """One line naming both versions and the fix when they do not match, else None. The versions are
    `torch.__version__` and torchvision's own `__version__` (with a build tag such as +cpu or +cu124 where the wheel
    has one); torch_cuda: torch.version.cuda; import_error: the message importing torchvision raised, if it did."""
    expected = matching_torchvision(torch_version)
    (t_release, t_tag), (v_release, v_tag) = _split(torch_version), _split(vision_version)
    # a build tag, else (a PyPI wheel: CUDA on Linux, CPU elsewhere) torch's CUDA version; '' when neither says
    t_build, v_build = t_tag or (f"cu{torch_cuda.replace('.', '')}" if torch_cuda else ""), v_tag
    why = []
    if expected is not None and v_release[:2] != _split(expected)[0][:2]:
        why.append(f"torchvision {expected} goes with torch {'.'.join(map(str, t_release))}")
    if t_build and v_build and t_build != v_build and (t_build == "cpu" or v_build == "cpu" or
                                                       t_build[:4] != v_build[:4]):  # cu12x: CUDA 12.x
        why.append(f"torch is {_describe(t_build)}, torchvision {_describe(v_build)}")
    if import_error is not None and any(s in import_error for s in _SYMPTOMS):
        why.append(f"importing torchvision failed: {' '.join(import_error.split())[:120]}")
    if not why:
        return None
    return (f"torch {torch_version} and torchvision {vision_version} do not match ({'; '.join(why)}); install the "
            f"matching pair: {fix_command(torch_version)}")


def _vision_version() -> str | None:
    """torchvision's own version string, with its build tag, read without importing it (importing is what fails)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text(encoding="utf-8")
    found = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.M)
    return found.group(1) if found else None


def torch_pair_problem() -> str | None:
    """Check the installed pair: versions and builds first, then whether torchvision imports at all."""
    vision = _vision_version()
    if vision is None:
        return None  # no torchvision: the import that needs it says so
    error = None
    try:
        import torchvision  # noqa: F401 -- its import registers the compiled operators that a mismatch lacks
    except (RuntimeError, ImportError, OSError, AssertionError) as e:
        error = f"{type(e).__name__}: {e}"
    problem = pair_problem(torch.__version__, vision, torch.version.cuda, error)
    if problem is None and error is not None:
        raise RuntimeError(error)  # some other failure: not this check's to explain
    return problem
