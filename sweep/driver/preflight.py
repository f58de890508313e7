"""Checks a spec must pass before any trial starts, beyond what the YAML parser can see (`preflight(spec)`: a
SpecError, one line per problem, field first), and the folders a sweep writes to (`check_writable`).

Only loading can tell that a dataset folder holds no dataset, that a checkpoint is corrupt or belongs to another
architecture, or that the pruner cannot handle a model: each would otherwise fail every trial after Ray started.
Every distinct (model, weights, dataset) is loaded, built and traced once; nothing is downloaded here.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import tempfile
from pathlib import Path

import torch
import torchvision

from sweep.config.spec import SpecError, SweepSpec
from sweep.errors import InputError
from sweep.pruning import PruningError, analyse
from sweep.store import objects
from sweep.worker.shared_data import data_key
from sweep.zoo.data import DataError, DataSplits, load_dataset, load_official
from sweep.zoo.models import MODELS, ModelError, build_model


def _weights_to_load(name: str, weights: str | None) -> str | None:
    """The weights build_model may load here: a checkpoint path. A torchvision weights name is only checked."""
    if weights is None or name in MODELS or os.path.isabs(weights):  # the spec made every checkpoint path absolute
        return weights
    enum = torchvision.models.get_model_weights(name)
    if weights.removeprefix(f"{enum.__name__}.") not in enum.__members__:
        raise ModelError("model.weights", f"unknown weights '{weights}' for {name}; choose one of "
                         f"{', '.join(enum.__members__)} or a checkpoint path")
    return None  # the architecture is the same with or without the pretrained values


def _check_model(model: dict, shape: tuple[int, int, int], ignore: list[str], dataset: str) -> None:
    classes, channels, side = shape
    factory = model.get("factory")
    weights = model["weights"] if factory else _weights_to_load(model["name"], model["weights"])
    net = build_model(model.get("name"), classes, weights, channels, factory=factory,
                      kwargs=model.get("kwargs")).eval()
    try:
        analyse(net, (torch.zeros(1, channels, side, side),), ignore=tuple(ignore))
    except PruningError as error:  # (preflight puts every message on one line)
        field, what = ("model.factory", factory) if factory else ("model.name", model["name"])
        raise SpecError(f"{field}: {what} on {dataset} ({channels}x{side}x{side} inputs) cannot be pruned: "
                        f"{error}") from None


def preflight(spec: SweepSpec) -> dict[str, DataSplits]:
    """Load every distinct dataset and model of the sweep once; SpecError lists what would fail every trial.
    Returns the official splits it loaded, by sweep.worker.shared_data.data_key, for the trials to share."""
    errors: list[str] = []
    shapes: dict[str, tuple | None] = {}
    officials: dict[str, DataSplits] = {}
    checked: set[str] = set()
    # Only these paths decide what loads (training or pruning settings cannot make loading fail); a domain's values
    # are the items of a grid or choice, or both ends of a range.
    paths = [p for p in spec.space if p.split(".")[0] in ("model", "dataset") or p == "prune.ignore"]
    for values in itertools.product(*(spec.space[p].values for p in paths)):
        config = json.loads(json.dumps(spec.trial))  # a deep copy; the trial dict is plain JSON data
        for path, value in zip(paths, values):
            *parents, leaf = path.split(".")
            functools.reduce(dict.__getitem__, parents, config)[leaf] = value
        data, dataset_key = config["dataset"], json.dumps(config["dataset"], sort_keys=True)
        if dataset_key not in shapes:  # (classes, channels, side) of the model input; None: not loaded
            shapes[dataset_key] = None
            try:
                official = None if data.get("factory") else load_official(data["name"], data["root"], False,
                                                                          data["image_size"])
                splits = load_dataset(data.get("name"), root=data["root"], download=False, seed=config["seed"],
                                      val_fraction=data["val_fraction"], image_size=data["image_size"],
                                      limit=data["limit"], factory=data.get("factory"), kwargs=data.get("kwargs"),
                                      official=official)
                shapes[dataset_key] = (splits.num_classes, splits.in_channels, splits.image_size)
                if official is not None:  # the official splits it loaded, for the trials to share
                    officials[data_key(data)] = official
            except DataError as error:
                if not data["download"]:  # else not here yet: each trial downloads it (and reports a failure itself)
                    errors.append(str(error))
        shape = shapes[dataset_key]
        model_key = json.dumps([config["model"], shape, config["prune"]["ignore"]], sort_keys=True)
        if shape is None or model_key in checked:
            continue
        checked.add(model_key)
        try:
            _check_model(config["model"], shape, config["prune"]["ignore"],
                         config["dataset"].get("name") or config["dataset"].get("factory"))
        except (ModelError, SpecError) as error:
            errors.append(str(error))
    if errors:
        raise SpecError(list(dict.fromkeys(" ".join(e.split()) for e in errors)))
    return officials


# --- folders the sweep writes to ---------------------------------------------------------------------------------


class StorageError(InputError):
    """A folder the sweep must write to cannot be written; the one-line message names the option and the fix."""


def _probe(folder: Path) -> str | None:
    """Create and delete a file in folder (the only test that holds for root, ACLs and read-only mounts alike)."""
    try:
        tempfile.NamedTemporaryFile(dir=folder, prefix=".sweep-write-probe-").close()
    except OSError as error:
        return f"{type(error).__name__}: {error.strerror or error}"
    return None


def check_writable(storage: str, tracking_uri: str) -> None:
    """Before Ray starts and the MLflow store opens: StorageError (naming --storage or --tracking-uri and the fix) if
    the resolved storage (a folder that may not exist yet, or object storage) or a sqlite store's folder (sqlite
    writes a journal beside the database) cannot take new files. Server URIs are not checked here."""
    errors = []
    if objects.is_uri(storage):
        why = objects.probe_writable(storage)
        if why:
            errors.append(f"--storage: {storage} is not writable ({why}); create the bucket, and give this machine "
                          "and every node credentials that may write it (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                          "or an instance profile; AWS_ENDPOINT_URL for an S3-compatible server)")
    else:
        folder = Path(storage)
        target = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        why = "is not a folder" if not target.is_dir() else _probe(target)
        if why:
            where = str(folder) if target == folder else f"{folder} (its nearest existing folder {target})"
            errors.append(f"--storage: {where} is not writable ({why}); give --storage a folder you can write to, "
                          "or fix its permissions")
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            errors.append(f"--tracking-uri: {tracking_uri}: folder {db.parent} does not exist; create it or pass "
                          "--tracking-uri sqlite:///<writable folder>/mlflow.db")
        else:
            why = _probe(db.parent) or (None if not db.exists() or os.access(db, os.W_OK)
                                        else "the database file is read-only")
            if why:
                errors.append(f"--tracking-uri: {tracking_uri}: folder {db.parent} is not writable ({why}); pass "
                              "--tracking-uri sqlite:///<writable folder>/mlflow.db or fix its permissions")
    if errors:
        raise StorageError(" | ".join(errors))
