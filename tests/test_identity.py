"""A trial's identity stays byte for byte what it was: the config hash (how a launch finds a config's finished run),
the base network's key (the cache folder a base lives in) and every MLflow param, for the same YAML. Stores written
by earlier releases must still resume and skip their finished configs.

The literal values below were computed by the code as it stood before the trial worker took a typed config
(run_trial hashed `canonical(config)`, base.py keyed on the raw dict); the reference functions here are that code's
formulas, checked against the worker's path (typed_trial -> identity, base_key) on every config of each spec.
"""

import copy
import hashlib
import json
import sys
from pathlib import Path

from sweep.config.arms import canonical
from sweep.config.spec import load_spec, parse_spec
from sweep.store import tracking
from sweep.worker.base import _base_identity, base_key
from sweep.worker.identity import identity, typed_trial

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"

ARMS = """
name: arms
dataset: {name: digits, limit: 300}
model: {name: small_cnn}
base: {epochs: 2, lr: 0.05}
finetune: {epochs: 1, lr: 0.01, batch_size: 32}
prune: {scratch_epochs: 3, min_channels: 0.25, round_to: 2}
space:
  strategy: {grid: [random, taylor]}
  ratio: {grid: [0.5, 0.75]}
  scope: {grid: [local, global]}
  arm: {grid: [finetune, scratch, control]}
"""

PLUGIN_MODULE = "identity_plugin_nets"  # a fixed name: the factory path is part of the hash
PLUGIN = """
from torch import nn


def build(num_classes, in_channels=1, width=4):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def load(n=40):
    raise NotImplementedError  # only its import path is read here
"""
PLUGIN_SPEC = f"""
name: plug
model: {{factory: "{PLUGIN_MODULE}:build", kwargs: {{width: 6}}}}
dataset: {{factory: "{PLUGIN_MODULE}:load", kwargs: {{n: 48}}}}
finetune: {{epochs: 1}}
space:
  strategy: {{grid: [l1, fpgm]}}
  model: {{grid: [{{factory: "{PLUGIN_MODULE}:build", kwargs: {{width: 8}}}}, {{name: small_cnn, kwargs: {{}}}}]}}
"""


def _drawn(trial: dict) -> list[dict]:
    """Configs as a random or optuna search hands them (Tune fills the leaves with plain Python values), among them
    a control and a local scratch trial drawn with a criterion, which must be known by their canonical form."""
    out = []
    for prune in ({"ratio": 0.6180339887498949, "strategy": "taylor"},
                  {"arm": "control", "strategy": "l1", "ratio": 0.3},
                  {"arm": "scratch", "strategy": "fpgm", "ratio": 0.4, "scope": "local", "target": "channels"}):
        config = copy.deepcopy(trial)
        config["prune"].update(prune)
        config["seed"], config["finetune"]["lr"] = 7, 0.0031622776601683794
        out.append(config)
    return out


# --- the formulas in use when these values were recorded ---------------------------------------------------------

def _reference_base_key(config: dict, val_source: str) -> str:
    key = {k: config[k] for k in ("model", "dataset", "base", "seed")}
    if val_source != "train":
        key["val_source"] = val_source
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reference(raw: dict) -> list:
    known = canonical(raw)
    return [json.dumps(known, sort_keys=True, separators=(",", ":"), default=str), tracking.config_hash(known),
            _reference_base_key(known, "train"), _reference_base_key(known, "test"), tracking.flat_params(known)]


# --- the worker's path -------------------------------------------------------------------------------------------

def _worker(raw: dict) -> list:
    cfg = typed_trial(raw)
    known = identity(cfg)
    return [json.dumps(known, sort_keys=True, separators=(",", ":"), default=str), tracking.config_hash(known),
            base_key(cfg, "train"), base_key(cfg, "test"), tracking.flat_params(known)]


def _digest(rows: list) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def _check(configs: list[dict]) -> list:
    rows = [_worker(raw) for raw in configs]
    assert rows == [_reference(raw) for raw in configs]
    for raw in configs:  # what a base checkpoint records of the config, as written (not sorted)
        known = canonical(raw)
        assert json.dumps(_base_identity(typed_trial(raw)), default=str) == \
            json.dumps({k: known[k] for k in ("model", "dataset", "base", "seed")}, default=str)
    return rows


def test_quickstart_keeps_its_hashes():
    spec = load_spec(SPACES / "quickstart.yaml")
    rows = _check(spec.grid_configs() + _drawn(spec.trial))
    assert len(rows) == 33
    assert rows[0][1:4] == ["da168d4121c8a345", "572b3a55e73fd2e6", "a7c142e908d807ae"]
    assert _digest(rows) == "8662bbee3076871a"


def test_arms_keep_their_hashes():
    """The control and scratch arms: one canonical trial for the configs that compute the same thing."""
    spec = parse_spec(ARMS)
    rows = _check(spec.grid_configs() + _drawn(spec.trial))
    assert _digest(rows) == "1ef5e0d1778663e4"


def test_a_plugin_spec_keeps_its_hashes(tmp_path, monkeypatch):
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        spec = parse_spec(PLUGIN_SPEC)
    finally:
        sys.modules.pop(PLUGIN_MODULE, None)
    rows = _check(spec.grid_configs())
    assert _digest(rows) == "4eeaa9fccc11b713"


def test_the_criteria_study_keeps_its_hashes(tmp_path, monkeypatch):
    """Its weights and data are resolved to absolute paths, which are in the hash: the literal covers everything
    else, the reference every byte."""
    (tmp_path / "data" / "weights").mkdir(parents=True)
    (tmp_path / "data" / "weights" / "resnet20-12fca82f.th").write_bytes(b"")
    (tmp_path / "data" / "cifar10_jpg").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = load_spec(SPACES / "cifar10_resnet20_criteria.yaml")
    drawn = [c for c in _drawn(spec.trial) if c["prune"]["arm"] != "scratch"]  # its base has no epochs to copy
    # the first ten seeds: the configs a store recorded before seeds 10-12 were added to the spec (RESULTS.md)
    rows = _check([c for c in spec.grid_configs() if c["seed"] < 10] + drawn)
    assert len(rows) == 172  # 160 fine-tuned, a control trial per seed, 2 drawn
    root = str(tmp_path.resolve())
    assert _digest([[row[0].replace(root, "<root>"), json.dumps(row[4]).replace(root, "<root>")] for row in rows]) \
        == "e3f81061ddd5819b"


def test_the_arms_study_keeps_its_hashes():
    rows = _check(load_spec(SPACES / "digits_arms.yaml").grid_configs())
    assert len(rows) == 24  # 18 fine-tuned, and one scratch trial per ratio and seed for the three criteria
    assert _digest(rows) == "86815df0265607a6"
