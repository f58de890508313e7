"""Datasets: a registry of loaders that return train/val/test splits, and `batches` to iterate a split.

    splits = load_dataset("cifar10", root="data", image_size=32)      # DataError names the field and the fix
    for x, y in batches(splits.train, 128, train=True, device="cuda"):   # one `for` = one epoch
        ...

A split is one of two kinds:
- TensorImages: the whole split as one uint8 tensor at native resolution (digits, MNIST, Fashion-MNIST, CIFAR).
  `batches` moves it to the device once and augments, resizes and normalises there with batched tensor ops:
  no DataLoader, no workers, no per-image Python.
- FileImages: images decoded from disk per item (ImageFolder, Flowers102, Oxford-IIIT Pet); `batches` uses a
  DataLoader with workers.
Indexing a split gives the evaluation view (resized, normalised, never augmented); augmentation happens only in
`batches(..., train=True, augment=True)`.

torchvision is used to download (download: true) and to scan folders; the files themselves are read here, so
local copies need no checksums to match (MNIST's .gz may stay compressed, a CIFAR copy may be re-packed).
"""

from __future__ import annotations

import codecs
import copy
import gzip
import logging
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from dataclasses import field as _field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T

from sweep.errors import InputError
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
    # Where val comes from: "train" (held out of it), "dataset" (its own validation split) or "test" (carved from
    # test, because the base's weights were trained on this dataset's training images: see `load_dataset`)
    val_source: str = "train"


# Per-dataset channel mean and std of the training images in [0, 1].
_DIGITS_STATS = ((0.3053,), (0.3760,))
_MNIST_STATS = ((0.1307,), (0.3081,))
_FASHION_STATS = ((0.2860,), (0.3530,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # photos: matches ImageNet-pretrained weights

MAX_BAD_FRACTION = 0.01  # unreadable image files a file-based dataset may lose (skipped, counted); more is an error
_DEVICE_BYTES = 200 * 2**20  # a tensor split up to this size lives on the device; a larger one stays in host memory
_MAX_WORKERS = 8


# ---------------------------------------------------------------------------------------------------- splits

class TensorImages(Dataset):
    """A split held as one uint8 tensor N x C x H x W at native resolution, with int64 labels.

    A subset is an index into the same tensor, never a copy: every trial on a node can read one shared copy of the
    official split (sweep.worker.shared_data) and still carve its own seed's validation split out of it.
    `pad` is the random-shift range of training augmentation in native pixels, `flip` adds horizontal flips.
    """

    def __init__(self, images: Tensor, labels: Tensor, stats: tuple, image_size: int, pad: int, flip: bool,
                 index: Tensor | None = None):
        self.base, self.index, self.labels = images, index, labels  # labels are this view's, one per example
        self.mean, self.std = stats
        self.image_size, self.pad, self.flip = image_size, pad, flip
        self._placed: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}  # storage device -> tensors there

    @property
    def images(self) -> Tensor:
        """This view's images as one tensor (a copy for a subset)."""
        return self.base if self.index is None else self.base[self.index]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        row = i if self.index is None else int(self.index[i])
        return self.prepare(self.base[row][None])[0], int(self.labels[i])

    def subset(self, idx: Tensor) -> TensorImages:
        index = idx if self.index is None else self.index[idx]
        return TensorImages(self.base, self.labels[idx], (self.mean, self.std), self.image_size, self.pad,
                            self.flip, index)

    def placed(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """(all images, this view's labels, this view's rows of the images or None) on the device, copied once."""
        key = str(device)
        if key not in self._placed:
            index = None if self.index is None else self.index.to(device)
            self._placed[key] = (self.base.to(device), self.labels.to(device), index)
        return self._placed[key]

    def normalised(self, stats: tuple) -> TensorImages:
        """The same images, normalised with other (mean, std)."""
        view = copy.copy(self)
        view.mean, view.std = stats
        return view

    def prepare(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 batch -> float batch at image_size, normalised; augmented when a generator is given."""
        x = x.float().div_(255)
        if generator is not None:
            x = _random_shift(x, self.pad, generator)
            if self.flip:
                x = _random_flip(x, generator)
        if x.shape[-1] != self.image_size:
            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        return TF.normalize(x, self.mean, self.std)


def _random_shift(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    """Per image, a random crop of the zero-padded image (as RandomCrop(size, padding=pad)), in one gather."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1, 1, 1), generator=g, device=x.device)
    rows = dy + torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = dx + torch.arange(w, device=x.device).view(1, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]


def _random_flip(x: Tensor, g: torch.Generator) -> Tensor:
    flip = torch.rand(len(x), generator=g, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


class FileImages(Dataset):
    """A split of image files, decoded per item; `train_tf` applies only to the view made by `with_augment(True)`."""

    def __init__(self, samples: list[tuple[str, int]], train_tf: Callable, eval_tf: Callable):
        self.samples = samples
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        self.train_tf, self.eval_tf = train_tf, eval_tf
        self.augment = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return (self.train_tf if self.augment else self.eval_tf)(rgb), label

    def subset(self, idx: Tensor) -> FileImages:
        return FileImages([self.samples[i] for i in idx.tolist()], self.train_tf, self.eval_tf)

    def normalised(self, stats: tuple) -> FileImages:
        """The same files, normalised with other (mean, std): the Normalize step of both transforms is replaced."""
        def swap(tf: Callable) -> Callable:
            steps = [T.Normalize(*stats) if isinstance(s, T.Normalize) else s for s in tf.transforms]
            return T.Compose(steps)

        view = copy.copy(self)
        view.train_tf, view.eval_tf = swap(self.train_tf), swap(self.eval_tf)
        return view

    def with_augment(self, augment: bool) -> FileImages:
        view = copy.copy(self)
        view.augment = augment
        return view


def _photo_transforms(size: int, stats: tuple) -> tuple[Callable, Callable]:
    """Train and eval transforms for photographs."""
    finish = [T.ToTensor(), T.Normalize(*stats)]
    if size <= 64:
        # Small inputs (CIFAR as JPEG files): a RandomResizedCrop would throw away most of a 32-pixel image, so
        # augment as for CIFAR instead, with a shift of an eighth of the side.
        fit = [T.Resize(size), T.CenterCrop(size)]
        return (T.Compose([*fit, T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), *finish]),
                T.Compose([*fit, *finish]))
    return (T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *finish]),
            T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *finish]))


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


# The seed that carves validation out of the test split: the same images for every trial seed, so each seed's
# test_accuracy is measured on the same images and every run's validation split is the same one.
_TEST_CARVE_SEED = 0


def _carved_from_test(splits: DataSplits, val_fraction: float, where: str) -> DataSplits:
    """val_fraction of test as validation (per class), the rest as test: for a base whose weights were trained on
    this dataset's training images, which a validation split held out of train would hold too. train stays whole."""
    kept, held = _holdout(splits.test.labels, val_fraction, _TEST_CARVE_SEED)
    if len(held) == 0 or len(kept) == 0:
        raise DataError(f"dataset.val_fraction: {val_fraction} of {len(splits.test)} test examples leaves "
                        f"{'no validation' if len(held) == 0 else 'no test'} examples ({where}); use a fraction "
                        f"such as 0.1")
    return replace(splits, val=splits.test.subset(held), test=splits.test.subset(kept), val_source="test")


def _with_validation(official: DataSplits, val_fraction: float, seed: int) -> DataSplits:
    """Official splits without a validation split get one: val_fraction of train held out, deterministic in seed.
    The official test split stays whole, and a dataset's own validation split is used as it is."""
    if official.val is not None:
        return replace(official, val_source="dataset")
    train = official.train
    kept, held = _holdout(train.labels, val_fraction, seed)
    if val_fraction > 0 and len(held) == 0:
        raise DataError(f"dataset.val_fraction: {val_fraction} of {len(train)} training examples holds out none; "
                        f"raise val_fraction or use more data")
    return replace(official, train=train.subset(kept), val=train.subset(held))


# ---------------------------------------------------------------------------------------------------- file checks

_CHECKED: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime_ns) -> why unreadable (None: fine)


def unreadable(path: str) -> str | None:
    """Why an image file cannot be used, or None: missing, empty, or a header PIL cannot identify or verify.

    Reads the header only (PIL's verify; about 0.1 ms a file with a warm page cache, 0.8 ms cold, on hymenoptera),
    not the pixels: a file whose header is intact but whose body is cut short still fails when decoded.
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        return f"cannot be read ({error.strerror or type(error).__name__})"
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        if stat.st_size == 0:
            _CHECKED[key] = "is empty"
        else:
            try:
                with Image.open(path) as image:
                    image.verify()
                _CHECKED[key] = None
            except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
                _CHECKED[key] = f"is not a readable image ({type(error).__name__}: {' '.join(str(error).split())})"
    return _CHECKED[key]


def _readable(samples: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(the samples whose files can be read, [(path, why)] for the others), in the original order."""
    good, bad = [], []
    for path, label in samples:
        why = unreadable(path)
        if why is None:
            good.append((path, label))
        else:
            bad.append((path, why))
    return good, bad


def _allow_bad(name: str, total: int, bad: list[tuple[str, str]], max_bad_fraction: float) -> list[str]:
    """Up to max_bad_fraction of a dataset's files may be unreadable: skipped and returned; more is a DataError."""
    allowed = math.floor(total * max_bad_fraction)
    if len(bad) > allowed:
        path, why = bad[0]
        raise DataError(f"dataset.root: {path} {why}; {len(bad)} of {total} {name} image files are unreadable, more "
                        f"than the {allowed} ({max_bad_fraction:.0%}) a sweep may skip; replace or remove them")
    if bad:
        log.warning("%s: skipping %d unreadable image files of %d (first: %s %s)", name, len(bad), total, *bad[0])
    return [path for path, _ in bad]


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
    whole = TensorImages(images, labels, _DIGITS_STATS, image_size or 8, pad=1, flip=False)
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


def _idx_loader(name: str, tv_class: type, stats: tuple) -> Callable[..., DataSplits]:
    """MNIST-like sets: four IDX files in ROOT/<torchvision class name>/raw/."""

    def load(root: Path, download: bool, image_size: int | None) -> DataSplits:
        raw = root / tv_class.__name__ / "raw"
        if download and not any(raw.glob("t10k-labels-idx1-ubyte*")):
            tv_class(str(root), train=False, download=True)  # fetches all four files

        def part(prefix: str) -> TensorImages:
            images = _read_idx(raw, f"{prefix}-images-idx3-ubyte", root, name).unsqueeze(1)
            labels = _read_idx(raw, f"{prefix}-labels-idx1-ubyte", root, name).long()
            return TensorImages(images, labels, stats, image_size or 28, pad=2, flip=False)

        train, test = part("train"), part("t10k")
        return DataSplits(name, 10, 1, train.image_size, train, None, test)

    return load


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


def _cifar_loader(name: str, tv_class: type, train_files: list[str], test_files: list[str], label_key: str,
                  num_classes: int, stats: tuple) -> Callable[..., DataSplits]:
    """CIFAR-10/100: torchvision's python pickles in ROOT/cifar-10-batches-py/ or ROOT/cifar-100-python/."""

    def load(root: Path, download: bool, image_size: int | None) -> DataSplits:
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

    return load


def _folder(path: Path, transforms: tuple[Callable, Callable], bad: list[tuple[str, str]],
            classes: list[str] | None = None) -> tuple[FileImages, list[str], int]:
    """The images of path/<class>/, without unreadable files (appended to `bad`); also the classes and file count."""
    try:
        found = tvd.ImageFolder(str(path))
    except FileNotFoundError as e:
        raise DataError(f"dataset.root: {' '.join(str(e).split())}; put images in {path}/<class>/") from None
    if classes is not None and found.classes != classes:
        raise DataError(f"dataset.root: {path} has classes {found.classes} but train/ has {classes}; "
                        f"use the same class folders in every split")
    good, unusable = _readable(found.samples)
    bad.extend(unusable)
    return FileImages(good, *transforms), found.classes, len(found.samples)


def _imagefolder(root: Path, download: bool, image_size: int | None,
                 max_bad_fraction: float = MAX_BAD_FRACTION) -> DataSplits:
    """Local images in root/train/<class>/ and root/test/<class>/ or root/val/<class>/ (or all three).

    With only train/ and val/, val/ is the test split (as in hymenoptera) and validation is held out of train/.
    Every file's header is checked first: unreadable files (up to max_bad_fraction) are left out of every split,
    the same ones in every trial, and listed in `skipped_files`; more than that is a DataError.
    """
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _missing(root, "imagefolder", root / ("train" if test_dir else "test"),
                       fix="point dataset.root at a folder with train/<class>/ and test/<class>/ or val/<class>/")
    size = image_size or 224
    transforms = _photo_transforms(size, _IMAGENET_STATS)
    bad: list[tuple[str, str]] = []
    train, classes, total = _folder(root / "train", transforms, bad)
    test, _, count = _folder(test_dir, transforms, bad, classes)
    total += count
    val = None
    if test_dir.name == "test" and (root / "val").is_dir():
        val, _, count = _folder(root / "val", transforms, bad, classes)
        total += count
    skipped = _allow_bad("imagefolder", total, bad, max_bad_fraction)
    parts = [train, val, test] if val is not None else [train, test]
    decoded = _decoded(parts, size)
    if decoded is not None:
        train, val, test = decoded if val is not None else (decoded[0], None, decoded[1])
    return DataSplits("imagefolder", len(classes), 3, size, train, val, test, skipped)


_DECODE_MAX_SIDE = 64  # small photos (CIFAR as JPEG files) are decoded once into uint8 tensors


def _decoded(parts: list[FileImages], size: int) -> list[TensorImages] | None:
    """Splits of small photos, all square and of one side, decoded once into TensorImages; else None.

    Decoding 60,000 CIFAR JPEGs takes seconds, once, where a DataLoader decodes every image again in every epoch;
    the uint8 tensor (184 MB) is what nodes share (sweep.worker.shared_data). Augmentation is the same as for such files
    (a shift of an eighth of the side, and flips); only photos above 64 pixels get RandomResizedCrop.
    """
    first = next((p.samples[0][0] for p in parts if p.samples), None)
    if first is None or size > _DECODE_MAX_SIDE:
        return None
    with Image.open(first) as image:
        side = image.size[0]
    if image.size != (side, side) or side > _DECODE_MAX_SIDE:
        return None

    def pixels(path: str) -> np.ndarray | None:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")) if image.size == (side, side) else None

    paths = [path for p in parts for path, _ in p.samples]
    # PIL decodes without the GIL: threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        arrays = list(pool.map(pixels, paths, chunksize=256))
    if any(a is None for a in arrays):  # mixed sizes: keep decoding per item, with the file transforms
        return None
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    out, start = [], 0
    for p in parts:
        out.append(TensorImages(images[start:start + len(p)], p.labels, _IMAGENET_STATS, size, pad=side // 8,
                                flip=True))
        start += len(p)
    return out


def _flowers102(root: Path, download: bool, image_size: int | None,
                max_bad_fraction: float = MAX_BAD_FRACTION) -> DataSplits:
    """Oxford 102 Flowers in ROOT/flowers-102/ (jpg/, imagelabels.mat, setid.mat), torchvision's layout.

    It ships its own validation split (10 images per class), used as is: val_fraction does not apply.
    """
    from scipy.io import loadmat

    base = root / "flowers-102"
    if download and not (base / "setid.mat").exists():
        tvd.Flowers102(str(root), download=True)
    for needed in ("jpg", "imagelabels.mat", "setid.mat"):
        if not (base / needed).exists():
            raise _missing(root, "flowers102", base / needed)
    labels = np.atleast_1d(loadmat(str(base / "imagelabels.mat"), squeeze_me=True)["labels"]) - 1
    ids = loadmat(str(base / "setid.mat"), squeeze_me=True)
    size = image_size or 224
    transforms = _photo_transforms(size, _IMAGENET_STATS)

    bad: list[tuple[str, str]] = []
    total = 0

    def part(key: str) -> FileImages:
        nonlocal total
        samples = [(str(base / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1]))
                   for i in np.atleast_1d(ids[key]).tolist()]
        good, unusable = _readable(samples)
        bad.extend(unusable)
        total += len(samples)
        return FileImages(good, *transforms)

    train, val, test = part("trnid"), part("valid"), part("tstid")
    skipped = _allow_bad("flowers102", total, bad, max_bad_fraction)
    return DataSplits("flowers102", 102, 3, size, train, val, test, skipped)


def _oxford_pets(root: Path, download: bool, image_size: int | None,
                 max_bad_fraction: float = MAX_BAD_FRACTION) -> DataSplits:
    """Oxford-IIIT Pet in ROOT/oxford-iiit-pet/ (images/, annotations/trainval.txt and test.txt), 37 breeds."""
    base = root / "oxford-iiit-pet"
    if download and not (base / "annotations" / "test.txt").exists():
        tvd.OxfordIIITPet(str(root), download=True)
    size = image_size or 224
    transforms = _photo_transforms(size, _IMAGENET_STATS)

    bad: list[tuple[str, str]] = []
    total = 0

    def part(split: str) -> FileImages:
        nonlocal total
        listing = base / "annotations" / f"{split}.txt"
        if not listing.exists():
            raise _missing(root, "oxford_pets", listing)
        rows = [line.split() for line in listing.read_text().splitlines() if line.strip()]
        # A row is "<image name> <class 1..37> <species> <breed id>".
        samples = [(str(base / "images" / f"{row[0]}.jpg"), int(row[1]) - 1) for row in rows]
        good, unusable = _readable(samples)
        bad.extend(unusable)
        total += len(samples)
        return FileImages(good, *transforms)

    trainval, test = part("trainval"), part("test")
    skipped = _allow_bad("oxford_pets", total, bad, max_bad_fraction)
    return DataSplits("oxford_pets", 37, 3, size, trainval, None, test, skipped)


DATASETS: dict[str, Callable[..., DataSplits]] = {
    "digits": _digits,
    "mnist": _idx_loader("mnist", tvd.MNIST, _MNIST_STATS),
    "fashion_mnist": _idx_loader("fashion_mnist", tvd.FashionMNIST, _FASHION_STATS),
    "cifar10": _cifar_loader("cifar10", tvd.CIFAR10, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                             "labels", 10, _CIFAR10_STATS),
    "cifar100": _cifar_loader("cifar100", tvd.CIFAR100, ["train"], ["test"], "fine_labels", 100, _CIFAR100_STATS),
    "flowers102": _flowers102,
    "oxford_pets": _oxford_pets,
    "imagefolder": _imagefolder,
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


# ---------------------------------------------------------------------------------------------------- your own data

class UserImages(Dataset):
    """A split from a dataset factory: any map-style Dataset whose items are (CxHxW float tensor, class index).

    Adds what the sweep needs of a split: `labels` (a tensor, for held-out validation and `limit`) and `subset`.
    Items are returned as the user's dataset gives them: augmentation is the dataset's own (its transforms).
    """

    def __init__(self, data: Dataset, labels: Tensor | None = None, field: str = "dataset.factory"):
        self.data = data
        self.labels = labels if labels is not None else _labels_of(data, field)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.data[i]
        return x, int(y)

    def subset(self, idx: Tensor) -> UserImages:
        return UserImages(torch.utils.data.Subset(self.data, idx.tolist()), self.labels[idx])


def _labels_of(data: Dataset, field: str) -> Tensor:
    """Class indices of every item: torchvision's `targets` / a `labels` attribute, else one pass over the items."""
    try:
        n = len(data)
    except TypeError:
        raise DataError(f"{field}: a split is a {type(data).__name__} without len(); return a map-style "
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
    load = resolve_factory(factory, field, DataError)
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
    source = "train"
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
        train, val = train.subset(kept), train.subset(held)
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
    name = result.get("name") or factory
    return DataSplits(str(name), int(num_classes), int(result.get("in_channels") or channels), int(image_size),
                      train, val, test, val_source=source)


def load_dataset(name: str | None, root: str | None = None, download: bool = False, val_fraction: float = 0.1,
                 seed: int = 0, image_size: int | None = None, limit: int | None = None,
                 test_limit: int | None = None, stats: tuple | None = None, *,
                 factory: str | None = None, kwargs: dict | None = None, official: DataSplits | None = None,
                 val_from_test: bool = False) -> DataSplits:
    """Load a registered dataset's train/val/test splits, or your own through `factory`.

    root defaults to $SWEEP_DATA, then ./data; nothing is downloaded unless `download`. image_size resizes the
    model input (e.g. digits 8 -> 32, or 224 for ImageNet models). limit keeps at most `limit` examples of the
    official training split (validation is carved from those, val_fraction of them); test_limit cuts the test
    split. Both are drawn per class, deterministic in seed. stats (mean, std) replaces the dataset's own
    normalisation, for weights that were trained with another one.

    factory="my_pkg.data:load" imports `load` and calls `load(**kwargs)` (plus `root=` when a root is given). It
    returns a DataSplits, or a dict {"train", "val", "test"} of map-style torch Datasets (val may be missing or
    None: val_fraction of train is then held out), or a tuple (train, val, test) / (train, test). Items are
    (CxHxW float tensor, int class); num_classes (else len(train.classes) or the largest label + 1), in_channels and
    image_size (else from the first train item, which must be square) may be given as dict keys. image_size,
    download and stats do not apply: the factory's own transforms decide the input.

    official: the splits `load_official(name, root, download, image_size)` returned (perhaps in another process,
    through sweep.worker.shared_data), to carve this seed's splits out of without loading them again.

    val_from_test: the network starts from weights trained on this dataset's training images (sweep.zoo.models.
    weights_trained_on), so validation held out of train would be images it memorised. Validation is then
    val_fraction of the test split instead (per class, the same images for every seed), disjoint from the images left
    for test, which shrinks by as many; train stays whole and `limit` cuts only train. `val_source` says which.
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
        else:
            splits = _with_validation(official, val_fraction, seed)
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


# ---------------------------------------------------------------------------------------------------- batches

def _batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


class _TensorBatches:
    """Batches of a TensorImages split: indexed, augmented and normalised on the device."""

    def __init__(self, data: TensorImages, batch_size: int, train: bool, device: torch.device, seed: int,
                 augment: bool):
        self.data, self.batch_size, self.train, self.device = data, batch_size, train, device
        self.seed, self.augment, self.epoch = seed, augment, 0
        # Training drops a last partial batch (when there is a full one): equal steps, and BatchNorm never sees 1.
        self.drop_last = train and len(data) >= batch_size
        small = data.base.numel() * data.base.element_size() <= _DEVICE_BYTES
        self.store = device if small else torch.device("cpu")

    def __len__(self) -> int:
        return _batch_count(len(self.data), self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """The next pass is this epoch: its shuffle and augmentation depend on (seed, epoch) alone."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels, rows = self.data.placed(self.store)
        epoch_seed = self.seed * 100_003 + self.epoch
        self.epoch += 1
        n = len(self.data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)) if self.train \
            else torch.arange(n)
        order = order.to(self.store)
        augment = torch.Generator(device=self.device).manual_seed(epoch_seed) if self.train and self.augment else None
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            x = images[idx if rows is None else rows[idx]].to(self.device, non_blocking=True)
            yield self.data.prepare(x, augment), labels[idx].to(self.device, non_blocking=True)


class _LoaderBatches:
    """Batches of any other Dataset through a DataLoader; FileImages augment in its workers."""

    def __init__(self, data: Dataset, batch_size: int, train: bool, device: torch.device, seed: int,
                 augment: bool):
        if isinstance(data, FileImages):
            data = data.with_augment(train and augment)
        workers = min(_MAX_WORKERS, os.cpu_count() or 1)
        self.device, self.seed = device, seed
        drop_last = train and len(data) >= batch_size  # as in _TensorBatches
        # Workers are not persistent: each pass seeds its workers' augmentation from the generator, so a pass is
        # fully determined by (seed, epoch) once set_epoch has been called.
        self.loader = DataLoader(data, batch_size=batch_size, shuffle=train, drop_last=drop_last,
                                 num_workers=workers, pin_memory=device.type == "cuda",
                                 generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """The next pass is this epoch: its shuffle and augmentation depend on (seed, epoch) alone."""
        self.loader.generator.manual_seed(self.seed * 100_003 + epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def batches(data: Dataset, batch_size: int, train: bool, device: torch.device | str = "cpu", seed: int = 0,
            augment: bool = True) -> Iterable[tuple[Tensor, Tensor]]:
    """Re-iterable batches of a split: each `for` is one epoch; len() is the number of batches per epoch.

    train: reshuffled every epoch (deterministic in seed and epoch), augmented unless augment=False, last partial
    batch dropped. Otherwise: fixed order, no augmentation, every example once.
    """
    if batch_size < 1:
        raise DataError(f"batch_size: {batch_size} is less than 1; use a positive batch size")
    device = torch.device(device)
    kind = _TensorBatches if isinstance(data, TensorImages) else _LoaderBatches
    return kind(data, batch_size, train, device, seed, augment)
