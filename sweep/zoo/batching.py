"""`batches`: iterate a split, one `for` an epoch. A TensorImages split moves to the device once and is augmented,
resized and normalised there with batched tensor ops: no DataLoader, no workers, no per-image Python. Any other split
goes through a DataLoader with workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sweep.zoo.data import DataError
from sweep.zoo.images import FileImages, TensorImages

_DEVICE_BYTES = 200 * 2**20  # a tensor split up to this size lives on the device; a larger one stays in host memory
_MAX_WORKERS = 8


class _Batches:
    def __init__(self, data: Dataset, batch_size: int, train: bool, device: torch.device, seed: int,
                 augment: bool):
        self.data, self.batch_size, self.train, self.device = data, batch_size, train, device
        self.seed, self.augment, self.epoch, self.loader = seed, augment, 0, None
        # Training drops a last partial batch (when there is a full one): equal steps, and BatchNorm never sees 1.
        self.drop_last = train and len(data) >= batch_size
        if isinstance(data, TensorImages):
            small = data.base.numel() * data.base.element_size() <= _DEVICE_BYTES
            self.store = device if small else torch.device("cpu")
        else:
            # Workers are not persistent: each pass seeds its workers' augmentation from the generator, so a pass is
            # fully determined by (seed, epoch) once set_epoch has been called.
            self.loader = DataLoader(data.with_augment(train and augment) if isinstance(data, FileImages) else data,
                                     batch_size, shuffle=train, drop_last=self.drop_last,
                                     num_workers=min(_MAX_WORKERS, os.cpu_count() or 1),
                                     pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The next pass is this epoch: its shuffle and augmentation depend on (seed, epoch) alone."""
        self.epoch = epoch
        if self.loader is not None:
            self.loader.generator.manual_seed(self.seed * 100_003 + epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.loader is not None:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        images, labels, rows = self.data.placed(self.store)
        epoch_seed = self.seed * 100_003 + self.epoch
        self.epoch += 1
        n = len(self.data)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)) if self.train
                 else torch.arange(n)).to(self.store)
        augment = torch.Generator(device=self.device).manual_seed(epoch_seed) if self.train and self.augment else None
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            x = images[idx if rows is None else rows[idx]].to(self.device, non_blocking=True)
            yield self.data.prepare(x, augment), labels[idx].to(self.device, non_blocking=True)


def batches(data: Dataset, batch_size: int, train: bool, device: torch.device | str = "cpu", seed: int = 0,
            augment: bool = True) -> Iterable[tuple[Tensor, Tensor]]:
    """Re-iterable batches of a split: each `for` is one epoch; len() is the number of batches per epoch.

    train: reshuffled every epoch (deterministic in seed and epoch), augmented unless augment=False, last partial
    batch dropped. Otherwise: fixed order, no augmentation, every example once.
    """
    if batch_size < 1:
        raise DataError(f"batch_size: {batch_size} is less than 1; use a positive batch size")
    return _Batches(data, batch_size, train, torch.device(device), seed, augment)
