"""strategy oracle (sweep.pruning.oracle): each unit's measured loss change, on a trained small CNN (digits) and in
real sweeps (Ray, MLflow sqlite) on digits and on the CIFAR ResNet-20."""

from pathlib import Path

import numpy as np
import pytest
import torch
from analysis_data import CIFAR_JPG, RESNET20, cifar_subset
from mlflow.tracking import MlflowClient

from sweep.analysis import criteria_rank
from sweep.analysis.common import prepare
from sweep.config.spec import load_spec
from sweep.driver.launch import run_sweep
from sweep.pruning import NEEDS_CALIBRATION, STRATEGIES, PruningError, analyse, prune
from sweep.pruning.oracle import mean_loss
from sweep.store import tracking
from sweep.zoo.models import build_model

LAYERS = ("features.0", "features.3", "features.7")  # small_cnn's convs; the classifier is the output


@pytest.fixture(scope="module")
def trained(digits_spec, storage, one_thread):
    """The digits spec's trained base, its graph, and one of its calibration batches from the training split."""
    setup = prepare(load_spec(digits_spec), storage, calibration=True)
    return setup, analyse(setup.model, (setup.example,)), setup.calibration[:1]


def test_oracle_is_registered_and_needs_data(trained):
    setup, _, _ = trained
    assert "oracle" in STRATEGIES and "oracle" in NEEDS_CALIBRATION
    with pytest.raises(PruningError, match="calibration: strategy 'oracle' needs data"):
        prune(setup.model, setup.example, strategy="oracle", ratio=0.5)


def test_oracle_scores_are_what_sweep_criteria_measures(trained):
    """One implementation: the criterion and `sweep criteria`'s oracle give the same loss change per unit, and both
    leave every weight as it was."""
    setup, graph, calibration = trained
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    scores = STRATEGIES["oracle"](setup.model, graph, calibration, torch.Generator())
    base, changes = criteria_rank.oracle(setup.model, graph, range(graph.num_units), calibration)
    assert scores.shape == (graph.num_units,) and np.array_equal(scores.numpy(), changes)
    assert base == pytest.approx(mean_loss(setup.model, calibration))
    assert scores.abs().max() > 1e-4  # removing a filter of a trained network changes its loss
    for key, value in setup.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a one-pass iterator is kept for the units after the first
    again = STRATEGIES["oracle"](setup.model, graph, iter(calibration), torch.Generator())
    assert torch.equal(again, scores)


@pytest.mark.parametrize("layer", LAYERS)
def test_oracle_removes_the_filter_that_costs_least_on_its_calibration_data(trained, layer):
    """The property that makes it an oracle: pruned to one filter fewer, same seed, its loss on the calibration
    batches is the least any criterion reaches, and is the base loss plus the smallest measured change. (Removing
    several filters at once, one-shot, it is greedy: see docs/analyses.md for where that loses.)"""
    setup, graph, calibration = trained
    width = setup.model.get_submodule(layer).out_channels
    losses = {}
    for strategy in STRATEGIES:
        result = prune(setup.model, setup.example, strategy=strategy, ratio=0, ratios={layer: 1 / width},
                       calibration=calibration, seed=0)
        assert len(result.plan.removed[layer]) == 1
        losses[strategy] = mean_loss(result.model.eval(), calibration)
    assert losses["oracle"] <= min(losses.values()) + 1e-6, losses
    unit = graph.layers[LAYERS.index(layer)]
    base, changes = criteria_rank.oracle(setup.model, graph, unit, calibration)
    assert losses["oracle"] == pytest.approx(base + changes.min(), abs=1e-5)


# --- sweeps -----------------------------------------------------------------------------------------------------

# The digits sweep with strategy oracle is tests/test_agreement.py's (oracle against random, two seeds).


def _one_run(uri: str, name: str):
    [run] = tracking.child_runs(MlflowClient(uri), name)
    assert run.info.status == "FINISHED" and run.data.params["strategy"] == "oracle"
    return run


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_oracle_sweep_on_resnet20(local_ray, tmp_path, sqlite_uri):
    """The CIFAR ResNet-20 with its published weights on 100 real CIFAR-10 training images where ../shared/data
    has them; else untrained (base epochs 0) on digits at 32x32: what is tested is that the sweep runs the oracle
    over ResNet-20's residual streams and records its cost."""
    if RESNET20.exists() and CIFAR_JPG.exists():
        root = cifar_subset(tmp_path / "cifar10", train_per_class=10, test_per_class=2)
        model = f"{{name: resnet20, weights: {RESNET20}}}"
        dataset = f"{{name: imagefolder, root: {root}, image_size: 32, val_fraction: 0.5}}"
        channels = 3
    else:
        model, dataset, channels = "{name: resnet20}", "{name: digits, limit: 100, image_size: 32}", 1
    path = tmp_path / "resnet20.yaml"
    path.write_text(f"""
name: oracle_resnet20
model: {model}
dataset: {dataset}
base: {{epochs: 0}}
finetune: {{epochs: 1, batch_size: 20}}
measure: {{batch_size: 1, warmup: 1, runs: 2}}
prune: {{strategy: oracle, ratio: 0.3, oracle_batches: 1}}
resources: {{cpu: 1}}
""", encoding="utf-8")
    outcome = run_sweep(load_spec(path), tracking_uri=sqlite_uri, storage=str(tmp_path / "results"), verbose=0)
    assert (outcome.ran, outcome.failed) == (1, 0)
    run = _one_run(sqlite_uri, "oracle_resnet20")
    units = analyse(build_model("resnet20", 10, None, channels), (torch.randn(1, channels, 32, 32),)).num_units
    assert run.data.tags["prune.oracle_forward_passes"] == str(units + 1)
    assert 0.1 < run.data.metrics["channels_removed"] <= 0.3  # widths round down
    removed = Path(MlflowClient(sqlite_uri).download_artifacts(run.info.run_id, "removed.json", str(tmp_path)))
    assert removed.stat().st_size > 0
