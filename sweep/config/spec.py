"""Search-space YAML -> validated SweepSpec -> Ray Tune param_space (how a spec is checked: docs/design.md, "The
config layer").

    spec = load_spec("search_spaces/quickstart.yaml")    # SpecError lists every problem, one line each
    tuner_space = spec.param_space()                     # nested trial dict, swept leaves are tune domains
"""

import copy
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from sweep.config.arms import unique
from sweep.config.explain import as_real, close, dotted, error_lines, fields, numeric, show
from sweep.config.names import METRICS, PARAMS
from sweep.config.rules import INVALID, View, rules
from sweep.config.schema import SpecError, SweepConfig, TrialConfig, check_at, field_adapter, report_rules
from sweep.zoo.plugin import resolve_factory

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_DOMAIN_HELP = "write a fixed value or one of {grid: [...]}, {choice: [...]}, {uniform: [low, high]}, " \
               "{loguniform: [low, high]}, {randint: [low, high]}"
_SECTIONS = ("model", "dataset")  # may be swept as whole sections: {grid: [small_cnn, {name: resnet20, ...}]}


@dataclass(frozen=True)
class Domain:
    """How one trial path is swept. Ranges are inclusive at both ends: randint [1, 4] can give 4."""

    kind: str      # "fixed", or one of KINDS
    values: tuple  # fixed: (value,); grid/choice: the items; uniform/loguniform/randint: (low, high)

    def to_tune(self) -> Any:
        from ray import tune  # here, not at the top: validating a spec should not pay for importing Ray

        values = copy.deepcopy(list(self.values))
        if self.kind == "fixed":
            return values[0]
        if self.kind == "randint":
            return tune.randint(values[0], values[1] + 1)  # Ray's upper bound is exclusive
        make = {"grid": tune.grid_search, "choice": tune.choice}.get(self.kind)
        return make(values) if make else getattr(tune, self.kind)(*values)  # uniform, loguniform


def _filled(trial: dict, values: dict) -> dict:
    """A copy of the trial dict with the value at each path of `values` replaced."""
    config = copy.deepcopy(trial)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


@dataclass(frozen=True)
class SweepSpec:
    name: str
    trial: dict            # the fully defaulted trial dict (plain JSON data), before the space is applied
    space: dict            # trial path ("prune.ratio", or "model"/"dataset" for whole sections) -> Domain
    search: dict           # {"algorithm", "num_samples"}
    scheduler: dict        # {"name": "fifo"} or {"name": "asha", "grace_period", "reduction_factor", "max_t"}
    resources: dict        # {"cpu": float, "gpu": float, "memory": GiB or None}
    metric: str
    mode: str
    max_failures: int
    max_concurrent: int | None
    checkpoint_every_s: float  # 0: a checkpoint every epoch
    source_text: str
    max_trials: int
    report: dict  # sweep.config.schema.ReportConfig's fields, family resolved

    def param_space(self) -> dict:
        """The trial dict with every swept path replaced by its Ray Tune domain."""
        return _filled(self.trial, {path: domain.to_tune() for path, domain in self.space.items()})

    def grid_configs(self) -> list[dict]:
        """Every trial dict of a grid search: the cartesian product of the space, first key varying slowest, each
        distinct trial once (sweep.config.arms: a control trial is one per seed and recipe, whatever the strategy)."""
        if self.search["algorithm"] != "grid":
            raise SpecError(f"search.algorithm: '{self.search['algorithm']}' samples its trials, so there is no "
                            "fixed list of them; use algorithm: grid to enumerate a grid")
        combinations = itertools.product(*(domain.values for domain in self.space.values()))
        return unique([_filled(self.trial, dict(zip(self.space, copy.deepcopy(c)))) for c in combinations])

    def num_samples(self) -> int:
        """Ray Tune's num_samples: 1 for a grid (it runs every combination once), else search.num_samples."""
        return 1 if self.search["algorithm"] == "grid" else self.search["num_samples"]

    def num_trials(self) -> int:
        """How many trials the sweep runs: the grid's size (counted, not enumerated) times num_samples; a grid with a
        control or scratch arm, which may list one trial for several combinations (config.arms), is enumerated
        when it is not over max_trials."""
        size = _grid_size(self.space)
        arms = self.space["prune.arm"].values if "prune.arm" in self.space else (self.trial["prune"]["arm"],)
        if self.search["algorithm"] == "grid" and size <= self.max_trials and {"control", "scratch"} & set(arms):
            return len(self.grid_configs())
        return size * self.num_samples()


def _grid_size(space: dict) -> int:
    return math.prod(len(domain.values) for domain in space.values() if domain.kind == "grid")


# ---------------------------------------------------------------------------------------------------------------
# Reading.


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a repeated key is an error (PyYAML keeps the last one silently, which
    would quietly drop a sweep dimension) and that 1e-3 is a number, as in YAML 1.2 (PyYAML reads it as text)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen:
                raise _DuplicateKey(problem=f"duplicate key '{key_node.value}'", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a search-space YAML file; raises SpecError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found; check the path (relative paths start at {Path.cwd()})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text; save the search space as a UTF-8 YAML file") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot be read ({error.strerror}); give the path of a YAML file") from None
    return parse_spec(text, source=str(path))


def parse_spec(text: str, source: str = "<string>") -> SweepSpec:
    """Validate search-space YAML text; raises SpecError listing every problem."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # _Loader is a yaml.SafeLoader
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None) or str(error)
        where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
        fix = "; keep only one of them" if isinstance(error, _DuplicateKey) else \
            " (not valid YAML); check indentation, brackets and quotes on or just before that line"
        raise SpecError(f"{where}: {problem}{fix}") from None
    if raw is None:
        raise SpecError(f"{source}: the file is empty; start from search_spaces/quickstart.yaml")
    if not isinstance(raw, dict):
        names = {list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false"}
        raise SpecError(f"{source}: the top level is {names.get(type(raw), type(raw).__name__)}, not a mapping; "
                        "write settings as key: value lines such as name: my_sweep")
    return _Builder(text).build(raw)


def _drop(raw: dict, loc: tuple) -> None:
    """Remove the value at loc (or the innermost mapping on the way that is not one), so its default stands in."""
    node = raw
    for i, part in enumerate(loc):
        if not isinstance(node, dict) or part not in node:
            return
        if i == len(loc) - 1 or not isinstance(node[part], dict):
            del node[part]
            return
        node = node[part]


class _Builder:
    """One validation pass: collects every problem, then builds the spec or raises them all."""

    def __init__(self, text: str):
        self.text = text
        self.errors: dict[str, None] = {}  # each problem once, in the order found
        self.invalid: set[str] = set()  # paths whose value failed its check: rules across fields skip them
        self.origin: dict[str, str] = {}  # swept trial path -> where in the YAML it was swept, for messages
        self.trial: dict = {}  # the fixed settings, which a swept model/dataset item's missing keys come from

    def error(self, path: str, message: str) -> None:
        self.errors.setdefault(f"{path}: {message}")

    def add(self, lines: list[str]) -> None:
        self.errors.update(dict.fromkeys(lines))

    def build(self, raw: dict) -> SweepSpec:
        top = self.read_settings(raw)
        self.trial = top.model_dump(include=set(TrialConfig.model_fields))
        space = self.read_space(raw.get("space"))
        view = View(self.trial, space, self.origin, frozenset(self.invalid))
        self.add([*rules(view), *_plugin_problems(view)])
        search, scheduler, mode = self.check_settings(top, raw.get("scheduler"), space, view)
        if self.errors:
            raise SpecError(list(self.errors))
        return SweepSpec(
            name=top.name, trial=self.trial, space=space, search=search, scheduler=scheduler,
            resources=top.resources.model_dump(), metric=top.metric, mode=mode, max_failures=top.max_failures,
            max_concurrent=top.max_concurrent, source_text=self.text, max_trials=top.max_trials,
            checkpoint_every_s=top.checkpoint_every_s,
            report={**top.report.model_dump(), "family": top.report.resolved_family()},
        )

    def read_settings(self, raw: dict) -> SweepConfig:
        """The schema's model of the file; a value that fails is reported, and its default stands in for the rest."""
        try:
            return SweepConfig.model_validate(raw, context={"spec": True})
        except ValidationError as error:
            lines, locs = error_lines(error, model=SweepConfig)
        self.add(lines)
        cleaned = copy.deepcopy(raw)
        for loc in locs:
            self.invalid.add(dotted(loc))
            _drop(cleaned, loc)
        return SweepConfig.model_validate({"name": "invalid", **cleaned}, context={"spec": True})  # defaults are valid

    # -- space ----------------------------------------------------------------------------------------------------

    def read_space(self, raw: Any) -> dict[str, Domain]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.error("space", f"{show(raw)} is not a mapping; write space: {{setting: {{grid: [...]}}, ...}}")
            return {}
        space: dict[str, Domain] = {}
        for key, value in raw.items():
            where = f"space.{key}"
            # a model/dataset swept with whole sections as items, e.g. {grid: [{name: resnet20, weights: r20.th}]}
            path = key if key in _SECTIONS and _sweeps_sections(value) else PARAMS.get(key, str(key))
            node = check_at(path) if path != "name" else None
            if node is None:
                leaves = [leaf for leaf, _ in fields(TrialConfig) if leaf != "name"]
                self.error(where, f"no such setting; {close(key, [*PARAMS, *leaves])}"
                                  f"use a shorthand ({', '.join(PARAMS)}) or a dotted path such as finetune.lr")
                continue
            if isinstance(node, type) and path not in _SECTIONS:
                self.error(where, f"{path} is a group of settings; sweep one of them, such as "
                                  f"{path}.{next(iter(node.model_fields))}")
                continue
            clash = next((p for p in space if p == path or p.startswith(path + ".") or path.startswith(p + ".")), None)
            if clash is not None:
                self.error(where, f"sweeps {path} again (also {self.origin[clash]}); keep one of them")
                continue
            space[path] = self.domain(where, value, path, node)
            self.origin[path] = where
        return space

    def check(self, where: str, path: str, value: Any) -> Any:
        """A value for a trial path, or INVALID once its problems are reported. A swept model/dataset item is a name,
        or a mapping of that section whose missing keys come from the fixed section (except that an item naming a
        `name` or a `factory` replaces both)."""
        try:
            if path not in _SECTIONS:
                return field_adapter(path).validate_python(value)
            if not isinstance(value, dict):
                name = self.check(where, f"{path}.name", value)
                return INVALID if name is INVALID else {**self.trial[path], "name": name, "factory": None}
            fixed = dict(self.trial[path])
            if "name" in value or "factory" in value:
                fixed.update(name=None, factory=None)
            return check_at(path).model_validate({**fixed, **value}).model_dump()
        except ValidationError as error:
            model, leaf = (check_at(path), None) if path in _SECTIONS else (TrialConfig, path)
            self.add(error_lines(error, where, model=model, leaf=leaf)[0])
            return INVALID

    def fail(self, where: str, message: str) -> Domain:
        self.error(where, message)
        return Domain("fixed", (INVALID,))

    def domain(self, where: str, value: Any, path: str, node: FieldInfo | type) -> Domain:
        # A mapping sweeps a setting, except for a whole model/dataset section, whose fixed value is a mapping
        # of its own keys (a lone unknown key there is more likely a misspelt domain such as {grd: [...]}).
        keys = node.model_fields if isinstance(node, type) else None
        if not isinstance(value, dict) or keys and (len(value) != 1 or next(iter(value)) in keys):
            return Domain("fixed", (self.check(where, path, value),))
        if len(value) != 1:
            return self.fail(where, f"{show(value)} is not a sweep domain; {_DOMAIN_HELP}")
        (kind, arg), = value.items()
        at = f"{where}.{kind}"
        if kind not in KINDS:
            return self.fail(at, f"unknown domain; {close(kind, KINDS)}{_DOMAIN_HELP}")
        if kind in ("grid", "choice"):
            if not isinstance(arg, list) or not arg:
                return self.fail(at, f"{show(arg)} is not a non-empty list; write {kind}: [a, b, ...]")
            items = [self.check(f"{at}[{i}]", path, item) for i, item in enumerate(arg)]
            seen = set()
            for i, item in enumerate(items):
                key = None if item is INVALID else json.dumps(item, sort_keys=True, default=str)
                if key is not None and key in seen:  # two bad values are two errors, not a repeat
                    self.error(f"{at}[{i}]", f"{show(arg[i])} is listed twice; remove the repeat")
                seen.add(key)
            return Domain(kind, tuple(items))
        kind_of_number = None if isinstance(node, type) else numeric(node)
        if kind_of_number is None:
            return self.fail(at, "a range needs a numeric setting; use {grid: [...]} or {choice: [...]}")
        if kind_of_number == "int" and kind != "randint":
            return self.fail(at, "this setting takes whole numbers; use {randint: [low, high]} or {grid: [...]}")
        try:
            low, high = (as_real(v) for v in arg) if isinstance(arg, list) and len(arg) == 2 else ()
        except ValueError:
            return self.fail(at, f"{show(arg)} is not [low, high]; write {kind}: [low, high] with two numbers")
        if kind == "randint":
            if not (low.is_integer() and high.is_integer()):
                return self.fail(at, f"{show(arg)} are not whole numbers; write randint: [low, high] with integers")
            low, high = int(low), int(high)
        if low >= high:
            return self.fail(at, f"low {low:g} is not below high {high:g}; write [low, high] with low < high")
        if kind == "loguniform" and low <= 0:
            return self.fail(f"{at}[0]", f"{low:g} is not > 0 (a log scale starts above zero); use a low such as 1e-4")
        return Domain(kind, (self.check(f"{at}[0]", path, low), self.check(f"{at}[1]", path, high)))

    # -- how the sweep runs ---------------------------------------------------------------------------------------

    def check_settings(self, top: SweepConfig, raw_scheduler: Any, space: dict, view: View) -> tuple:
        """The sweep settings' rules; returns (search, scheduler, mode) as the spec holds them."""
        if "cuda" in view.options("device") and view.ok("resources.gpu") and top.resources.gpu == 0:
            self.error(view.where("device"), "'cuda' needs a GPU for each trial but resources.gpu is 0; "
                                             "set resources.gpu (such as 1 or 0.25), or device: auto")

        search = top.search.model_dump()
        algorithm, num_samples = search["algorithm"], search["num_samples"]
        if algorithm == "grid" and view.ok("search.algorithm"):
            if num_samples not in (None, 1) and view.ok("search.num_samples"):
                self.error("search.num_samples", "a grid runs every combination once; remove num_samples, "
                                                 "or sweep seed (such as seed: {grid: [0, 1, 2]}) for repeats")
            search["num_samples"] = 1
            for path, domain in space.items():
                if domain.kind not in ("fixed", "grid"):
                    self.error(f"{self.origin[path]}.{domain.kind}", "grid search takes only {grid: [...]} or fixed "
                               "values; use {grid: [...]}, or search: {algorithm: random, num_samples: 20}")
        elif view.ok("search.algorithm"):
            if num_samples is None and view.ok("search.num_samples"):
                self.error("search.num_samples", f"{algorithm} search needs num_samples; add num_samples such as 20")
            if all(domain.kind in ("fixed", "grid") and INVALID not in domain.values for domain in space.values()):
                self.error("search.algorithm", f"{algorithm} search samples nothing here (every key of space is fixed "
                           "or a grid): its samples would all be the same trials; use algorithm: grid, or sample a "
                           "key, such as ratio: {uniform: [0.2, 0.8]}")
            if algorithm == "optuna":
                for path, domain in space.items():
                    if domain.kind == "grid":
                        self.error(f"{self.origin[path]}.grid", "optuna cannot search a grid; use {choice: [...]}")
                    for i, item in enumerate(domain.values if domain.kind == "choice" else ()):
                        if item is not None and not isinstance(item, (str, int, float, bool)):
                            self.error(f"{self.origin[path]}.choice[{i}]", "optuna chooses only among names, numbers, "
                                       "true/false and null; sweep whole sections with grid or random search")

        count = _grid_size(space) * (search["num_samples"] or 1)
        if count > top.max_trials and view.ok("max_trials", "search"):
            where, fix = ("space", "shrink the grid") if algorithm == "grid" else ("search.num_samples", "sample fewer")
            self.error(where, f"{count:,} trials exceed max_trials ({top.max_trials:,}); {fix} or raise max_trials")

        scheduler = top.scheduler.model_dump()
        if scheduler["name"] == "asha" or not view.ok("scheduler.name"):
            self.check_asha(scheduler, view)
        else:
            for key in raw_scheduler if isinstance(raw_scheduler, dict) else ():
                if key in ("grace_period", "reduction_factor", "max_t"):
                    self.error(f"scheduler.{key}", f"only asha uses {key}; remove it or set scheduler.name: asha")
            scheduler = {"name": scheduler["name"]}

        if view.ok("report.references", "report.family"):
            self.add(report_rules(top.report))
            strategies = set(view.options("prune.strategy"))
            for reference in top.report.references:
                if strategies and reference not in strategies and view.ok("prune.strategy"):
                    self.error("report.references", f"{reference!r} is not among the sweep's strategies "
                               f"({', '.join(sorted(map(str, strategies)))}), so nothing would be compared with it; "
                               "add it to the space's strategy, or remove it from the references")

        direction = METRICS[top.metric].direction
        if top.mode is not None and top.mode != direction and view.ok("metric", "mode"):
            better = "higher" if direction == "max" else "lower"
            self.error("mode", f"{top.mode} optimises {top.metric} the wrong way ({better} is better); "
                               f"use mode: {direction}, or leave mode out")
        return search, scheduler, top.mode or direction

    def check_asha(self, scheduler: dict, view: View) -> None:
        """ASHA's rules; sets scheduler["max_t"], its top rung, below the last epoch a trial trains: a trial stopped
        at its last epoch has trained in full, and stopping it would only lose its test and its saved network."""
        arms = set(view.options("prune.arm"))
        if {"finetune", "scratch"} <= arms and view.ok("scheduler.name"):
            self.error("scheduler.name", "asha compares trials at equal epochs, where a scratch trial (new weights) "
                       "trails a fine-tuned one by design: it would stop the scratch arm for that alone; compare the "
                       "arms with scheduler: fifo")
        budgets = view.options("finetune.epochs") if "finetune" in arms else []
        if "scratch" in arms:
            budgets += [s or b for s in view.options("prune.scratch_epochs") for b in view.options("base.epochs")]
        if not budgets or not view.ok("scheduler.max_t", "scheduler.grace_period"):
            return
        grace, last = scheduler["grace_period"], max(budgets) - 1
        if len(set(budgets)) > 1 and view.ok("scheduler.name"):
            self.error("scheduler.name", f"asha decides how many epochs each trial gets, and these trials train "
                       f"{min(budgets)} to {last + 1}: it would stop the shorter ones at their last epoch; give every "
                       "trial the same epochs, or sweep epochs with scheduler: fifo")
        elif scheduler["max_t"] is not None and grace > scheduler["max_t"]:
            self.error("scheduler.grace_period", f"{grace} is more than max_t ({scheduler['max_t']}); use a "
                                                 "grace_period <= max_t")
        elif grace > last:
            fix = f"use grace_period <= {last}" if last >= 1 else "use scheduler: fifo"
            self.error("scheduler.grace_period", f"{grace} leaves asha no rung before a trial's last epoch (trials "
                       f"train {last + 1} epoch{'s' * (last != 0)}, and one stopped at its last has trained in "
                       f"full); {fix}")
        scheduler["max_t"] = max(1, min(scheduler["max_t"] or last, last))


def _plugin_problems(view: View) -> Iterator[str]:
    """Each model and dataset factory the trials would import, imported now: a misspelt module or function is
    reported with the file's other problems (with the nearest name), not once they are fixed, nor in every trial."""
    for section in ("model", "dataset"):
        for item, at in view.sections(section, ("factory",)):
            try:
                if item["factory"] is not None:
                    resolve_factory(item["factory"], view.where(f"{at}.factory"),
                                    lambda where, text: SpecError(f"{where}: {text}"))
            except SpecError as error:
                yield str(error)


def _sweeps_sections(value: Any) -> bool:
    """Whether a space value for model/dataset holds whole sections (mappings) rather than names."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in KINDS:
        items = next(iter(value.values()))
        return isinstance(items, list) and any(isinstance(item, dict) for item in items)
    return isinstance(value, dict)
