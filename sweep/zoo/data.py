"""Datasets: a registry of loaders that return train/val/test splits (`load_dataset`), and your own through a factory.

torchvision downloads (download: true) and scans folders; the files themselves are read here, so local copies need no
checksums to match (MNIST's .gz may stay compressed, a CIFAR copy may be re-packed).
"""

from __future__ import annotations

import codecs
import gzip
import logging
import math
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from dataclasses import field as _field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd

from sweep.errors import InputError
from sweep.zoo.images import FileImages, TensorImages, decoded, photo_transforms, unreadable
from sweep.zoo.plugin import resolve_factory

log = logging.getLogger(__name__)


class DataError(InputError):
    """Bad dataset settings or missing files; the one-line message names the spec field and the fix."""


@dataclass
class DataSplits:
    name: str
    num_classes: int
    in_channels: int
    image_size: int  # side of the square model input
    train: Dataset
    val: Dataset | None  # None only in a loader's official splits: validation is then held out of train
    test: Dataset
    # Image files left out because they cannot be read (at most MAX_BAD_FRACTION of them): record their count.
    skipped_files: list[str] = _field(default_factory=list)
    val_source: str = "train"  # "train" (held out of it), "dataset" (its own), "test" (load_dataset's val_from_test)


MAX_BAD_FRACTION = 0.01  # unreadable image files a file-based dataset may lose (skipped, counted); more is an error
# The seed that carves validation out of the test split: the same images for every trial seed, so each seed's
# test_accuracy is measured on the same images and every run's validation split is the same one.
_TEST_CARVE_SEED = 0


def _holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (kept, held): `fraction` of each class held out at random, deterministic in seed."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(len(labels), dtype=torch.bool)
    seen = 0
    for c in labels.unique():
        members = order[labels[order] == c]
        # Cumulative rounding: the per-class counts add up to round(fraction * n) exactly.
        count = round(fraction * (seen + len(members))) - round(fraction * seen)
        held[members[:count]] = True
        seen += len(members)
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def _carved_from_test(splits: DataSplits, val_fraction: float, where: str) -> DataSplits:
    """val_fraction of test as validation (per class), the rest as test; train stays whole (see `load_dataset`)."""
    kept, held = _holdout(splits.test.labels, val_fraction, _TEST_CARVE_SEED)
    if len(held) == 0 or len(kept) == 0:
        raise DataError(f"dataset.val_fraction: {val_fraction} of {len(splits.test)} test examples leaves "
                        f"{'no validation' if len(held) == 0 else 'no test'} examples ({where}); use a fraction "
                        f"such as 0.1")
    return replace(splits, val=splits.test.subset(held), test=splits.test.subset(kept), val_source="test")


# ---------------------------------------------------------------------------------------------------- loaders

def _missing(root: Path, name: str, expected: Path, fix: str = "pass dataset.root or set SWEEP_DATA, or download: true"
             ) -> DataError:
    if not root.exists():
        return DataError(f"dataset.root: {root} does not exist; {fix}")
    return DataError(f"dataset.root: {root} has no {name} files (missing {expected}); {fix}")


def _digits(root: Path, download: bool, image_size: int | None) -> DataSplits:
    """scikit-learn's 1,797 8x8 digits: bundled, so it works offline everywhere."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)  # 0..16 -> 0..255
    labels = torch.from_numpy(digits.target).long()
    whole = TensorImages(images, labels, ((0.3053,), (0.3760,)), image_size or 8, pad=1, flip=False)
    # No official test split: hold out 20% with a fixed seed, so every seed's final number is on the same images.
    rest, test = _holdout(labels, 0.2, seed=0)
    return DataSplits("digits", 10, 1, whole.image_size, whole.subset(rest), None, whole.subset(test))


def _read_idx(raw: Path, stem: str, root: Path, name: str) -> Tensor:
    """An IDX file of unsigned bytes (the MNIST format), plain or gzipped."""
    path = raw / stem if (raw / stem).exists() else raw / f"{stem}.gz"
    if not path.exists():
        raise _missing(root, name, raw / stem)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    header_ok = len(data) >= 4 and data[:3] == b"\x00\x00\x08" and len(data) >= 4 + 4 * data[3]
    dims = struct.unpack(f">{data[3]}I", data[4:4 + 4 * data[3]]) if header_ok else ()
    if not header_ok or len(data) != 4 + 4 * len(dims) + math.prod(dims):
        raise DataError(f"dataset.root: {path} is not an IDX file of unsigned bytes; replace it or use download: true")
    return torch.frombuffer(bytearray(data[4 + 4 * len(dims):]), dtype=torch.uint8).view(dims)


def _idx(name: str, tv_class: type, stats: tuple, root: Path, download: bool, image_size: int | None) -> DataSplits:
    """MNIST-like sets: four IDX files in ROOT/<torchvision class name>/raw/."""
    raw = root / tv_class.__name__ / "raw"
    if download and not any(raw.glob("t10k-labels-idx1-ubyte*")):
        tv_class(str(root), train=False, download=True)  # fetches all four files

    def part(prefix: str) -> TensorImages:
        images = _read_idx(raw, f"{prefix}-images-idx3-ubyte", root, name).unsqueeze(1)
        labels = _read_idx(raw, f"{prefix}-labels-idx1-ubyte", root, name).long()
        return TensorImages(images, labels, stats, image_size or 28, pad=2, flip=False)

    train, test = part("train"), part("t10k")
    return DataSplits(name, 10, 1, train.image_size, train, None, test)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what a dict of numpy arrays needs, so a crafted file cannot run code."""

    _ALLOWED = {
        # numpy pickles arrays through its private _reconstruct, whose module moved in numpy 2: take it from
        # ndarray.__reduce__ instead of importing either path.
        ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles store bytes through it
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return self._ALLOWED[module, name]


def _cifar(name: str, tv_class: type, train_files: list[str], test_files: list[str], label_key: str,
           num_classes: int, stats: tuple, root: Path, download: bool, image_size: int | None) -> DataSplits:
    """CIFAR-10/100: torchvision's python pickles in ROOT/cifar-10-batches-py/ or ROOT/cifar-100-python/."""
    base = root / tv_class.base_folder
    if download and not all((base / f).exists() for f in train_files + test_files):
        tv_class(str(root), download=True)

    def part(files: list[str]) -> TensorImages:
        images, labels = [], []
        for file in files:
            if not (base / file).exists():
                raise _missing(root, name, base / file)
            try:
                with open(base / file, "rb") as f:
                    entry = _ArrayUnpickler(f, encoding="latin1").load()
                images.append(torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8)))
                labels += entry[label_key]
            except (pickle.UnpicklingError, KeyError, TypeError, EOFError) as e:
                raise DataError(f"dataset.root: {base / file} is not a {name} batch ({e!r}); "
                                f"replace it or use download: true") from None
        # Rows are 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
        return TensorImages(torch.cat(images).view(-1, 3, 32, 32), torch.tensor(labels, dtype=torch.long),
                            stats, image_size or 32, pad=4, flip=True)

    train, test = part(train_files), part(test_files)
    return DataSplits(name, num_classes, 3, train.image_size, train, None, test)


def _file_splits(name: str, parts: list[list[tuple[str, int]]], size: int) -> tuple[list[FileImages], list[str]]:
    """FileImages of each part's (path, label) samples and the paths left out: unreadable files (up to
    MAX_BAD_FRACTION of all) are left out of every split, the same ones in every trial; more is a DataError."""
    bad = [(path, why) for part in parts for path, _ in part if (why := unreadable(path)) is not None]
    total = sum(map(len, parts))
    allowed = math.floor(total * MAX_BAD_FRACTION)
    if len(bad) > allowed:
        path, why = bad[0]
        raise DataError(f"dataset.root: {path} {why}; {len(bad)} of {total} {name} image files are unreadable, more "
                        f"than the {allowed} ({MAX_BAD_FRACTION:.0%}) a sweep may skip; replace or remove them")
    if bad:
        log.warning("%s: skipping %d unreadable image files of %d (first: %s %s)", name, len(bad), total, *bad[0])
    skipped = [path for path, _ in bad]
    drop, transforms = set(skipped), photo_transforms(size)
    return [FileImages([s for s in part if s[0] not in drop], *transforms) for part in parts], skipped


def _folder(path: Path, classes: list[str] | None = None) -> tvd.ImageFolder:
    """The images of path/<class>/, in the classes of train/ when given."""
    try:
        found = tvd.ImageFolder(str(path))
    except FileNotFoundError as e:
        raise DataError(f"dataset.root: {' '.join(str(e).split())}; put images in {path}/<class>/") from None
    if classes is not None and found.classes != classes:
        raise DataError(f"dataset.root: {path} has classes {found.classes} but train/ has {classes}; "
                        f"use the same class folders in every split")
    return found


def _imagefolder(root: Path, download: bool, image_size: int | None) -> DataSplits:
    """Local images in root/train/<class>/ and root/test/<class>/ or root/val/<class>/ (or all three). With only
    train/ and val/, val/ is the test split (as in hymenoptera) and validation is held out of train/."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _missing(root, "imagefolder", root / ("train" if test_dir else "test"),
                       fix="point dataset.root at a folder with train/<class>/ and test/<class>/ or val/<class>/")
    size = image_size or 224
    train = _folder(root / "train")
    dirs = [test_dir] + ([root / "val"] if test_dir.name == "test" and (root / "val").is_dir() else [])
    samples = [train.samples] + [_folder(d, train.classes).samples for d in dirs]
    parts, skipped = _file_splits("imagefolder", samples, size)
    first, test, *val = decoded(parts, size) or parts
    return DataSplits("imagefolder", len(train.classes), 3, size, first, val[0] if val else None, test, skipped)


def _flowers102(root: Path, download: bool, image_size: int | None) -> DataSplits:
    """Oxford 102 Flowers in ROOT/flowers-102/ (jpg/, imagelabels.mat, setid.mat), torchvision's layout. Its own
    validation split (10 images per class) is used as is: val_fraction does not apply."""
    from scipy.io import loadmat

    base = root / "flowers-102"
    if download and not (base / "setid.mat").exists():
        tvd.Flowers102(str(root), download=True)
    for needed in ("jpg", "imagelabels.mat", "setid.mat"):
        if not (base / needed).exists():
            raise _missing(root, "flowers102", base / needed)
    labels = np.atleast_1d(loadmat(str(base / "imagelabels.mat"), squeeze_me=True)["labels"]) - 1
    ids = loadmat(str(base / "setid.mat"), squeeze_me=True)
    samples = [[(str(base / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1]))
                for i in np.atleast_1d(ids[key]).tolist()] for key in ("trnid", "valid", "tstid")]
    size = image_size or 224
    (train, val, test), skipped = _file_splits("flowers102", samples, size)
    return DataSplits("flowers102", 102, 3, size, train, val, test, skipped)


def _oxford_pets(root: Path, download: bool, image_size: int | None) -> DataSplits:
    """Oxford-IIIT Pet in ROOT/oxford-iiit-pet/ (images/, annotations/trainval.txt and test.txt), 37 breeds."""
    base = root / "oxford-iiit-pet"
    if download and not (base / "annotations" / "test.txt").exists():
        tvd.OxfordIIITPet(str(root), download=True)

    def samples(split: str) -> list[tuple[str, int]]:
        listing = base / "annotations" / f"{split}.txt"
        if not listing.exists():
            raise _missing(root, "oxford_pets", listing)
        # A row is "<image name> <class 1..37> <species> <breed id>".
        rows = [line.split() for line in listing.read_text().splitlines() if line.strip()]
        return [(str(base / "images" / f"{row[0]}.jpg"), int(row[1]) - 1) for row in rows]

    size = image_size or 224
    (trainval, test), skipped = _file_splits("oxford_pets", [samples("trainval"), samples("test")], size)
    return DataSplits("oxford_pets", 37, 3, size, trainval, None, test, skipped)


# The tensor sets' stats: per-channel mean and std of their training images in [0, 1].
DATASETS: dict[str, Callable[..., DataSplits]] = {
    "digits": _digits,
    "mnist": partial(_idx, "mnist", tvd.MNIST, ((0.1307,), (0.3081,))),
    "fashion_mnist": partial(_idx, "fashion_mnist", tvd.FashionMNIST, ((0.2860,), (0.3530,))),
    "cifar10": partial(_cifar, "cifar10", tvd.CIFAR10, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                       "labels", 10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": partial(_cifar, "cifar100", tvd.CIFAR100, ["train"], ["test"], "fine_labels", 100,
                        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "flowers102": _flowers102,
    "oxford_pets": _oxford_pets,
    "imagefolder": _imagefolder,
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


# ---------------------------------------------------------------------------------------------------- your own data

class UserImages(Dataset):
    """A split from a dataset factory: any map-style Dataset whose items are (CxHxW float tensor, class index),
    with the `labels` and `subset` the sweep needs of a split. Augmentation is the dataset's own (its transforms)."""

    def __init__(self, data: Dataset, labels: Tensor | None = None):
        self.data = data
        self.labels = labels if labels is not None else _labels_of(data)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.data[i]
        return x, int(y)

    def subset(self, idx: Tensor) -> UserImages:
        return UserImages(Subset(self.data, idx.tolist()), self.labels[idx])


def _labels_of(data: Dataset) -> Tensor:
    """Class indices of every item: torchvision's `targets` / a `labels` attribute, else one pass over the items."""
    try:
        n = len(data)
    except TypeError:
        raise DataError(f"dataset.factory: a split is a {type(data).__name__} without len(); return a map-style "
                        f"torch Dataset (with __len__ and __getitem__)") from None
    for attribute in ("targets", "labels"):
        values = getattr(data, attribute, None)
        if values is not None and not callable(values):
            try:
                labels = torch.as_tensor(values, dtype=torch.long).flatten()
            except (TypeError, ValueError, RuntimeError):
                continue
            if len(labels) == n:
                return labels
    return torch.tensor([int(data[i][1]) for i in range(n)], dtype=torch.long)


_SPLIT_KEYS = ("train", "val", "test")
_INFO_KEYS = ("num_classes", "in_channels", "image_size", "name")
def _from_factory(factory: str, kwargs: dict | None, root: str | None, val_fraction: float, seed: int,
                  val_from_test: bool = False) -> DataSplits:
    """Call a dataset factory and make its result a DataSplits (see `load_dataset`)."""
    field = "dataset.factory"
    load = resolve_factory(factory, field, lambda at, text: DataError(f"{at}: {text}"))
    kwargs = dict(kwargs or {})
    if root is not None:
        kwargs.setdefault("root", root)
    try:
        result = load(**kwargs)
    except DataError:
        raise
    except TypeError as e:
        raise DataError(f"{field}: {factory}(**dataset.kwargs) failed: {e}") from e
    except Exception as e:  # the user's loader: one line naming it, the traceback stays in the chain
        raise DataError(f"{field}: {factory} raised {type(e).__name__}: {' '.join(str(e).split())}") from e
    if isinstance(result, DataSplits):
        return _carved_from_test(result, val_fraction, field) if val_from_test else result
    if isinstance(result, (tuple, list)):
        if len(result) not in (2, 3):
            raise DataError(f"{field}: {factory} returned {len(result)} items; return (train, val, test), "
                            f"(train, test) or a dict with train/val/test")
        result = dict(zip(("train", "test") if len(result) == 2 else _SPLIT_KEYS, result))
    if not isinstance(result, dict):
        raise DataError(f"{field}: {factory} returned {type(result).__name__}; return a DataSplits, a dict "
                        f"with train/val/test Datasets, or a (train, val, test) tuple")
    unknown = sorted(set(result) - set(_SPLIT_KEYS) - set(_INFO_KEYS))
    if unknown or result.get("train") is None or result.get("test") is None:
        raise DataError(f"{field}: {factory} returned keys {sorted(result)}; it needs train and test (val "
                        f"optional), and may add {', '.join(_INFO_KEYS)}")
    train, test = UserImages(result["train"]), UserImages(result["test"])
    if val_from_test:  # the base has seen train, and perhaps the factory's val: carve from test instead
        kept, held = _holdout(test.labels, val_fraction, _TEST_CARVE_SEED)
        if len(held) == 0 or len(kept) == 0:
            raise DataError(f"{field}: dataset.val_fraction {val_fraction} of {len(test)} test examples leaves no "
                            f"{'validation' if len(held) == 0 else 'test'} examples; use a fraction such as 0.1")
        test, val, source = test.subset(kept), test.subset(held), "test"
    elif result.get("val") is not None:
        val, source = UserImages(result["val"]), "dataset"
    else:  # no validation split: hold val_fraction of train out, as for the built-in sets
        kept, held = _holdout(train.labels, val_fraction, seed)
        if len(held) == 0:
            raise DataError(f"{field}: no val split and dataset.val_fraction {val_fraction} of {len(train)} "
                            f"training examples holds out none; return a val split or raise val_fraction")
        train, val, source = train.subset(kept), train.subset(held), "train"
    x, y = result["train"][0]
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise DataError(f"{field}: train items must be (image, label) with a CxHxW tensor image, got "
                        f"{type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}; add "
                        f"transforms.ToTensor() to the dataset")
    channels, height, width = x.shape
    if min(x.shape) < 1:
        raise DataError(f"{field}: train images are {channels}x{height}x{width}; they hold no pixels")
    image_size = result.get("image_size")
    if image_size is None:
        if height != width:
            raise DataError(f"{field}: images are {height}x{width}; resize them to a square or return "
                            f"image_size (the side the network's cost is measured at)")
        image_size = height
    labels = torch.cat([train.labels, val.labels, test.labels])
    if labels.min() < 0:
        raise DataError(f"{field}: labels must be class indices 0..num_classes-1, found {int(labels.min())}")
    num_classes = result.get("num_classes")
    if num_classes is None:
        classes = getattr(result["train"], "classes", None)
        num_classes = len(classes) if classes is not None else int(labels.max()) + 1
    if int(labels.max()) >= num_classes:
        raise DataError(f"{field}: label {int(labels.max())} is not below num_classes {num_classes}")
    return DataSplits(str(result.get("name") or factory), int(num_classes), int(result.get("in_channels") or channels),
                      int(image_size), train, val, test, val_source=source)


def load_dataset(name: str | None, root: str | None = None, download: bool = False, val_fraction: float = 0.1,
                 seed: int = 0, image_size: int | None = None, limit: int | None = None,
                 test_limit: int | None = None, stats: tuple | None = None, *,
                 factory: str | None = None, kwargs: dict | None = None, official: DataSplits | None = None,
                 val_from_test: bool = False) -> DataSplits:
    """Load a registered dataset's train/val/test splits, or your own through `factory` (docs/own-model.md).

    root defaults to $SWEEP_DATA, then ./data; nothing is downloaded unless `download`. image_size resizes the
    model input (e.g. digits 8 -> 32, or 224 for ImageNet models). limit keeps at most `limit` examples of the
    official training split (validation is carved from those, val_fraction of them); test_limit cuts the test
    split. Both are drawn per class, deterministic in seed. stats (mean, std) replaces the dataset's own
    normalisation, for weights that were trained with another one. image_size, download and stats do not apply to a
    factory: its own transforms decide the input. official: the splits `load_official` returned (perhaps in another
    process, through sweep.worker.shared_data), carved without loading them again.

    val_from_test (the starting weights were trained on this dataset's training images, so validation held out of
    train would be images the network memorised): validation is val_fraction of the test split instead (per class,
    the same images for every seed), disjoint from the test images left; train stays whole, `limit` cuts only train.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"dataset.val_fraction: {val_fraction} is outside [0, 1); use a fraction such as 0.1")
    for field, value in (("image_size", image_size), ("limit", limit), ("test_limit", test_limit)):
        if value is not None and value < 1:
            raise DataError(f"dataset.{field}: {value} is less than 1; use a positive integer or null")
    if factory is not None:
        if name is not None:
            raise DataError("dataset: give either name or factory, not both")
        splits = _from_factory(factory, kwargs, root, val_fraction, seed, val_from_test)
        stats = None
    else:
        if kwargs:
            raise DataError("dataset.kwargs: only a dataset.factory takes kwargs; remove them or use factory")
        if official is None:
            official = load_official(name, root, download, image_size)
        if val_from_test:
            splits = _carved_from_test(replace(official, val=None), val_fraction, "dataset.name")
        elif official.val is not None:  # a dataset's own validation split, as it is
            splits = replace(official, val_source="dataset")
        else:  # val_fraction of train held out, deterministic in seed
            kept, held = _holdout(official.train.labels, val_fraction, seed)
            if val_fraction > 0 and len(held) == 0:
                raise DataError(f"dataset.val_fraction: {val_fraction} of {len(official.train)} training examples "
                                f"holds out none; raise val_fraction or use more data")
            splits = replace(official, train=official.train.subset(kept), val=official.train.subset(held))
    if limit is not None and splits.val_source == "test":
        splits = replace(splits, train=_take(splits.train, limit, seed))
    elif limit is not None:
        held = min(len(splits.val), max(1, round(limit * val_fraction))) if len(splits.val) else 0
        splits = replace(splits, train=_take(splits.train, limit - held, seed), val=_take(splits.val, held, seed))
    if test_limit is not None:
        splits = replace(splits, test=_take(splits.test, test_limit, seed))
    if stats is not None:
        splits = replace(splits, **{s: getattr(splits, s).normalised(stats) for s in ("train", "val", "test")})
    return splits


def load_official(name: str, root: str | None = None, download: bool = False, image_size: int | None = None
                  ) -> DataSplits:
    """A registered dataset's official splits, before any seed's choice: val is None unless the dataset ships one.
    TensorImages splits in it are what the trials of a node share (sweep.worker.shared_data)."""
    if name not in DATASETS:
        raise DataError(f"dataset.name: {name!r} is not a dataset; use one of {', '.join(dataset_names())}, "
                        f"or dataset.factory: 'pkg.module:function' for your own")
    where = Path(root or os.environ.get("SWEEP_DATA") or "data").expanduser()
    return DATASETS[name](root=where, download=download, image_size=image_size)


def _take(data: Dataset, limit: int, seed: int) -> Dataset:
    if len(data) <= limit:
        return data
    return data.subset(_holdout(data.labels, limit / len(data), seed)[1])


