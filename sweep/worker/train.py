"""Train and evaluate loops: SGD/AdamW, warm-up + cosine per step, label smoothing, bf16 on GPU. No Ray, no MLflow."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from sweep.config.schema import TrainConfig  # the `finetune` section (`base`: a subclass with other defaults)


def seed_everything(seed: int) -> None:
    """Seed every RNG a run touches: Python, NumPy, torch on CPU and every GPU (DataLoader shuffling included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def pick_device(name: str = "auto") -> torch.device:
    """Resolve "auto" to cuda when available, else cpu; an explicit cuda device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available; use device 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def prepare_model(model: nn.Module, device: torch.device | str, cfg: TrainConfig) -> nn.Module:
    device = torch.device(device)
    model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine to 0 at `total` steps (or 1 throughout: constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> tuple[Optimizer, LRScheduler]:
    # Decaying BN scales and biases only shrinks them toward a worse optimum: decay matrices and kernels only.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": ps, "weight_decay": wd, "name": name} for name, ps, wd in (
        ("decay", [p for p in params if p.ndim > 1], cfg.weight_decay),
        ("no_decay", [p for p in params if p.ndim <= 1], 0.0)) if ps]
    if cfg.optimizer == "sgd":
        optimizer: Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total, cfg.lr_schedule))
    return optimizer, scheduler


def _to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    layout = torch.channels_last if channels_last and x.ndim == 4 else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)


def train_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], optimizer: Optimizer,
                scheduler: LRScheduler, cfg: TrainConfig, device: torch.device | str) -> float:
    """One pass over `batches`, one optimizer and scheduler step per batch; returns the mean per-sample loss."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    model.train()
    # Summed on the device: one GPU sync per epoch, not per batch.
    loss_sum = torch.zeros((), device=device)
    seen = 0
    for x, y in batches:
        x, y = _to_device(x, y, device, on_gpu and cfg.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu and cfg.amp):
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().float() * len(y)
        seen += len(y)
    if seen == 0:
        raise ValueError("train_epoch got no batches: the training set is empty or smaller than one batch with "
                         "drop_last")
    return loss_sum.item() / seen


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str,
             num_classes: int | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy (plus top-5 when there are more than 10 classes), in fp32."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # [top-1 hits, top-5 hits, summed loss], kept on the device: one GPU sync per evaluation, not per batch.
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    seen = 0
    classes = num_classes
    try:
        for x, y in batches:
            x, y = _to_device(x, y, device, channels_last=False)
            logits = model(x).float()
            classes = classes or logits.shape[1]
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), F.cross_entropy(logits, y, reduction="sum")])
            seen += len(y)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluate got no batches: the evaluation set is empty")
    correct1, correct5, loss_sum = (sums / seen).tolist()
    metrics = {"accuracy": correct1, "loss": loss_sum}
    if classes is not None and classes > 10:
        metrics["top5"] = correct5
    return metrics


def fit(model: nn.Module, train_batches: Iterable[tuple[Tensor, Tensor]], cfg: TrainConfig,
        device: torch.device | str) -> list[float]:
    """cfg.epochs epochs with one schedule across them (the shared base's training); each epoch's mean loss."""
    prepare_model(model, device, cfg)
    optimizer, scheduler = make_optimizer(model, cfg, len(train_batches))
    return [train_epoch(model, train_batches, optimizer, scheduler, cfg, device) for _ in range(cfg.epochs)]
