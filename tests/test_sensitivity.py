"""`sweep sensitivity`: each layer group pruned alone at each ratio, on Ray, recorded in MLflow; per-layer ratios.

Real Ray (loopback), a real sqlite MLflow store, real torch models: the digits small_cnn always, the pretrained
CIFAR ResNet-20 on real CIFAR-10 images where ../shared/data holds them.
"""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from analysis_data import DIGITS_SPEC
from mlflow.tracking import MlflowClient

from sweep.analysis.common import prepare
from sweep.analysis.groups import layer_groups, prune_per_layer
from sweep.analysis.sensitivity import run_sensitivity
from sweep.cli import main
from sweep.config.spec import load_spec, parse_spec
from sweep.pruning import prune
from sweep.report.analyses import suggest
from sweep.report.summary import write_report
from sweep.store import tracking
from sweep.worker.train import evaluate
from sweep.zoo.models import build_model


def _direct(setup, groups, layer, ratio, strategy="l1"):
    """Prune `layer` alone with prune() itself (every other group's convs ignored) and evaluate it."""
    group = next(g for g in groups if g.name == layer)
    others = [m for g in groups if g is not group for m in g.modules]
    result = prune(setup.model, setup.example, strategy=strategy, ratio=ratio, ignore=others)
    return result, evaluate(result.model, setup.val, "cpu", setup.num_classes)


def _check_sweep_equals_direct(spec_path, outcome, storage, uri, ratios, layers=None):
    setup = prepare(load_spec(spec_path), storage, calibration=False)
    assert setup.base_cached, "the analysis must use the spec's shared base, not train its own"
    groups = layer_groups(setup.model, setup.example)
    table = outcome.table
    assert set(table["layer"]) == {g.name for g in groups}
    assert len(table) == len(groups) * len(ratios)
    for layer in layers or [g.name for g in groups]:
        for ratio in ratios:
            row = table[(table["layer"] == layer) & (table["ratio"] == ratio)].iloc[0]
            result, metrics = _direct(setup, groups, layer, ratio)
            assert row["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-12)
            assert row["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
            group = next(g for g in groups if g.name == layer)
            for module in group.modules:  # exactly the asked fraction of the group's filters
                assert len(result.plan.removed[module]) == int(ratio * group.width + 1e-9)
            for module in set(result.plan.removed) - set(group.modules):  # and nothing else but their BNs
                assert isinstance(setup.model.get_submodule(module), torch.nn.BatchNorm2d)
    return setup, groups


# --- digits small_cnn ---------------------------------------------------------------------------------------------


def test_digits_sensitivity_equals_direct_prune_and_is_tracked(local_ray, digits_spec, tmp_path, sqlite_uri, storage):
    ratios = [0.25, 0.5, 0.75]
    outcome = run_sensitivity(load_spec(digits_spec), ratios=ratios, tolerance=0.02, tracking_uri=sqlite_uri,
                              storage=storage, out_dir=tmp_path / "reports", spec_path=digits_spec)
    setup, groups = _check_sweep_equals_direct(digits_spec, outcome, storage, sqlite_uri, ratios)
    assert [g.name for g in groups] == ["features.0", "features.3", "features.7"]

    client = MlflowClient(sqlite_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["sweep.role"] == "parent" and parent.data.tags["sweep.kind"] == "sensitivity"
    assert parent.info.status == "FINISHED" and outcome.experiment == "t_layers_digits.sensitivity"
    base = evaluate(setup.model, setup.val, "cpu", setup.num_classes)
    assert parent.data.metrics["base_val_accuracy"] == pytest.approx(base["accuracy"])
    children = tracking.all_runs(client, parent.info.experiment_id,
                                 f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(children) == len(groups)
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [0, 1, 2]
        assert "config_hash" not in child.data.tags  # never mistaken for a pruning trial
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"sensitivity.png", "sensitivity.csv", "suggested.yaml", "summary.md"} <= artifacts

    # the suggestion is the largest ratio within the tolerance, as a prune: block a spec can take over
    block = yaml.safe_load(outcome.paths["suggested"].read_text())["prune"]
    want_ratios, want_ignore = suggest(outcome.table, base["accuracy"], 0.02)
    assert block["ratios"] == want_ratios and block["ignore"] == want_ignore
    for layer, ratio in block["ratios"].items():
        rows = outcome.table[(outcome.table["layer"] == layer) & (outcome.table["ratio"] <= ratio)]
        assert (base["accuracy"] - rows["accuracy"] <= 0.02 + 1e-12).all()
    assert set(block["ratios"]) | set(block["ignore"]) == {g.name for g in groups}
    taken_over = yaml.safe_load(DIGITS_SPEC)  # a later sweep takes the block over as its prune section
    taken_over["prune"] = {**taken_over["prune"], **block}
    assert parse_spec(yaml.safe_dump(taken_over)).trial["prune"]["ratios"] == block["ratios"]

    # `sweep report NAME` recognises the parent and redraws the same table from MLflow alone
    paths = write_report(outcome.experiment, sqlite_uri, out_dir=tmp_path / "again")
    again = pd.read_csv(paths["table"])
    assert np.allclose(again["accuracy"], outcome.table["accuracy"])
    assert paths["sensitivity"].stat().st_size > 10_000


def test_a_report_that_fails_after_the_tasks_leaves_the_parent_failed_not_running(local_ray, digits_spec, tmp_path,
                                                                                  sqlite_uri, storage):
    blocked = tmp_path / "a_file"  # the report's folder cannot be made: the layers ran, the report fails
    blocked.write_text("not a folder")
    with pytest.raises(OSError):
        run_sensitivity(load_spec(digits_spec), ratios=[0.5], tracking_uri=sqlite_uri, storage=storage,
                        out_dir=blocked)
    client = MlflowClient(sqlite_uri)
    experiment = client.get_experiment_by_name("t_layers_digits.sensitivity")
    parents = tracking.all_runs(client, experiment.experiment_id, "tags.`sweep.role` = 'parent'")
    assert [p.info.status for p in parents] == ["FAILED"]
    parent = parents[0].info.run_id
    children = tracking.all_runs(client, experiment.experiment_id, f"tags.`mlflow.parentRunId` = '{parent}'")
    assert children and {c.info.status for c in children} == {"FINISHED"}


def test_suggest_keeps_the_prefix_within_tolerance_and_ignores_fragile_layers():
    table = pd.DataFrame({
        "layer": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
        "ratio": [0.1, 0.5, 0.9] * 3,
        "accuracy": [0.90, 0.89, 0.50,  # a: 0.5 is within 1 point
                     0.70, 0.90, 0.90,  # b: loses 20 points at 0.1: ignore, even if larger ratios recover
                     0.90, 0.80, 0.90],  # c: 0.5 breaks the prefix, so 0.9 does not count
    })
    ratios, ignore = suggest(table, 0.90, 0.01)
    assert ratios == {"a": 0.5, "c": 0.1} and ignore == ["b"]


def test_cli_sensitivity_runs_and_reports(local_ray, digits_spec, tmp_path, sqlite_uri, capsys, storage):
    code = main(["sensitivity", str(digits_spec), "--ratios", "0.5", "--tracking-uri", sqlite_uri,
                 "--storage", storage, "--out", str(tmp_path / "reports")])
    assert code == 0
    out = capsys.readouterr().out
    assert "features.7" in out and "suggested" in out
    assert (tmp_path / "reports" / "t_layers_digits.sensitivity" / "sensitivity.png").exists()
    assert main(["sensitivity", str(digits_spec), "--ratios", "0.5,1.5", "--tracking-uri", sqlite_uri]) == 2


# --- per-layer ratios ------------------------------------------------------------------------------------------


def _zero_removed(model, plan):
    """The original model with every removed channel zeroed at its source (the pruner's equivalence property)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, idx in plan.removed.items():
            for p in ("weight", "bias", "running_mean"):
                t = getattr(ref.get_submodule(name), p, None)
                if t is not None:
                    t[idx] = 0
    return ref


def test_per_layer_ratios_remove_exactly_what_was_asked_and_stay_equivalent():
    torch.manual_seed(0)
    model = build_model("resnet20", 10).double().eval()
    with torch.no_grad():  # non-trivial BN statistics: no channel is dead by construction
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ratios = {"layer1.*.conv1": 0.5, "layer2.1.conv1": 0.25, "layer3.*.conv1": 0.75, "conv1": 0.5}
    pruned, plan = prune_per_layer(model, x, ratios, "l1", ignore=["layer2.2.conv1"])
    widths = {1: 16, 2: 32, 3: 64}
    for stage in (1, 2, 3):
        for block in range(3):
            name = f"layer{stage}.{block}.conv1"
            want = {1: 8, 3: 48}.get(stage, 8 if block == 1 else 0)
            assert len(plan.removed.get(name, ())) == want, name
            assert pruned.get_submodule(name).out_channels == widths[stage] - want
    assert len(plan.removed["conv1"]) == 8  # the residual stream: 16 channels, tied through every stage
    assert len(plan.removed["layer3.2.conv2"]) == 8  # ... and removed together in each of its convs
    with torch.no_grad():
        expected, got = _zero_removed(model, plan)(x), pruned(x)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6


# --- ResNet-20, pretrained, real CIFAR-10 images ----------------------------------------------------------------


def test_resnet20_sensitivity_equals_direct_prune(local_ray, resnet20_spec, tmp_path, sqlite_uri, storage):
    ratios = [0.25, 0.75]
    outcome = run_sensitivity(load_spec(resnet20_spec), ratios=ratios, tracking_uri=sqlite_uri, storage=storage,
                              out_dir=tmp_path / "reports")
    setup, groups = _check_sweep_equals_direct(resnet20_spec, outcome, storage, sqlite_uri, ratios,
                                               layers=["conv1", "layer1.0.conv1", "layer3.2.conv1"])
    assert len(groups) == 10  # nine block conv1s and the residual stream
    stream = next(g for g in groups if g.name == "conv1")
    assert len(stream.modules) == 10 and stream.width == 16
    base = evaluate(setup.model, setup.val, "cpu", setup.num_classes)["accuracy"]
    assert base > 0.6  # the published weights on real (JPEG) CIFAR-10 images
    worst = outcome.table.groupby("layer")["accuracy"].min()
    assert worst["conv1"] < base  # removing three quarters of the residual stream hurts
