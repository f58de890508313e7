"""The pruner on one untrained model of every convolutional timm family (bench/timm_coverage.py's list): each is
pruned to a model equal to the zeroed original, or refused in one line naming the module; at least 90 % pruned.
Needs timm (`pip install -e ".[timm]"`); nothing is downloaded."""

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

from sweep.pruning import PruningError, prune, relative_error

timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[timm]'")

_BENCH = Path(__file__).parents[1] / "bench" / "timm_coverage.py"
sys.path.insert(0, str(_BENCH.parent))  # as when the bench runs as a script: it imports bench/_pruners.py
_spec = importlib.util.spec_from_file_location("timm_coverage", _BENCH)
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)


@pytest.mark.slow
def test_every_convolutional_timm_family_is_pruned_equivalent_or_refused_in_one_line(one_thread):
    logging.disable(logging.WARNING)
    try:
        results = {}
        for family, name in coverage.FAMILIES.items():
            model, x = coverage.build(name)
            try:
                result = prune(model, x, strategy="l1", ratio=0.5)
            except PruningError as exc:
                assert "\n" not in str(exc) and "module '" in str(exc), (family, str(exc))
                results[family] = "refused"
                continue
            assert result.plan.removed, f"{family} ({name}): nothing was pruned"
            err = relative_error(model, result.model, result.plan, x)
            assert err < 1e-6, f"{family} ({name}): relative error {err}"
            results[family] = "equivalent"
    finally:
        logging.disable(logging.NOTSET)
    equivalent = sum(status == "equivalent" for status in results.values())
    refused = sorted(f for f, status in results.items() if status == "refused")
    assert equivalent >= 0.9 * len(results), f"{equivalent} of {len(results)} equivalent; refused: {refused}"
