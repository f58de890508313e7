"""One copy of each dataset per node: trials read their images from Ray's object store instead of loading them (the
driver `publish`es the official splits preflight loaded; a trial `fetch`es them, zero-copy, and carves its own).
Only uint8 tensor splits (TensorImages) travel, as numpy arrays that Ray hands back as read-only views of the node's
shared memory; a trial carves its validation split and `limit` out of them by index (TensorImages.subset), so N
trials on a node hold the images once. File-based splits and dataset factories are loaded by each trial.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import torch

from sweep.zoo.data import DataSplits
from sweep.zoo.images import TensorImages

_SPLITS = ("train", "val", "test")


def data_key(dataset: dict) -> str | None:
    """What decides a dataset's official splits (not the seed's validation split, limit or normalisation); None
    for a dataset factory, whose result only the trial may build."""
    if dataset.get("factory"):
        return None
    return json.dumps([dataset.get("name"), dataset.get("root"), bool(dataset.get("download")),
                       dataset.get("image_size")])


def shareable(official: DataSplits) -> bool:
    return all(isinstance(getattr(official, s), TensorImages) for s in _SPLITS if getattr(official, s) is not None)


def _to_arrays(official: DataSplits) -> dict[str, Any]:
    arrays: dict[int, np.ndarray] = {}  # splits that index one tensor (digits' train and test) send it once

    def packed(split: TensorImages | None) -> tuple | None:
        return None if split is None else (
            arrays.setdefault(id(split.base), split.base.numpy()), split.labels.numpy(),
            None if split.index is None else split.index.numpy(), (split.mean, split.std), split.image_size,
            split.pad, split.flip)

    return {"meta": (official.name, official.num_classes, official.in_channels, official.image_size,
                     list(official.skipped_files)), **{name: packed(getattr(official, name)) for name in _SPLITS}}


def publish(officials: dict[str, DataSplits]) -> dict[str, Any]:
    """Put each shareable dataset in the object store (driver side): data key -> ObjectRef."""
    import ray

    if os.environ.get("SWEEP_SHARE_DATA", "1") == "0":  # every trial loads its own copy (bench/data_sharing.py)
        return {}
    return {key: ray.put(_to_arrays(official)) for key, official in officials.items() if shareable(official)}


def fetch(ref: Any) -> DataSplits:
    """The official splits behind a published ref, their images in the node's shared memory (trial side)."""
    import ray

    packed = ray.get(ref)
    name, num_classes, in_channels, image_size, skipped = packed["meta"]

    def tensor(a: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # the shared pages are read-only; nothing here writes to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(a)

    def split(part: tuple | None) -> TensorImages | None:
        if part is None:
            return None
        base, labels, index, stats, size, pad, flip = part
        return TensorImages(tensor(base), tensor(labels), stats, size, pad, flip,
                            None if index is None else tensor(index))

    return DataSplits(name, num_classes, in_channels, image_size, split(packed["train"]), split(packed["val"]),
                      split(packed["test"]), skipped)
