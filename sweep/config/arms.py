"""Trials that compute the same thing are one trial: the spec lists each once, and a trial started in another form
(a random search draws them) takes the canonical one first, so its config hash finds the copy's run. Which trials
those are, and why: docs/design.md, "The config layer"."""

import copy
import json

from sweep.config.schema import PruneConfig

CONTROL = "control"
NO_CRITERION = "none"  # the strategy of a trial whose result no criterion decides


def canonical(config: dict) -> dict:
    """The trial dict with what its arm never reads fixed to one value (a new dict; `config` is untouched)."""
    prune = config.get("prune", {})
    local = prune.get("scope") == "local" and prune.get("target") == "channels"
    if not (prune.get("arm") == CONTROL or (prune.get("arm") == "scratch" and local)):  # the same for every strategy
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
