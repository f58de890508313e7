"""The shared base network: trained (or fine-tuned from source weights) once per sweep, read by every trial.

    path, cached = ensure_base(config, cache_dir, splits, device)    # trains under a file lock, or finds it
    model, info = load_base(config, path, splits)                    # info: accuracies, FLOPs, MACs, params, time

The base depends only on (model, dataset, base training, seed): `base_key` hashes exactly those, so trials that
agree there share one file, on every node that mounts the cache folder. Its accuracy and cost are measured once,
with it, and stored beside the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from sweep.worker.measure import count_flops, count_params
from sweep.worker.train import TrainConfig, evaluate, fit, seed_everything
from sweep.zoo.data import DataSplits, batches
from sweep.zoo.models import build_model

BASE_KEYS = ("model", "dataset", "base", "seed")


def base_key(config: dict) -> str:
    """What the base network depends on, and nothing else: trials that agree here share it."""
    key = {k: config[k] for k in BASE_KEYS}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_model(config: dict, num_classes: int, in_channels: int, source_weights: bool = True) -> nn.Module:
    """The trial's architecture headed for the dataset's classes, with its source weights or random ones."""
    model = config["model"]
    weights = model["weights"] if source_weights else None
    return build_model(model.get("name"), num_classes, weights, in_channels, factory=model.get("factory"),
                       kwargs=model.get("kwargs"))


def example_input(splits: DataSplits, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)


def _measure_base(model: nn.Module, splits: DataSplits, device: torch.device, batch_size: int) -> dict:
    val = evaluate(model, batches(splits.val, batch_size, False, device), device, splits.num_classes)
    test = evaluate(model, batches(splits.test, batch_size, False, device), device, splits.num_classes)
    flops = count_flops(model, example_input(splits, device))
    return {"base_val_accuracy": val["accuracy"], "base_test_accuracy": test["accuracy"],
            "base_flops": float(flops), "base_macs": float(flops // 2), "base_params": float(count_params(model))}


def ensure_base(config: dict, cache_dir: str | Path, splits: DataSplits, device: torch.device) -> tuple[Path, bool]:
    """Train the base once per key; returns (checkpoint, whether it was already there)."""
    path = Path(cache_dir) / base_key(config) / "base.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):  # trials that start together wait for the first one's base
        if path.exists():
            return path, True
        seed_everything(config["seed"])
        model = new_model(config, splits.num_classes, splits.in_channels).to(device)
        cfg = TrainConfig.from_dict(config["base"])
        start = time.perf_counter()
        if cfg.epochs > 0:
            fit(model, batches(splits.train, cfg.batch_size, True, device, seed=config["seed"]), cfg, device)
        info = {"base_train_time_s": time.perf_counter() - start,
                **_measure_base(model, splits, device, cfg.batch_size)}
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "info": info,
                    "config": json.dumps({k: config[k] for k in BASE_KEYS}, default=str)}, tmp)
        os.replace(tmp, path)  # readers never see a half-written base
        return path, False


def load_base(config: dict, path: Path, splits: DataSplits) -> tuple[nn.Module, dict]:
    """The base network (on the CPU) and what was measured of it when it was trained."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    # no source weights: the state_dict replaces every value anyway
    model = new_model(config, splits.num_classes, splits.in_channels, source_weights=False)
    model.load_state_dict(saved["state_dict"])
    return model, saved["info"]
