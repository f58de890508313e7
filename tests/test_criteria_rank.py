"""`sweep criteria`: each strategy's filter ranking against the oracle (the real loss change when a filter is removed).

Real Ray (loopback), a real sqlite MLflow store, real torch models: the digits small_cnn always, the pretrained
CIFAR ResNet-20 on real CIFAR-10 images where ../shared/data holds them.
"""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from sweep.analysis.common import prepare
from sweep.analysis.criteria_rank import oracle, run_criteria, spearman
from sweep.cli import main
from sweep.config.names import KIND_TAG
from sweep.config.spec import load_spec
from sweep.errors import InputError
from sweep.pruning import analyse, apply_plan, prune
from sweep.pruning.plan import plan_for  # what removing exactly these units means to the pruner
from sweep.report.summary import write_report
from sweep.store import tracking
from sweep.worker.train import evaluate


def _loss(model, setup):
    return evaluate(model, setup.val, "cpu", setup.num_classes)["loss"]


def _zeroed_at_source(model, graph, unit):
    """Every filter of the unit zeroed where it is made: conv weights, BN scale, shift and mean (the pruner's
    equivalence property), so the channel outputs exactly zero."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, idx in plan_for(graph, [unit]).removed.items():
            for p in ("weight", "bias", "running_mean"):
                t = getattr(ref.get_submodule(name), p, None)
                if t is not None:
                    t[idx] = 0
    return ref


def _removed(model, graph, unit):
    """The model with the unit physically removed by the pruner's surgery."""
    return apply_plan(model, plan_for(graph, [unit]))


def oracle_equal(setup, layers=None):
    """A test-only criterion: |loss change| of removing each unit, measured independently (real removal)."""
    def criterion(model, graph, calibration, generator):
        base = _loss(model, setup)
        wanted = set(range(graph.num_units)) if layers is None else {
            u for i, units in enumerate(graph.layers) for u in units if i in layers(graph)}
        return torch.tensor([abs(_loss(_removed(model, graph, u), setup) - base) if u in wanted else 0.0
                             for u in range(graph.num_units)], dtype=torch.float64)
    return criterion


# --- rank correlation ----------------------------------------------------------------------------------------------


def test_spearman_matches_scipy_with_ties_and_is_bounded():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 5, 17, 200):
        a, b = rng.integers(0, 5, n).astype(float), rng.normal(size=n)  # many ties in a
        if np.ptp(a) == 0:
            continue
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert -1 <= spearman(a, b) <= 1
    x = rng.normal(size=30)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # any increasing map
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(30))) and np.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="equally long"):
        spearman([1, 2], [1, 2, 3])


# --- the oracle ----------------------------------------------------------------------------------------------------


def test_oracle_of_a_filter_equals_zeroing_it_and_removing_it(digits_spec, tmp_path, storage):
    setup = prepare(load_spec(digits_spec), storage, calibration=False)
    model = setup.model
    graph = analyse(model, (setup.example,))
    before = copy.deepcopy(model.state_dict())
    base = _loss(model, setup)
    for layer in graph.layers:
        units = layer[:3]
        got_base, changes = oracle(model, graph, units, setup.val, "cpu")
        assert got_base == pytest.approx(base, rel=1e-7)
        for unit, change in zip(units, changes):
            zeroed = _loss(_zeroed_at_source(model, graph, unit), setup) - base
            removed = _loss(_removed(model, graph, unit), setup) - base
            assert change == pytest.approx(zeroed, abs=1e-5) and change == pytest.approx(removed, abs=1e-5)
        assert np.abs(changes).max() > 1e-4  # removing a filter of a trained network changes its loss
    for key, value in model.state_dict().items():  # the oracle restores every weight it zeroed
        assert torch.equal(value, before[key]), key


# --- the sweep ----------------------------------------------------------------------------------------------------


def test_digits_criteria_sweep(local_ray, digits_spec, tmp_path, sqlite_uri, storage):
    spec = load_spec(digits_spec)
    setup = prepare(spec, storage, calibration=False)  # trains the shared base the sweep then finds
    outcome = run_criteria(spec, strategies=["random", "l1", "taylor", "bn_scale"], tracking_uri=sqlite_uri,
                           storage=storage, out_dir=tmp_path / "reports",
                           extra_criteria={"oracle_equal": oracle_equal(setup)})
    table = outcome.table
    assert list(table["layer"]) == ["features.0", "features.3", "features.7"]
    assert list(table["units"]) == [32, 64, 128]
    columns = [c for c in table.columns if c.startswith("spearman_")]
    assert len(columns) == 10
    values = table[columns].to_numpy(float)
    assert np.all((values >= -1) & (values <= 1))
    assert np.allclose(table["spearman_oracle_equal"], 1.0)  # a criterion equal to the oracle ranks perfectly

    # the per-unit oracle is the real loss change of removing that filter
    units = outcome.units
    graph = analyse(setup.model, (setup.example,))
    base = _loss(setup.model, setup)
    for unit in (units["unit"].iloc[0], units["unit"].iloc[40], units["unit"].iloc[-1]):
        row = units[units["unit"] == unit].iloc[0]
        assert row["delta_loss"] == pytest.approx(_loss(_removed(setup.model, graph, unit), setup) - base, abs=1e-5)
    # the ranking judged is the pruner's: l1 at 25 % removes the 16 lowest-scored filters of features.3
    layer = units[units["layer"] == "features.3"]
    pruned = prune(setup.model, setup.example, "l1", 0.25, ignore=["features.0", "features.7"])
    assert set(pruned.plan.removed["features.3"]) == set(layer.nsmallest(16, "l1")["channel"])

    client = MlflowClient(sqlite_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["sweep.kind"] == "criteria" and parent.info.status == "FINISHED"
    for name in ("random", "l1", "taylor", "bn_scale", "oracle_equal"):
        assert parent.data.metrics[f"mean_spearman_{name}"] == pytest.approx(table[f"spearman_{name}"].mean())
    assert parent.data.metrics["mean_spearman_oracle_equal"] == pytest.approx(1.0)
    children = tracking.all_runs(client, parent.info.experiment_id,
                                 f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(children) == 3 and all("oracle.csv" in {a.path for a in client.list_artifacts(c.info.run_id)}
                                      for c in children)
    assert {"criteria.png", "criteria.csv", "summary.md", "oracle_units.csv"} <= {
        a.path for a in client.list_artifacts(outcome.parent_run_id)}

    paths = write_report(outcome.experiment, sqlite_uri, out_dir=tmp_path / "again")
    again = pd.read_csv(paths["table"])
    assert list(again["layer"]) == ["features.0", "features.3", "features.7", "mean"]
    assert again["spearman_taylor"].iloc[-1] == pytest.approx(table["spearman_taylor"].mean())


def test_cli_criteria(local_ray, digits_spec, tmp_path, sqlite_uri, capsys, storage):
    code = main(["criteria", str(digits_spec), "--strategies", "l1,l2", "--layers", "features.3",
                 "--batches", "2", "--tracking-uri", sqlite_uri, "--storage", storage,
                 "--out", str(tmp_path / "reports")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| features.3 | 64 |" in out and "128 validation examples" in out
    assert main(["criteria", str(digits_spec), "--layers", "nope", "--tracking-uri", sqlite_uri,
                 "--storage", storage]) == 2


# --- ResNet-20, pretrained, real CIFAR-10 images ----------------------------------------------------------------


@pytest.mark.slow  # ~40 s; the digits criteria sweep covers the same code in the default run
def test_resnet20_criteria_on_sampled_layers(local_ray, resnet20_spec, tmp_path, sqlite_uri, storage):
    spec = load_spec(resnet20_spec)
    setup = prepare(spec, storage, calibration=False)
    names = ["conv1", "layer1.0.conv1", "layer3.2.conv1"]  # the residual stream, the first and the last conv1

    def sampled(graph):
        producers = {graph.producer[label][0]: graph.unit_layer[u]
                     for label, u in enumerate(graph.unit_of_label) if u >= 0}
        return {producers[n] for n in names}

    outcome = run_criteria(spec, strategies=["l1", "bn_scale", "taylor"], layers=names, tracking_uri=sqlite_uri,
                           storage=storage, out_dir=tmp_path / "reports",
                           extra_criteria={"oracle_equal": oracle_equal(setup, sampled)})
    table = outcome.table
    assert list(table["layer"]) == names and list(table["units"]) == [16, 16, 64]
    values = table[[c for c in table.columns if c.startswith("spearman_")]].to_numpy(float)
    assert np.all((values >= -1) & (values <= 1))
    assert np.allclose(table["spearman_oracle_equal"], 1.0)

    graph = analyse(setup.model, (setup.example,))
    base = _loss(setup.model, setup)
    units = outcome.units
    for layer in names:  # one filter of each: the oracle is zero-and-evaluate, and is the real removal
        row = units[units["layer"] == layer].iloc[1]
        zeroed = _loss(_zeroed_at_source(setup.model, graph, row["unit"]), setup) - base
        removed = _loss(_removed(setup.model, graph, row["unit"]), setup) - base
        assert row["delta_loss"] == pytest.approx(zeroed, abs=1e-5)
        assert row["delta_loss"] == pytest.approx(removed, abs=1e-5)


def test_report_of_a_criteria_run_without_finished_layers_says_so(sqlite_uri, tmp_path):
    """A criteria analysis whose every layer task failed: the report's own one-line error, not a KeyError."""
    parent = tracking.start_parent_run(sqlite_uri, "crit_empty", "{}\n", tags={KIND_TAG: "criteria"})
    MlflowClient(sqlite_uri).log_param(parent, "strategies", "l1,taylor")
    tracking.end_run(sqlite_uri, parent, "FAILED")
    with pytest.raises(InputError, match=f"criteria run {parent} of 'crit_empty' has no finished layers"):
        write_report("crit_empty", sqlite_uri, out_dir=tmp_path)
