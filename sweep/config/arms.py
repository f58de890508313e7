"""Trials that compute the same thing are one trial: the spec lists them once and a trial's identity says so.

    canonical(config)   # the trial dict with the settings its arm never reads set to one value

- The `control` arm is the base fine-tuned with the fine-tune recipe and nothing pruned: every strategy and ratio
  gives the same trial, so it is recorded as strategy `none`, ratio 0 (its FLOPs reduction is 0) and the other
  pruning settings at their defaults.
- The `scratch` arm re-initialises the pruned architecture. Under local scope with a channel target every criterion
  removes the same number of channels from each layer, so every strategy yields one architecture (and one initial
  state): the scratch trial of a ratio is one trial, recorded as strategy `none`, not one per criterion (that would
  be an A/A comparison of one network with itself).

Spec expansion (sweep.config.spec) lists each canonical config once, so no compute goes to copies; a trial started
with any other form (a random search draws them) takes the canonical one first, so its config hash finds the copy's
run and is skipped.
"""

from __future__ import annotations

import copy
import json

from sweep.config.schema import PruneConfig

CONTROL = "control"
NO_CRITERION = "none"  # the strategy of a trial whose result no criterion decides


def criterion_free(prune: dict) -> bool:
    """Whether the trial's result is the same for every strategy."""
    if prune.get("arm") == CONTROL:
        return True
    return prune.get("arm") == "scratch" and prune.get("scope") == "local" and prune.get("target") == "channels"


def canonical(config: dict) -> dict:
    """The trial dict with what its arm never reads fixed to one value (a new dict; `config` is untouched)."""
    prune = config.get("prune", {})
    if not criterion_free(prune):
        return config
    out = copy.deepcopy(config)
    if prune["arm"] == CONTROL:
        out["prune"] = {**PruneConfig().model_dump(), "arm": CONTROL, "strategy": NO_CRITERION, "ratio": 0.0}
    else:
        # the scratch arm under local scope: only the criterion goes; ratio, ratios, ignore, min_channels and
        # round_to still shape the architecture, and calibration batches are read by no one
        out["prune"].update(strategy=NO_CRITERION, calibration_batches=PruneConfig().calibration_batches,
                            oracle_batches=PruneConfig().oracle_batches)
    return out


def unique(configs: list[dict]) -> list[dict]:
    """Canonical configs, each once, in first-seen order."""
    seen: dict[str, dict] = {}
    for config in map(canonical, configs):
        seen.setdefault(json.dumps(config, sort_keys=True, default=str), config)
    return list(seen.values())
