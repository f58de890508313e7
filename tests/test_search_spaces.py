"""The shipped search spaces: the full ones validate, their smoke forms run end to end."""

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from sweep.config.spec import load_spec
from sweep.driver.launch import run_sweep
from sweep.report import summary as report
from sweep.store import tracking
from sweep.zoo.models import build_model

pytestmark = pytest.mark.e2e  # starts Ray and runs real sweeps (`-m 'not e2e'` leaves them out)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FULL = sorted((ROOT / "search_spaces").glob("*.yaml"))
SMOKE = sorted((ROOT / "search_spaces" / "smoke").glob("*.yaml"))


def test_every_paper_space_has_a_smoke_form():
    papers = {"alexnet_levels", "transfer_vgg16_flowers", "cifar10_resnet56", "models_training_time", "digits_arms",
              "cifar10_resnet20_pruned", "cifar10_resnet20", "cifar10_resnet20_scratch", "mobilenet_v2_hymenoptera",
              "cifar10_resnet56_jpeg", "training_time_cpu"}
    assert papers <= {p.stem for p in FULL}
    assert papers == {p.stem for p in SMOKE}


@pytest.mark.parametrize("path", FULL, ids=[p.stem for p in FULL])
def test_full_spaces_validate(path, tmp_path, monkeypatch):
    """Relative data paths resolve against the working directory, as for a user with ./data."""
    (tmp_path / "data" / "weights").mkdir(parents=True)
    for name, file in (("resnet20", "resnet20-12fca82f.th"), ("resnet56", "resnet56-4bfd9763.th")):
        weights = SHARED / "weights" / file
        if weights.exists():
            os.symlink(weights, tmp_path / "data" / "weights" / file)
        else:  # a fresh clone: a real checkpoint of our own stands in for the published one
            torch.save(build_model(name, 10).state_dict(), tmp_path / "data" / "weights" / file)
    # ImageNet MobileNet-V2 comes from a PyPI wheel, never from ../shared: a checkpoint of the same shape stands in
    mobilenet = tmp_path / "data" / "weights" / "mobilenet_v2-b0353104.pth"
    torch.save(build_model("mobilenet_v2", 1000).state_dict(), mobilenet)
    # the folders the image-folder spaces read; validation only checks that they exist
    for folder in ("hymenoptera/train", "hymenoptera/val", "hymenoptera_data/train", "hymenoptera_data/val",
                   "cifar10_jpg/train", "cifar10_jpg/test"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(path)
    assert len(spec.grid_configs()) >= 2


# Smoke forms whose models, data and features each have default-suite tests of their own (an architecture grid in
# the training_time_cpu form, iterative FLOPs targets in test_pruning, the JPEG folder in test_data, the scratch arm
# in the digits_arms form): in `-m slow` to keep the default suite under 10 minutes; the full forms all validate.
SLOW_SMOKE = {"transfer_vgg16_flowers", "alexnet_levels", "models_training_time",
              "cifar10_resnet56_jpeg", "cifar10_resnet20_pruned", "cifar10_resnet20_scratch"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_SMOKE else p
                                  for p in SMOKE], ids=[p.stem for p in SMOKE])
def test_smoke_forms_run(path, tmp_path, local_ray, sqlite_uri):
    spec = load_spec(path)
    uri = sqlite_uri  # a copy of the session's empty store
    outcome = run_sweep(spec, tracking_uri=uri, storage=str(tmp_path / "store"), verbose=0)
    assert outcome.failed == 0 and outcome.ran == len(spec.grid_configs())
    runs = tracking.child_runs(MlflowClient(uri), spec.name, "attributes.status = 'FINISHED'")
    assert len(runs) == len(spec.grid_configs())
    for run in runs:  # a control that removes nothing (Li et al.'s unpruned arm) has a reduction of 0
        m = run.data.metrics
        assert 0 <= m["flops_reduction"] < 1 and 0 <= m["test_accuracy"] <= 1
        # a scratch trial of no criterion (local scope) re-initialises its network: no accuracy right after pruning
        pruned = set() if run.data.params["strategy"] == "none" else {"pruned_val_accuracy", "pruned_test_accuracy"}
        assert {"val_accuracy", *pruned, "base_val_accuracy",
                "base_test_accuracy", "macs", "channels_removed", "params_reduction", "latency_ms"} <= set(m)
    assert any(run.data.metrics["flops_reduction"] > 0 for run in runs)
    if spec.name == "smoke_digits_arms":
        _check_the_report(uri, spec, tmp_path)


def _check_the_report(uri, spec, tmp_path):
    """The published-comparison sweep: 3 groups of 3 seeds (2 strategies fine-tuned; the scratch arm once, as under
    local scope every criterion gives one architecture: strategy none), intervals, a verdict for the fine-tuned."""
    paths = report.write_report(spec.name, uri, out_dir=tmp_path / "reports")
    table = pd.read_csv(paths["summary_csv"])
    assert len(table) == 3 and (table["n"] == 3).all()
    assert set(table["arm"]) == {"finetune", "scratch"} and table["test_accuracy_ci95"].notna().all()
    runs = report.load_runs(spec.name, uri)
    scratch = runs[runs["arm"] == "scratch"]["test_accuracy"]
    row = table[table["arm"] == "scratch"].iloc[0]
    assert row["strategy"] == "none" and row["test_accuracy"] == pytest.approx(scratch.mean())
    assert row["test_accuracy_ci95"] == pytest.approx(report.interval(scratch)[2])
    pairs = pd.read_csv(paths["paired"])
    assert len(pairs) == 1 and (pairs["pairs"] == 3).all() and set(pairs["reference"]) == {"random"}
    assert set(pairs["verdict"]) <= {"better", "worse", "equivalent", "inconclusive"}
    assert "l1 vs random" in paths["summary"].read_text()
