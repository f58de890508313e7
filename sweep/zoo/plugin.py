"""A user's own model or dataset, by import path: `resolve_factory("mypkg.nets:build", "model.factory", ModelError)`.

Apart from the zoo's torch code so that checking a spec (sweep.config) can import the user's module and name a
misspelt one, "did you mean 'build'", or tell a checkpoint path from a weights name, without loading torch itself.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".th", ".ckpt")


def looks_like_path(weights: str) -> bool:
    """Whether model.weights names a checkpoint file; anything else is a torchvision weights name such as DEFAULT."""
    return "/" in weights or "\\" in weights or weights.endswith(CHECKPOINT_SUFFIXES) \
        or Path(weights).expanduser().exists()


def _did_you_mean(wrong: str, candidates: Iterable[str]) -> str:
    """"did you mean 'x'?" for the nearest candidate, or '' when none is near."""
    near = difflib.get_close_matches(wrong, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{near[0]}'?" if near else ""


def _sibling_modules(missing: str) -> list[str]:
    """Full names of the modules beside `missing`: in its package (imported already), or on the path for a top-level
    one (the working directory first: sys.path holds it by then)."""
    parent, _, _ = missing.rpartition(".")
    if parent:
        where = getattr(sys.modules.get(parent), "__path__", None)
        return [f"{parent}.{m.name}" for m in pkgutil.iter_modules(where)] if where is not None else []
    return [m.name for m in pkgutil.iter_modules()]


def resolve_factory(path: str, field: str, error: Callable[[str, str], Exception]) -> Callable:
    """The callable named by "package.module:function" (a dotted attribute path after the colon is allowed); a problem
    raises error(field, text), the text one line saying what is wrong (with the nearest name when a module or function
    is misspelt) and the fix. The working directory goes on sys.path first (docs/design.md, "The zoo": why, and how
    Ray workers find the module).
    """
    module_name, colon, attribute = str(path).partition(":")
    if not colon or not all(part.isidentifier() for part in [*module_name.split("."), *attribute.split(".")]):
        raise error(field, f"'{path}' is not an import path; write 'package.module:function' (a function "
                    f"in a .py file importable from the working directory or an installed package)")
    # the working directory, and in a Ray Tune trial (which runs in a directory of its own) the one it started in
    for folder in (os.getcwd(), os.environ.get("TUNE_ORIG_WORKING_DIR")):
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):  # the module itself, not an import
            hint = _did_you_mean(e.name, _sibling_modules(e.name))
            hint = f" ({hint})" if hint else ""
            raise error(field, f"cannot import module '{module_name}' (from '{path}'): no such module on the path"
                        f"{hint}; run from the folder holding it, install its package, or on a cluster ship it with "
                        f"runtime_env working_dir/py_modules") from None
        raise error(field, f"importing '{module_name}' failed: {e}") from e
    except Exception as e:  # the user's module raised while importing: say so, in one line
        raise error(field, f"importing '{module_name}' failed: {type(e).__name__}: {' '.join(str(e).split())}") from e
    for part in attribute.split("."):
        if not hasattr(obj, part):
            offered = [name for name in dir(obj) if not name.startswith("_") and callable(getattr(obj, name, None))]
            hint = _did_you_mean(part, offered) or (f"it has {', '.join(sorted(offered)[:8])}" if offered else "")
            raise error(field, f"module '{module_name}' has no attribute '{attribute}'{f'; {hint}' if hint else ''}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(field, f"'{path}' is not callable; name a function or class")
    return obj
