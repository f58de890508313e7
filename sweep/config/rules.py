"""Rules across fields, written once over a `View` of every value a sweep (or the one trial of a TrialConfig) may
give each trial path, never enumerating a grid (why: docs/design.md, "The config layer")."""

import functools
import itertools
import operator
from pathlib import Path
from typing import Any

from sweep.config.explain import show
from sweep.zoo.plugin import looks_like_path


class View:
    """The values a sweep can give each trial path, and where each comes from (for messages); with only a trial dict,
    that one trial. `space`: path -> sweep.config.spec.Domain; `invalid`: paths that failed their own check."""

    def __init__(self, trial: dict, space: dict | None = None, origin: dict | None = None,
                 invalid: frozenset = frozenset()):
        self.trial, self.space, self.origin, self.invalid = trial, space or {}, origin or {}, invalid

    def where(self, path: str) -> str:
        """Where a trial path is set: its place in the space, or the path itself (a fixed one, or inside an item)."""
        return self.origin.get(path, path)

    def ok(self, *paths: str) -> bool:
        return not any(p == bad or p.startswith(bad + ".") for p in paths for bad in self.invalid)

    def _items(self, path: str) -> list[tuple[Any, str]]:
        domain, at = self.space[path], self.origin[path]
        if domain.kind == "fixed":
            return [(domain.values[0], at)]
        return [(v, f"{at}.{domain.kind}[{i}]") for i, v in enumerate(domain.values)]

    def values(self, path: str) -> list[tuple[Any, str]]:
        """(value, where) for each value a trial may take at path; a range gives its two ends."""
        if not self.ok(path):
            return []
        section, _, leaf = path.partition(".")
        if path in self.space:
            items = self._items(path)
        elif leaf and section in self.space:
            items = [(v[leaf], f"{at}.{leaf}") for v, at in self._items(section) if isinstance(v, dict)]
        else:
            items = [(functools.reduce(operator.getitem, path.split("."), self.trial), path)]
        return [(v, at) for v, at in items if v is not INVALID]

    def options(self, path: str) -> list:
        return [v for v, _ in self.values(path)]

    def sections(self, section: str, leaves: tuple) -> list[tuple[dict, str]]:
        """Each combination of a section's leaves a trial may have, and where a problem with it is reported."""
        if not self.ok(section):
            return []
        if section in self.space:
            return [(v, at) for v, at in self._items(section) if isinstance(v, dict)]
        combos = itertools.product(*(self.options(f"{section}.{leaf}") for leaf in leaves))
        return [(dict(zip(leaves, combo)), section) for combo in combos]


INVALID = object()  # stands in for a value that failed its check, so rules skip it instead of re-reporting

_BUNDLED = {"digits"}  # ships inside scikit-learn: never reads a root


def rules(view: View) -> list[str]:
    """Problems across fields, one line each, for every combination the sweep (or the one trial) can have."""
    errors: list[str] = []

    def error(where: str, message: str) -> None:
        errors.append(f"{where}: {message}")

    for section, example in (("model", "small_cnn"), ("dataset", "digits")):
        leaves = ("name", "factory", "kwargs", "weights")[:4 if section == "model" else 3]
        for item, at in view.sections(section, leaves):
            name, factory = item["name"], item["factory"]
            if name is None and factory is None:
                error(f"{at}.name", f"missing; name the {section}, such as {section}: {{name: {example}}}, or give "
                                    f"{section}.factory")
            elif name is not None and factory is not None:
                error(view.where(f"{at}.factory"), f"given together with {section}.name; give one of "
                                                   f"{section}.name and {section}.factory")
            elif factory is None and item["kwargs"]:
                error(view.where(f"{at}.kwargs"),
                      f"only a {section}.factory takes kwargs; remove them or use {section}.factory")
            weights = item.get("weights")
            if factory is not None and weights is not None and not looks_like_path(weights):
                error(view.where(f"{at}.weights"), f"{show(weights)} is not a checkpoint file; a model.factory "
                                                   "loads only a local checkpoint (.pt/.pth/.th/.ckpt), or null")

    for dataset, at in view.sections("dataset", ("name", "root", "download", "factory")):
        name, root, download = dataset["name"], dataset["root"], dataset["download"]
        where = view.where(f"{at}.root")
        if dataset["factory"] or name is None or name in _BUNDLED or (name != "imagefolder" and download):
            continue
        reads = f"{name}{'' if name == 'imagefolder' else ' with download: false'} reads local files"
        if root is None and name == "imagefolder":
            error(where, "imagefolder needs a root folder; set dataset.root to a folder of images")
        elif root is not None and not Path(root).is_dir():
            error(where, f"{str(root)!r} does not exist ({reads}); point it at an existing folder"
                         + ("" if name == "imagefolder" else ", or set download: true"))

    if "iterative" in view.options("prune.schedule"):
        too_few = [s for s in view.options("prune.steps") if s < 2]
        if too_few:
            error(view.where("prune.steps"), f"an iterative schedule needs steps >= 2, got {too_few[0]:g}; "
                                             "set prune.steps such as 3, or use schedule: oneshot")

    # a swept setting that no trial reads would run the same trials twice, reported as different groups
    swept = sorted(path for path, domain in view.space.items() if domain.kind != "fixed")
    if "prune.steps" in swept and "iterative" not in view.options("prune.schedule"):
        error(view.where("prune.steps"), "steps counts only with schedule: iterative, so these trials would all be "
                                         "the same; sweep schedule: iterative as well, or fix steps")
    arms = view.options("prune.arm")
    for strategy, at in view.values("prune.strategy"):
        local = view.options("prune.scope") == ["local"] and view.options("prune.target") == ["channels"]
        if strategy == "none" and not (set(arms) <= {"control"} or (set(arms) <= {"control", "scratch"} and local)):
            error(at, "none prunes nothing and is what the control arm records; use arm: control for an unpruned "
                      "control, or name a strategy such as l1")
    if not {"finetune", "control"} & set(arms):
        for path in (p for p in swept if p.startswith("finetune.")):
            error(view.where(path), "the scratch arm trains with the base's settings, so finetune values change "
                                    "nothing; sweep base.* or prune.scratch_epochs, or include arm: finetune")

    if "scratch" in view.options("prune.arm") and None in view.options("prune.scratch_epochs") \
            and 0 in view.options("base.epochs"):
        error("prune.scratch_epochs", "the scratch arm trains the pruned architecture from new weights for "
                                      "scratch_epochs (null: base.epochs), and base.epochs is 0 (a pretrained base); "
                                      "set prune.scratch_epochs, such as 30")

    ratios = view.options("prune.ratios")
    if (not ratios or not all(ratios)) and arms != ["control"]:  # the control arm is recorded with ratio 0
        for ratio, at in view.values("prune.ratio"):
            if ratio == 0:
                error(at, "0 is outside (0, 1); use a fraction such as 0.5 (0 only with per-module prune.ratios)")
    if any(ratios):
        for path, bad, fix in (("prune.scope", "global", "local"), ("prune.target", "flops", "channels")):
            if bad in view.options(path):
                error(view.where("prune.ratios"), f"per-module ratios cannot be combined with {path}: {bad} (the "
                                                  f"pruner does not support it); use {path}: {fix}, or remove "
                                                  "prune.ratios")
    return errors
