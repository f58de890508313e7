"""A trial's config, typed once where the trial starts (`typed_trial`), and the one plain dict it is known by
(`identity`: hashed, logged as params and tags, keyed on). identity(cfg) is byte for byte the canonical trial dict the
spec lists (SweepSpec.grid_configs), a pydantic dump of the same model, so the driver's and the worker's hashes agree
(tests/test_identity.py pins them literally).
"""

from __future__ import annotations

from sweep.config.arms import canonical
from sweep.config.schema import TrialConfig, trial_config


def typed_trial(config: dict) -> TrialConfig:
    """A resolved trial dict, typed; a control or criterion-free scratch trial drawn with any strategy becomes the
    one trial it computes (sweep.config.arms) first, so it is known by the hash of that one."""
    return trial_config(canonical(config))


def identity(cfg: TrialConfig) -> dict:
    """The plain dict a trial is known by (a new one each call: callers may keep or change it)."""
    return cfg.model_dump()
