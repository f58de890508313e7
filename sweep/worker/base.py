"""The shared base network: trained (or fine-tuned from source weights) once per `base_key`, read by every trial
on every node, its accuracy and cost measured once and stored beside the weights. A folder elects the trainer with a
file lock, object storage with a claim in the tracking store (docs/design.md, "Sharing the base network").
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from sweep.config.schema import ModelConfig, TrialConfig
from sweep.store import claims, objects, tracking
from sweep.store.store import Store
from sweep.worker.identity import identity
from sweep.worker.measure import count_flops, count_params
from sweep.worker.train import evaluate, fit, seed_everything
from sweep.zoo.batching import batches
from sweep.zoo.data import DataSplits
from sweep.zoo.models import build_model

BASE_KEYS = ("model", "dataset", "base", "seed")
BASE_FILE = "base.pt"
BASES_EXPERIMENT = "{}.bases"  # the sweep's experiment name -> where the claims on its bases live (one run per base)
# How long a trial waits for another process training the base it needs. The trainer renews its claim, so a dead
# trainer is noticed within a lease and the wait ends there; a live one may take as long as base training takes.
BASE_WAIT_S = 24 * 3600.0


def _base_identity(cfg: TrialConfig) -> dict:
    known = identity(cfg)
    return {k: known[k] for k in BASE_KEYS}  # in this order: the base checkpoint records it as written


def base_key(cfg: TrialConfig, val_source: str = "train") -> str:
    """What the base network depends on, and nothing else. A validation carved from test (val_source) changes what
    the base trains on and what base_val_accuracy measured: such a base has a key of its own (others keep theirs)."""
    key = _base_identity(cfg)
    if val_source != "train":
        key["val_source"] = val_source
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_model(model: ModelConfig, num_classes: int, in_channels: int, source_weights: bool = True) -> nn.Module:
    """The trial's architecture headed for the dataset's classes, with its source weights or random ones."""
    return build_model(model.name, num_classes, model.weights if source_weights else None, in_channels,
                       factory=model.factory, kwargs=model.kwargs)


def example_input(splits: DataSplits, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)


def _train_base(cfg: TrialConfig, splits: DataSplits, device: torch.device) -> bytes:
    """Train (or fine-tune) and measure the base; the checkpoint's bytes."""
    seed_everything(cfg.seed)
    model = new_model(cfg.model, splits.num_classes, splits.in_channels).to(device)
    train = cfg.base
    start = time.perf_counter()
    if train.epochs > 0:
        fit(model, batches(splits.train, train.batch_size, True, device, seed=cfg.seed), train, device)
    train_time = time.perf_counter() - start
    val, test = (evaluate(model, batches(split, train.batch_size, False, device), device, splits.num_classes)
                 for split in (splits.val, splits.test))
    flops = count_flops(model, example_input(splits, device))
    info = {"base_train_time_s": train_time, "base_val_accuracy": val["accuracy"],
            "base_test_accuracy": test["accuracy"], "base_flops": float(flops), "base_macs": float(flops // 2),
            "base_params": float(count_params(model))}
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "info": info,
                "config": json.dumps(_base_identity(cfg), default=str)}, buffer)
    return buffer.getvalue()


def ensure_base(cfg: TrialConfig, cache_dir: str | Path, splits: DataSplits, device: torch.device,
                tracking_uri: str | None = None, experiment: str | None = None,
                lease_s: float = claims.DEFAULT_LEASE_S) -> tuple[str, bool]:
    """Train the base once per key; returns (its checkpoint's location, whether it was already there). On object
    storage the claim on the key lives in the tracking store (tracking_uri, experiment)."""
    location = objects.join(str(cache_dir), base_key(cfg, splits.val_source), BASE_FILE)
    if objects.is_uri(location):
        if tracking_uri is None or experiment is None:
            raise ValueError("a base on object storage needs tracking_uri and experiment: the claim lives there")
        return location, _shared_base(cfg, location, splits, device, tracking_uri, experiment, lease_s)
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):  # trials that start together wait for the first one's base
        if path.exists():
            return str(path), True
        objects.write_bytes(str(path), _train_base(cfg, splits, device))  # readers never see a half-written base
        return str(path), False


def _shared_base(cfg: TrialConfig, location: str, splits: DataSplits, device: torch.device, uri: str, experiment: str,
                 lease_s: float) -> bool:
    """Whether the base at location was there already; trains and uploads it if this process wins its claim."""
    if objects.read_bytes(location) is not None:  # the common case once a base exists: one request, no claim
        return True
    key, bases = base_key(cfg, splits.val_source), BASES_EXPERIMENT.format(experiment)
    store = Store(uri)
    experiment_id = tracking.get_or_create_experiment(store, bases)
    create = claims.child_run_creator(store, experiment_id, None, run_name=f"base {key}",
                                      tags={"sweep.role": "base", "base_key": key, "base_location": location})
    claim = claims.claim_trial(store, experiment_id, f"base-{key}", claims.new_owner_id("base"), create,
                               lease_s=lease_s, wait_s=BASE_WAIT_S)
    if claim.kind == "held":
        raise RuntimeError(f"base {key}: still being trained by run {claim.run_id} (experiment {bases}) after "
                           f"{BASE_WAIT_S:.0f} s")
    if claim.kind == "finished":
        if objects.read_bytes(location) is None:
            raise RuntimeError(f"base {key}: run {claim.run_id} of experiment {bases} finished it but {location} is "
                               "gone; delete that run to have the base trained again")
        return True
    try:
        # A trainer that died between its upload and its FINISHED status left the object: use it.
        cached = objects.read_bytes(location) is not None
        if not cached:
            data = _train_base(cfg, splits, device)
            claim.lease.check()  # our lease lapsed while training (a paused node): the new holder uploads, not us
            objects.write_bytes(location, data)  # one PUT: a reader sees the whole object or none
    except BaseException:
        claim.lease.release("FAILED")
        raise
    claim.lease.release("FINISHED")  # after the upload: a FINISHED claim always has its object
    return cached


def load_base(model: ModelConfig, path: str | Path, splits: DataSplits) -> tuple[nn.Module, dict]:
    """The base network (on the CPU) and what was measured of it when it was trained (path: a file or an object)."""
    data = objects.read_bytes(str(path))
    if data is None:
        raise FileNotFoundError(f"base network {path}: not there")
    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    # no source weights: the state_dict replaces every value anyway
    network = new_model(model, splits.num_classes, splits.in_channels, source_weights=False)
    network.load_state_dict(saved["state_dict"])
    return network, saved["info"]
