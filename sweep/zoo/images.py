"""How a split holds its images (TensorImages, FileImages), and reading image files. Indexing a split gives the
evaluation view (resized, normalised, never augmented)."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # photos: matches ImageNet-pretrained weights
_DECODE_MAX_SIDE = 64  # small photos (CIFAR as JPEG files) are decoded once into uint8 tensors


class TensorImages(Dataset):
    """A split held as one uint8 tensor N x C x H x W at native resolution (digits, MNIST, CIFAR, small photos), with
    int64 labels, augmented, resized and normalised on the device in whole batches (sweep.zoo.batching).

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
        view = copy.copy(self)
        view.mean, view.std = stats
        return view

    def prepare(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 batch -> float batch at image_size, normalised; augmented when a generator is given."""
        x = x.float().div_(255)
        if generator is not None:
            x = _random_shift(x, self.pad, generator)
            if self.flip:
                flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
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


class FileImages(Dataset):
    """Image files decoded per item, through a DataLoader; `train_tf` applies only to the view `with_augment(True)`."""

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

    def normalised(self, stats: tuple) -> FileImages:  # the Normalize step of both transforms replaced
        def swap(tf: Callable) -> Callable:
            return T.Compose([T.Normalize(*stats) if isinstance(s, T.Normalize) else s for s in tf.transforms])

        view = copy.copy(self)
        view.train_tf, view.eval_tf = swap(self.train_tf), swap(self.eval_tf)
        return view

    def with_augment(self, augment: bool) -> FileImages:
        view = copy.copy(self)
        view.augment = augment
        return view


def photo_transforms(size: int) -> tuple[Callable, Callable]:
    """Train and eval transforms for photographs, normalised as ImageNet."""
    finish = [T.ToTensor(), T.Normalize(*IMAGENET_STATS)]
    if size <= 64:
        # Small inputs (CIFAR as JPEG files): a RandomResizedCrop would throw away most of a 32-pixel image, so
        # augment as for CIFAR instead, with a shift of an eighth of the side.
        fit = [T.Resize(size), T.CenterCrop(size)]
        return (T.Compose([*fit, T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), *finish]),
                T.Compose([*fit, *finish]))
    return (T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *finish]),
            T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *finish]))


def unreadable(path: str) -> str | None:
    """Why an image file cannot be used, or None: missing, empty, or a header PIL cannot identify or verify. Reads
    the header only (about 0.1 ms a file): a file cut short after it still fails when decoded. Remembered while the
    file's size and mtime stay the same."""
    try:
        stat = os.stat(path)
    except OSError as error:
        return f"cannot be read ({error.strerror or type(error).__name__})"
    return _verified(path, stat.st_size, stat.st_mtime_ns)


@functools.cache
def _verified(path: str, size: int, mtime_ns: int) -> str | None:
    if size == 0:
        return "is empty"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        return f"is not a readable image ({type(error).__name__}: {' '.join(str(error).split())})"
    return None


def decoded(parts: list[FileImages], size: int) -> list[TensorImages] | None:
    """Splits of small photos, all square and of one side, decoded once into TensorImages; else None.

    Decoding 60,000 CIFAR JPEGs takes seconds, once, where a DataLoader decodes every image again in every epoch;
    the uint8 tensor (184 MB) is what nodes share (sweep.worker.shared_data). Augmentation is that of
    `photo_transforms` for such files: a shift of an eighth of the side, and flips.
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

    # PIL decodes without the GIL: threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        arrays = list(pool.map(pixels, [path for p in parts for path, _ in p.samples], chunksize=256))
    if any(a is None for a in arrays):  # mixed sizes: keep decoding per item, with the file transforms
        return None
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    ends = np.cumsum([len(p) for p in parts]).tolist()
    return [TensorImages(images[end - len(p):end], p.labels, IMAGENET_STATS, size, pad=side // 8, flip=True)
            for p, end in zip(parts, ends)]
