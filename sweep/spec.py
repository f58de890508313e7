"""Search-space YAML -> validated SweepSpec -> Ray Tune param_space.

    spec = load_spec("search_spaces/quickstart.yaml")    # SpecError lists every problem, one line each
    tuner_space = spec.param_space()                     # nested trial dict, swept leaves are tune domains

Every problem is one line "<field path>: <what is wrong>; <how to fix>", and a file's problems are all reported
together so `sweep validate` can print them before any trial starts. The checks are written out by hand rather
than with pydantic because the messages must name places inside sweep domains (space.ratio.grid[1]) and say how
to fix them; pydantic's errors would have to be translated into that anyway.
The trial dict's shape and valid values are the contract in trial_config.md.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from .errors import InputError


class SpecError(InputError):
    """Every problem found in a spec; str() is one line per problem: '<field path>: <what is wrong>; <how to fix>'."""

    def __init__(self, errors: list[str] | str):
        lines = [errors] if isinstance(errors, str) else list(errors)
        self.errors = [" ".join(line.splitlines()) for line in lines]
        super().__init__("\n".join(self.errors))


class _Bad(Exception):
    """One value's problem, '<what is wrong>; <how to fix>'; the caller prefixes the field path."""


_INVALID = object()  # stands in for a value that failed its check, so later rules skip it instead of re-reporting


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, on one short line."""
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _listing(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names) if len(names) <= 25 else ", ".join(names[:25]) + f", ... ({len(names)} in all)"


def _close(word: Any, candidates) -> str:
    # cutoff 0.5 rather than difflib's 0.6, so short names such as 'l3' still get a suggestion ('l2')
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'? " if match else ""


def _unknown_key(key: Any, known) -> str:
    return f"unknown key; {_close(key, known)}known keys: {_listing(known)}"


# ---------------------------------------------------------------------------------------------------------------
# Fields: a default and a check that returns the normalised value or raises _Bad.


@dataclass(frozen=True)
class _Field:
    default: Any
    check: Callable[[Any], Any]
    numeric: str | None = None  # "int" or "float": which ranges (randint, uniform, loguniform) may sweep it


def _nullable(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def nullable(value):
        if value is None:
            return None
        if value in ("None", "none", "Null", "NULL"):
            raise _Bad(f"{_show(value)} is text in YAML; write null (or leave the key out)")
        return check(value)
    return nullable


def _integer(default, lo: int, hi: int | None = None, example=None, optional: bool = False) -> _Field:
    example = default if example is None else example

    def check(value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"{_show(value)} is not a whole number; write an integer such as {example}")
        if value < lo or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise _Bad(f"{value} is not {bounds}; use a whole number {bounds} such as {example}")
        return value
    return _Field(default, _nullable(check) if optional else check, "int")


def _as_real(value) -> float:
    # PyYAML reads 1e-3 (no dot) as text, so numeric text is taken as the number it spells.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _Bad(f"{_show(value)} is not a number; write a number such as 0.5") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{_show(value)} is not a finite number; write a number such as 0.5")
    return float(value)


def _real(default, lo=None, hi=None, lo_open=False, hi_open=False, fix: str | None = None) -> _Field:
    if hi is None:
        bounds = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    fix = fix or f"use a number {'in ' if hi is not None else ''}{bounds} such as {default:g}"

    def check(value):
        number = _as_real(value)
        below = number <= lo if lo_open else number < lo
        above = hi is not None and (number >= hi if hi_open else number > hi)
        if below or above:
            raise _Bad(f"{_show(value)} is {'outside' if hi is not None else 'not'} {bounds}; {fix}")
        return number
    return _Field(default, check, "float")


def _one_of(default, choices, what: str) -> _Field:
    def check(value):
        if value not in choices:
            raise _Bad(_unknown_name(value, choices, what))
        return value
    return _Field(default, check)


def _unknown_name(value, names, what: str) -> str:
    if not isinstance(value, str):
        return f"{_show(value)} is not a {what} name; choose one of {_listing(names)}"
    return f"unknown {what} {_show(value)}; {_close(value, names)}choose one of {_listing(names)}"


def _registered(names: Callable[[], list[str]], what: str, default: str | None = None) -> _Field:
    def check(value):
        known = names()
        if value not in known:
            raise _Bad(_unknown_name(value, known, what))
        return value
    return _Field(default, check)


# Registries are imported when a name is checked, not at import time: validating needs only the names,
# and the registries live in lower modules that may import torch.
def _strategy_names() -> list[str]:
    from sweep.pruning import STRATEGIES
    return list(STRATEGIES)


def _model_names() -> list[str]:
    from sweep.models import model_names
    return list(model_names())


def _dataset_names() -> list[str]:
    from sweep.data import dataset_names
    return list(dataset_names())


def _flag(default: bool) -> _Field:
    def check(value):
        if not isinstance(value, bool):
            raise _Bad(f"{_show(value)} is not true or false; write true or false")
        return value
    return _Field(default, check)


def _looks_like_path(text: str) -> bool:
    # Same reading as sweep.models: anything else is a torchvision weights name such as DEFAULT.
    suffixes = (".pt", ".pth", ".th", ".ckpt")
    return "/" in text or "\\" in text or text.endswith(suffixes) or Path(text).expanduser().exists()


def _weights(value):
    if not isinstance(value, str):
        raise _Bad(f"{_show(value)} is not text; "
                   "give a torchvision weights name such as DEFAULT, a checkpoint path, or null")
    if not _looks_like_path(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise _Bad(f"file {_show(value)} does not exist; give an existing checkpoint file, "
                   "a torchvision weights name such as DEFAULT, or null")
    # Absolute, because Ray runs each trial in its own working directory.
    return str(path.resolve())


def _root(value):
    if not isinstance(value, str):
        raise _Bad(f"{_show(value)} is not a folder path; write a path such as data/cifar10, or null")
    return str(Path(value).expanduser().resolve())  # existence depends on the dataset; checked in _check_rules


def _min_channels(value):
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    channels = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if not (channels or (isinstance(value, float) and 0 < value < 1)):
        raise _Bad(f"{_show(value)} is neither a whole number >= 1 nor a fraction in (0, 1); "
                   "use e.g. 1 (channels per layer) or 0.1 (of each layer)")
    return value


def _module_names(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad(f"{_show(value)} is not a list of module names; write e.g. [fc, features.0]")
    return list(value)


def _gpus(value):
    number = _real(0.0, lo=0).check(value)
    if number > 1 and not number.is_integer():
        raise _Bad(f"{_show(value)} GPUs cannot be scheduled (only fractions of one GPU are shared); "
                   "use a fraction up to 1 such as 0.25, or a whole number")
    return number


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _sweep_name(value):
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise _Bad(f"{_show(value)} is not a safe name (it becomes an MLflow experiment and a folder); "
                   "use letters, digits, - _ . such as my_sweep")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Schemas: a dict of fields, or of nested schemas. Defaults are the contract in trial_config.md.


def _training(epochs: int, lr: float) -> dict:
    return {
        "epochs": _integer(epochs, lo=0),
        "lr": _real(lr, lo=0, lo_open=True),
        "batch_size": _integer(64, lo=1),
        "optimizer": _one_of("sgd", ("sgd", "adamw"), "optimizer"),
        "momentum": _real(0.9, 0, 1, hi_open=True),
        "weight_decay": _real(5e-4, lo=0),
        "warmup_epochs": _real(0.0, lo=0),
        "label_smoothing": _real(0.0, 0, 1, hi_open=True),
        "amp": _flag(True),
        "channels_last": _flag(True),
    }


TRIAL: dict = {
    "seed": _integer(0, lo=0, hi=2**32 - 1),
    "device": _one_of("auto", ("auto", "cpu", "cuda"), "device"),
    "model": {"name": _registered(_model_names, "model"), "weights": _Field(None, _nullable(_weights))},
    "dataset": {
        "name": _registered(_dataset_names, "dataset"),
        "root": _Field(None, _nullable(_root)),
        "download": _flag(False),
        "val_fraction": _real(0.1, 0, 1, lo_open=True, hi_open=True),  # the trial reports val accuracy each epoch
        "image_size": _integer(None, lo=1, example=32, optional=True),
        "limit": _integer(None, lo=1, example=1000, optional=True),
        "test_limit": _integer(None, lo=1, example=1000, optional=True),
    },
    "base": _training(epochs=5, lr=0.05),
    "prune": {
        "strategy": _registered(_strategy_names, "strategy", default="l1"),
        "ratio": _real(0.5, 0, 1, lo_open=True, hi_open=True, fix="use a fraction such as 0.5"),
        "scope": _one_of("local", ("local", "global"), "scope"),
        "target": _one_of("channels", ("channels", "flops"), "target"),
        "schedule": _one_of("oneshot", ("oneshot", "iterative"), "schedule"),
        "steps": _integer(1, lo=1, example=3),
        "min_channels": _Field(1, _min_channels),
        "round_to": _integer(1, lo=1, example=8),
        "ignore": _Field([], _module_names),
        "calibration_batches": _integer(4, lo=1),
        "arm": _one_of("finetune", ("finetune", "scratch"), "arm"),
        "scratch_epochs": _integer(None, lo=1, example=10, optional=True),
    },
    "finetune": _training(epochs=3, lr=0.01),
    "measure": {"batch_size": _integer(1, lo=1), "warmup": _integer(5, lo=0), "runs": _integer(30, lo=1),
                "threads": _integer(1, lo=1)},
}

from .names import PARAMS, selectable_metrics  # noqa: E402 - temporary until the schema rewrite lands

METRICS = tuple(selectable_metrics())

SETTINGS: dict = {
    "search": {
        "algorithm": _one_of("grid", ("grid", "random", "optuna"), "search algorithm"),
        "num_samples": _integer(None, lo=1, example=20, optional=True),
    },
    "scheduler": {
        "name": _one_of("fifo", ("fifo", "asha"), "scheduler"),
        "grace_period": _integer(1, lo=1),
        "reduction_factor": _real(2.0, lo=2, fix="use 2 or more, such as 3"),
        "max_t": _integer(None, lo=1, example=10, optional=True),
    },
    "resources": {"cpu": _real(1.0, lo=0, lo_open=True), "gpu": _Field(0.0, _gpus),
                  "memory": _Field(None, _nullable(_real(1.0, lo=0, lo_open=True).check))},
    "metric": _one_of("val_accuracy", METRICS, "metric"),
    "mode": _one_of("max", ("max", "min"), "mode"),
    "max_failures": _integer(2, lo=0),
    "max_concurrent": _integer(None, lo=1, example=2, optional=True),
}

TOP: dict = {"name": _Field(None, _sweep_name), **TRIAL, **SETTINGS}

# Space keys that stand for a trial path; any other key is a dotted path into the trial dict.
SHORTHAND = PARAMS
_BUNDLED = {"digits"}  # ships inside scikit-learn: never reads a root
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_DOMAIN_HELP = "write a fixed value or one of {grid: [...]}, {choice: [...]}, {uniform: [low, high]}, " \
               "{loguniform: [low, high]}, {randint: [low, high]}"


def _leaf_paths(schema: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, node in schema.items():
        paths += _leaf_paths(node, f"{prefix}{key}.") if isinstance(node, dict) else [f"{prefix}{key}"]
    return paths


def _node(path: str):
    """The field or schema at a dotted trial path, or None."""
    node: Any = TRIAL
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


def _get(config: dict, path: str) -> Any:
    for part in path.split("."):
        config = config[part]
    return config


# ---------------------------------------------------------------------------------------------------------------
# The result.


@dataclass(frozen=True)
class Domain:
    """How one trial path is swept. Ranges are inclusive at both ends: randint [1, 4] can give 4."""

    kind: str      # "fixed", or one of KINDS
    values: tuple  # fixed: (value,); grid/choice: the items; uniform/loguniform/randint: (low, high)

    def to_tune(self) -> Any:
        from ray import tune  # here, not at the top: validating a spec should not pay for importing Ray

        if self.kind == "fixed":
            return copy.deepcopy(self.values[0])
        if self.kind in ("grid", "choice"):
            items = copy.deepcopy(list(self.values))
            return tune.grid_search(items) if self.kind == "grid" else tune.choice(items)
        low, high = self.values
        if self.kind == "randint":
            return tune.randint(low, high + 1)  # Ray's upper bound is exclusive
        return tune.uniform(low, high) if self.kind == "uniform" else tune.loguniform(low, high)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    trial: dict            # the fully defaulted trial dict, before the space is applied
    space: dict            # trial path ("prune.ratio", or "model"/"dataset" for whole sections) -> Domain
    search: dict           # {"algorithm", "num_samples"}
    scheduler: dict        # {"name": "fifo"} or {"name": "asha", "grace_period", "reduction_factor", "max_t"}
    resources: dict        # {"cpu": float, "gpu": float}
    metric: str
    mode: str
    max_failures: int
    max_concurrent: int | None
    source_text: str

    def param_space(self) -> dict:
        """The trial dict with every swept path replaced by its Ray Tune domain."""
        config = copy.deepcopy(self.trial)
        for path, domain in self.space.items():
            _set(config, path, domain.to_tune())
        return config

    def grid_configs(self) -> list[dict]:
        """Every trial dict of a grid search: the cartesian product of the space, first key varying slowest."""
        if self.search["algorithm"] != "grid":
            raise SpecError(f"search.algorithm: '{self.search['algorithm']}' samples its trials, so there is no "
                            "fixed list of them; use algorithm: grid to enumerate a grid")
        paths = list(self.space)
        configs = []
        for combination in itertools.product(*(self.space[p].values for p in paths)):
            config = copy.deepcopy(self.trial)
            for path, value in zip(paths, combination):
                _set(config, path, copy.deepcopy(value))
            configs.append(config)
        return configs

    def num_samples(self) -> int:
        """Ray Tune's num_samples: 1 for a grid (it runs every combination once), else search.num_samples."""
        return 1 if self.search["algorithm"] == "grid" else self.search["num_samples"]


# ---------------------------------------------------------------------------------------------------------------
# Reading.


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a repeated key is an error: PyYAML keeps the last one silently,
    which would quietly drop a sweep dimension."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen:
                raise _DuplicateKey(problem=f"duplicate key '{key_node.value}'", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_error(error: yaml.YAMLError, source: str) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
    problem = getattr(error, "problem", None) or str(error)
    if isinstance(error, _DuplicateKey):
        return f"{where}: {problem}; keep only one of them"
    return f"{where}: {problem} (not valid YAML); check indentation, brackets and quotes on or just before that line"


def _type_name(value: Any) -> str:
    names = {list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false"}
    return names.get(type(value), type(value).__name__)


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
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a yaml.SafeLoader
    except yaml.YAMLError as error:
        raise SpecError(_yaml_error(error, source)) from None
    if raw is None:
        raise SpecError(f"{source}: the file is empty; start from search_spaces/quickstart.yaml")
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level is {_type_name(raw)}, not a mapping; "
                        "write settings as key: value lines such as name: my_sweep")
    return _Builder(text).build(raw)


class _Builder:
    """One validation pass: collects every problem, then builds the spec or raises them all."""

    def __init__(self, text: str):
        self.text = text
        self.errors: list[str] = []
        self.origin: dict[str, str] = {}  # swept trial path -> where in the YAML it was swept, for messages

    def error(self, path: str, message: str) -> None:
        line = f"{path}: {message}"
        if line not in self.errors:
            self.errors.append(line)

    def check(self, path: str, field: _Field, value: Any) -> Any:
        try:
            return field.check(value)
        except _Bad as problem:
            self.error(path, str(problem))
            return _INVALID

    def read(self, path: str, schema: dict, raw: Any, defaults: dict | None = None, also_known=()) -> dict:
        """schema's defaults (or `defaults`) overlaid with raw's checked values; unknown keys are reported."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.error(path, f"{_show(raw)} is not a mapping; write {path}: {{{next(iter(schema))}: ..., ...}}")
            raw = {}
        out = {}
        for key, node in schema.items():
            where = f"{path}.{key}" if path else key
            if isinstance(node, dict):
                out[key] = self.read(where, node, raw.get(key), None if defaults is None else defaults[key])
            elif key in raw:
                out[key] = self.check(where, node, raw[key])
            else:
                out[key] = copy.deepcopy(node.default if defaults is None else defaults[key])
        for key in raw:
            if key not in schema and key not in also_known:
                self.error(f"{path}.{key}" if path else str(key), _unknown_key(key, [*schema, *also_known]))
        return out

    def build(self, raw: dict) -> SweepSpec:
        top = self.read("", TOP, raw, also_known=("space",))
        if "name" not in raw:
            self.error("name", "missing; add a sweep name such as name: my_sweep")
        trial = {"name": top["name"], **{key: top[key] for key in TRIAL}}
        space = self.read_space(raw.get("space"), trial)
        scheduler = self.read_scheduler(top["scheduler"], raw.get("scheduler"))
        self.check_rules(trial, space, top)
        if self.errors:
            raise SpecError(self.errors)
        return SweepSpec(
            name=top["name"], trial=trial, space=space, search=top["search"], scheduler=scheduler,
            resources=top["resources"], metric=top["metric"], mode=top["mode"], max_failures=top["max_failures"],
            max_concurrent=top["max_concurrent"], source_text=self.text,
        )

    # -- space ----------------------------------------------------------------------------------------------------

    def read_space(self, raw: Any, trial: dict) -> dict[str, Domain]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.error("space", f"{_show(raw)} is not a mapping; write space: {{setting: {{grid: [...]}}, ...}}")
            return {}
        space: dict[str, Domain] = {}
        for key, value in raw.items():
            where = f"space.{key}"
            path = SHORTHAND.get(key, str(key))
            if key in ("model", "dataset") and _sweeps_sections(value):
                path = key  # items are whole sections, e.g. {name: resnet20, weights: r20.th}
            node = _node(path)
            if node is None:
                self.error(where, f"no such setting; {_close(key, [*SHORTHAND, *_leaf_paths(TRIAL)])}"
                                  f"use a shorthand ({', '.join(SHORTHAND)}) or a dotted path such as finetune.lr")
                continue
            if isinstance(node, dict) and path not in ("model", "dataset"):
                example = f"{path}.{next(iter(node))}"
                self.error(where, f"{path} is a group of settings; sweep one of them, such as {example}")
                continue
            clash = next((p for p in space if p == path or p.startswith(path + ".") or path.startswith(p + ".")), None)
            if clash is not None:
                self.error(where, f"sweeps {path} again (also {self.origin[clash]}); keep one of them")
                continue
            if isinstance(node, dict):
                check = lambda v, w, section=path: self.section_item(w, section, v, trial)  # noqa: E731
            else:
                check = lambda v, w, field=node: self.check(w, field, v)  # noqa: E731
            space[path] = self.domain(where, value, check, node)
            self.origin[path] = where
        return space

    def section_item(self, where: str, section: str, value: Any, trial: dict) -> Any:
        """A swept model/dataset: a name, or a mapping of that section; missing keys come from the fixed section."""
        if isinstance(value, dict):
            return self.read(where, TRIAL[section], value, defaults=trial[section])
        return {**trial[section], "name": self.check(where, TRIAL[section]["name"], value)}

    def domain(self, where: str, value: Any, check, node: _Field | dict) -> Domain:
        # A mapping sweeps a setting, except for a whole model/dataset section, whose fixed value is a mapping
        # of its own keys (a lone unknown key there is more likely a misspelt domain such as {grd: [...]}).
        if isinstance(node, dict):
            sweeps = isinstance(value, dict) and len(value) == 1 and next(iter(value)) not in node
        else:
            sweeps = isinstance(value, dict)
        if not sweeps:
            return Domain("fixed", (check(value, where),))
        numeric = None if isinstance(node, dict) else node.numeric
        if len(value) != 1:
            self.error(where, f"{_show(value)} is not a sweep domain; {_DOMAIN_HELP}")
            return Domain("fixed", (_INVALID,))
        (kind, arg), = value.items()
        at = f"{where}.{kind}"
        if kind not in KINDS:
            self.error(at, f"unknown domain; {_close(kind, KINDS)}{_DOMAIN_HELP}")
            return Domain("fixed", (_INVALID,))
        if kind in ("grid", "choice"):
            if not isinstance(arg, list) or not arg:
                self.error(at, f"{_show(arg)} is not a non-empty list; write {kind}: [a, b, ...]")
                return Domain("fixed", (_INVALID,))
            items = [check(item, f"{at}[{i}]") for i, item in enumerate(arg)]
            for i, item in enumerate(items):
                if item is not _INVALID and item in items[:i]:
                    self.error(f"{at}[{i}]", f"{_show(arg[i])} is listed twice; remove the repeat")
            return Domain(kind, tuple(items))
        if numeric is None:
            self.error(at, "a range needs a numeric setting; use {grid: [...]} or {choice: [...]}")
            return Domain("fixed", (_INVALID,))
        if numeric == "int" and kind != "randint":
            self.error(at, "this setting takes whole numbers; use {randint: [low, high]} or {grid: [...]}")
            return Domain("fixed", (_INVALID,))
        try:
            if not isinstance(arg, list) or len(arg) != 2:
                raise _Bad("")
            low, high = (_as_real(v) for v in arg)
        except _Bad:
            self.error(at, f"{_show(arg)} is not [low, high]; write {kind}: [low, high] with two numbers")
            return Domain("fixed", (_INVALID,))
        if kind == "randint":
            if not (low.is_integer() and high.is_integer()):
                self.error(at, f"{_show(arg)} are not whole numbers; write randint: [low, high] with integers")
                return Domain("fixed", (_INVALID,))
            low, high = int(low), int(high)
        if low >= high:
            self.error(at, f"low {low:g} is not below high {high:g}; write [low, high] with low < high")
        elif kind == "loguniform" and low <= 0:
            self.error(f"{at}[0]", f"{low:g} is not > 0 (a log scale starts above zero); use a low such as 1e-4")
        else:
            return Domain(kind, (check(low, f"{at}[0]"), check(high, f"{at}[1]")))
        return Domain("fixed", (_INVALID,))

    # -- sweep settings and rules across fields ---------------------------------------------------------------------

    def read_scheduler(self, scheduler: dict, raw: Any) -> dict:
        if scheduler["name"] == "asha" or scheduler["name"] is _INVALID:
            return scheduler
        for key in raw if isinstance(raw, dict) else ():
            if key in ("grace_period", "reduction_factor", "max_t"):
                self.error(f"scheduler.{key}", f"only asha uses {key}; remove it or set scheduler.name: asha")
        return {"name": scheduler["name"]}

    def options(self, trial: dict, space: dict, path: str) -> list:
        """Every valid value a trial may take at path (a range gives its two ends), for rules across fields."""
        section, _, leaf = path.partition(".")
        if path in space:
            values = space[path].values
        elif leaf and section in space:
            values = [item[leaf] for item in space[section].values if item is not _INVALID]
        else:
            values = [_get(trial, path)]
        return [v for v in values if v is not _INVALID]

    def check_rules(self, trial: dict, space: dict, top: dict) -> None:
        def options(path):
            return self.options(trial, space, path)

        for section, example in (("model", "small_cnn"), ("dataset", "digits")):
            if None in options(f"{section}.name"):
                self.error(f"{section}.name", f"missing; name the {section}, such as {section}: {{name: {example}}}")

        self.check_dataset_files(trial, space)

        if "iterative" in options("prune.schedule"):
            too_few = [s for s in options("prune.steps") if s < 2]
            if too_few:
                self.error(self.origin.get("prune.steps", "prune.steps"),
                           f"an iterative schedule needs steps >= 2, got {too_few[0]:g}; "
                           "set prune.steps such as 3, or use schedule: oneshot")

        gpu = top["resources"]["gpu"]
        if "cuda" in options("device") and gpu == 0:
            self.error(self.origin.get("device", "device"), "'cuda' needs a GPU for each trial but resources.gpu is 0; "
                                                            "set resources.gpu (such as 1 or 0.25), or device: auto")

        search = top["search"]
        algorithm, num_samples = search["algorithm"], search["num_samples"]
        if algorithm == "grid":
            if num_samples not in (None, 1, _INVALID):
                self.error("search.num_samples", "a grid runs every combination once; remove num_samples, "
                                                 "or sweep seed (such as seed: {grid: [0, 1, 2]}) for repeats")
            search["num_samples"] = 1
            for path, domain in space.items():
                if domain.kind not in ("fixed", "grid"):
                    self.error(f"{self.origin[path]}.{domain.kind}", "grid search takes only {grid: [...]} or fixed "
                               "values; use {grid: [...]}, or search: {algorithm: random, num_samples: 20}")
        elif algorithm in ("random", "optuna"):
            if num_samples is None:
                self.error("search.num_samples", f"{algorithm} search needs num_samples; add num_samples such as 20")
            if algorithm == "optuna":
                for path, domain in space.items():
                    if domain.kind == "grid":
                        self.error(f"{self.origin[path]}.grid", "optuna cannot search a grid; use {choice: [...]}")
                    for i, item in enumerate(domain.values if domain.kind == "choice" else ()):
                        if item is not None and not isinstance(item, (str, int, float, bool)):
                            self.error(f"{self.origin[path]}.choice[{i}]", "optuna chooses only among names, numbers, "
                                       "true/false and null; sweep whole sections with grid or random search")

        scheduler = top["scheduler"]
        if scheduler["name"] == "asha" and scheduler["max_t"] not in (None, _INVALID) \
                and scheduler["grace_period"] is not _INVALID and scheduler["grace_period"] > scheduler["max_t"]:
            self.error("scheduler.grace_period", f"{scheduler['grace_period']} is more than max_t "
                                                 f"({scheduler['max_t']}); use a grace_period <= max_t")

    def check_dataset_files(self, trial: dict, space: dict) -> None:
        """imagefolder always reads local files, other datasets when download is false: an explicit root must exist."""
        if "dataset" in space:
            domain = space["dataset"]
            at = self.origin["dataset"] + ("" if domain.kind == "fixed" else f".{domain.kind}")
            cases = [(item, f"{at}[{i}].root" if domain.kind != "fixed" else f"{at}.root")
                     for i, item in enumerate(domain.values) if item is not _INVALID]
        else:
            where = self.origin.get("dataset.root", "dataset.root")
            cases = [({"name": n, "root": r, "download": d}, where) for n, r, d in itertools.product(
                *(self.options(trial, space, f"dataset.{leaf}") for leaf in ("name", "root", "download")))]
        for dataset, where in cases:
            name, root, download = dataset["name"], dataset["root"], dataset["download"]
            if _INVALID in (name, root, download) or name in _BUNDLED or (name != "imagefolder" and download):
                continue
            reads = f"{name}{'' if name == 'imagefolder' else ' with download: false'} reads local files"
            if root is None and name == "imagefolder":
                self.error(where, "imagefolder needs a root folder; set dataset.root to a folder of images")
            elif root is not None and not Path(root).is_dir():
                self.error(where, f"{_show(root)} does not exist ({reads}); point it at an existing folder"
                                  + ("" if name == "imagefolder" else ", or set download: true"))


def _is_domain(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in KINDS


def _sweeps_sections(value: Any) -> bool:
    """Whether a space value for model/dataset holds whole sections (mappings) rather than names."""
    if _is_domain(value):
        items = next(iter(value.values()))
        return isinstance(items, list) and any(isinstance(item, dict) for item in items)
    return isinstance(value, dict)
