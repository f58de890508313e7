"""Checks a spec must pass before any trial starts, beyond what the YAML parser can see.

    preflight(load_spec("search_spaces/quickstart.yaml"))   # SpecError: one line per problem, field first

The parser knows names and ranges; only loading can tell that a dataset folder holds no dataset, that a checkpoint
is corrupt or belongs to another architecture, or that the pruner cannot handle a model (channel shuffle). Each of
these would otherwise fail every trial after Ray has started, possibly hours into a sweep. Every distinct
(model, weights, dataset) is checked once: load the dataset's splits, build the model, trace it for the pruner.
Nothing is downloaded here: torchvision weights are checked by name, and a dataset the trials will download is
not loaded.
"""

from __future__ import annotations

import itertools
import json
import os

import torch

from .data import DataError, load_dataset
from .models import MODELS, ModelError, build_model
from .pruning import PruningError, analyse
from .spec import SpecError, SweepSpec

# Trial paths whose values decide what a check loads. Everything else (training, pruning ratios) cannot make
# loading fail, so other swept settings are not multiplied out.
_SECTIONS = ("model", "dataset")
_LEAVES = ("prune.ignore",)


def _combinations(spec: SweepSpec) -> list[dict]:
    """The distinct model/dataset/ignore settings the sweep's trials can have (one trial dict each)."""
    paths = [p for p in spec.space if p in _SECTIONS or p.split(".")[0] in _SECTIONS or p in _LEAVES]
    seen, out = set(), []
    # A domain's values are the items of a grid or choice, or both ends of a range.
    for values in itertools.product(*(spec.space[p].values for p in paths)):
        config = json.loads(json.dumps(spec.trial))  # a deep copy; the trial dict is plain JSON data
        for path, value in zip(paths, values):
            *parents, leaf = path.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
        key = json.dumps([config["model"], config["dataset"], config["prune"]["ignore"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(config)
    return out


def _dataset_shape(dataset: dict, seed: int) -> tuple[int, int, int] | None:
    """(classes, channels, side) of the model input, or None when the trials will download the data first."""
    try:
        splits = load_dataset(dataset["name"], root=dataset["root"], download=False,
                              val_fraction=dataset["val_fraction"], seed=seed, image_size=dataset["image_size"],
                              limit=dataset["limit"])
    except DataError:
        if dataset["download"]:
            return None  # not here yet; each trial downloads it (and reports a failure itself)
        raise
    return splits.num_classes, splits.in_channels, splits.image_size


def _weights_to_load(name: str, weights: str | None) -> str | None:
    """The weights build_model may load here: a checkpoint path. A torchvision weights name is only checked."""
    if weights is None or name in MODELS or os.path.isabs(weights):  # the spec made every checkpoint path absolute
        return weights
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    if weights.removeprefix(f"{enum.__name__}.") not in enum.__members__:
        raise ModelError(f"model.weights: unknown weights '{weights}' for {name}; choose one of "
                         f"{', '.join(enum.__members__)} or a checkpoint path")
    return None  # the architecture is the same with or without the pretrained values


def _check_model(model: dict, shape: tuple[int, int, int], ignore: list[str], dataset: str) -> None:
    classes, channels, side = shape
    net = build_model(model["name"], classes, _weights_to_load(model["name"], model["weights"]), channels).eval()
    try:
        analyse(net, (torch.zeros(1, channels, side, side),), ignore=tuple(ignore))
    except PruningError as error:
        text = " ".join(str(error).split())
        raise SpecError(f"model.name: {model['name']} on {dataset} ({channels}x{side}x{side} inputs) cannot be "
                        f"pruned: {text}") from None


def preflight(spec: SweepSpec) -> None:
    """Load every distinct dataset and model of the sweep once; SpecError lists what would fail every trial."""
    errors: list[str] = []
    shapes: dict[str, tuple | None] = {}
    checked: set[str] = set()
    for config in _combinations(spec):
        if _factory_unsupported(config):
            continue
        dataset_key = json.dumps(config["dataset"], sort_keys=True)
        if dataset_key not in shapes:
            try:
                shapes[dataset_key] = _dataset_shape(config["dataset"], config["seed"])
            except DataError as error:
                shapes[dataset_key] = None
                errors.append(str(error))
        shape = shapes[dataset_key]
        model_key = json.dumps([config["model"], shape, config["prune"]["ignore"]], sort_keys=True)
        if shape is None or model_key in checked:
            continue
        checked.add(model_key)
        try:
            _check_model(config["model"], shape, config["prune"]["ignore"], config["dataset"]["name"])
        except (ModelError, SpecError) as error:
            errors.append(str(error))
    if errors:
        raise SpecError(list(dict.fromkeys(" ".join(e.split()) for e in errors)))


def _factory_unsupported(config: dict) -> bool:
    """Whether the trial names a model.factory or dataset.factory that build_model / load_dataset cannot take yet
    (they gain `factory=` and `kwargs=` on the `ui` branch): such a config is left for its trials to load."""
    import inspect

    return any(config[section].get("factory") and "factory" not in inspect.signature(load).parameters
               for section, load in (("model", build_model), ("dataset", load_dataset)))
