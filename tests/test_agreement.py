"""sweep.report.agreement: the Jaccard overlap of the filters two strategies remove, on plans of the real pruner, and
in the report of a real sweep (Ray, MLflow sqlite, digits)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from sweep.config.spec import load_spec
from sweep.driver.launch import run_sweep
from sweep.driver.session import reports_dir
from sweep.pruning import analyse, prune
from sweep.report import agreement
from sweep.report.agreement import agreement_markdown, agreement_means, agreement_table, chance_jaccard, jaccard
from sweep.report.summary import load_runs, loss_curves
from sweep.store import tracking
from sweep.store.store import Store
from sweep.worker import trial
from sweep.zoo.models import build_model

EXAMPLE = torch.randn(1, 1, 8, 8)


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return build_model("small_cnn", 10, None, 1).eval()


def _removed(model, strategy: str, ratio: float, seed: int) -> dict:
    """What a trial logs as removed.json for this pruning of the model."""
    return trial.removed_channels(prune(model, EXAMPLE, strategy=strategy, ratio=ratio, seed=seed).plan, model)


def _runs(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["run_id", "strategy", "seed", "ratio"])


def test_the_report_reads_the_artifact_the_trial_writes():
    assert agreement.REMOVED_FILE == trial.REMOVED_FILE


def test_jaccard_and_its_chance_value_at_the_edges():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([1], [1]) == 1.0 and jaccard([1], [2]) == 0.0
    assert math.isnan(jaccard([], []))  # nothing removed on either side: no agreement to measure
    assert chance_jaccard(10, 10, 10) == pytest.approx(1.0)  # all removed on both sides
    assert chance_jaccard(10, 1, 1) == pytest.approx(0.1)  # the same one of ten: 1/10, else 0
    assert chance_jaccard(10, 0, 3) == 0.0 and math.isnan(chance_jaccard(10, 0, 0))


@pytest.mark.parametrize("width,k_a,k_b", [(64, 32, 32), (10, 3, 5), (7, 6, 2), (128, 25, 100)])
def test_chance_jaccard_matches_a_simulation(width, k_a, k_b):
    rng = np.random.default_rng(width + k_a + k_b)
    draws = 20_000
    sampled = np.array([jaccard(rng.choice(width, k_a, replace=False), rng.choice(width, k_b, replace=False))
                        for _ in range(draws)])
    mean = chance_jaccard(width, k_a, k_b)
    sd = math.sqrt(chance_jaccard(width, k_a, k_b, moment=2) - mean ** 2)
    assert sampled.std() == pytest.approx(sd, rel=0.05)
    # the simulated mean lies within 4 standard errors of the closed form (a false alarm once in ~16,000 runs)
    assert abs(sampled.mean() - mean) < 4 * sd / math.sqrt(draws)


def test_identical_plans_overlap_exactly_one(small_cnn):
    plan = _removed(small_cnn, "l1", 0.5, 0)
    runs = _runs([("a", "l1", 0, 0.5), ("b", "l1_again", 0, 0.5), ("c", "random", 0, 0.5)])
    table = agreement_table(runs, ["ratio"], {"a": plan, "b": plan, "c": _removed(small_cnn, "random", 0.5, 0)})
    same = table[(table["strategy_a"] == "l1") & (table["strategy_b"] == "l1_again")]
    # every conv loses half its filters; the classifier (the output layer) none, so it is no row
    assert list(same["layer"]) == ["features.0", "features.3", "features.7"]
    assert (same["jaccard"] == 1.0).all() and (same["chance"] < 0.5).all()
    assert list(same["removed_a"]) == [16, 32, 64] and list(same["width"]) == [32, 64, 128]
    assert set(zip(table["strategy_a"], table["strategy_b"])) == {("l1", "l1_again"), ("l1", "random"),
                                                                  ("l1_again", "random")}
    means = agreement_means(table, ["ratio"])
    assert means.set_index(["strategy_a", "strategy_b"]).loc[("l1", "l1_again"), "jaccard"] == 1.0
    text = "\n".join(agreement_markdown(means, ["ratio"]))
    assert "| l1 | 1.00 | 1.00 |" in text and "Chance:" in text


def test_only_runs_of_the_same_seed_and_setting_are_paired(small_cnn):
    plans = {f"{s}{seed}{r}": _removed(small_cnn, s, r, seed) for s in ("l1", "random") for seed in (0, 1)
             for r in (0.3, 0.5)}
    runs = _runs([(key, key[:-4], int(key[-4]), float(key[-3:])) for key in plans])
    table = agreement_table(runs, ["ratio"], plans)
    assert set(map(tuple, table[["ratio", "seed"]].drop_duplicates().to_numpy().tolist())) == {
        (0.3, 0), (0.3, 1), (0.5, 0), (0.5, 1)}
    assert set(zip(table["strategy_a"], table["strategy_b"])) == {("l1", "random")}
    assert len(table) == 4 * 3  # 2 ratios x 2 seeds x 3 layers, one pair each


def test_random_against_itself_agrees_as_much_as_chance(small_cnn):
    """Two random prunings at different seeds are independent uniform choices: their mean overlap is the closed
    form's. 20 independent pairs x 3 layers at each of two ratios: 120 layer overlaps."""
    observed, expected, variance = [], [], []
    for ratio in (0.3, 0.5):
        for seed in range(0, 40, 2):
            a, b = _removed(small_cnn, "random", ratio, seed), _removed(small_cnn, "random", ratio, seed + 1)
            for layer in ("features.0", "features.3", "features.7"):
                width, k_a, k_b = a[layer]["width"], len(a[layer]["removed"]), len(b[layer]["removed"])
                observed.append(jaccard(a[layer]["removed"], b[layer]["removed"]))
                mean = chance_jaccard(width, k_a, k_b)
                expected.append(mean)
                variance.append(chance_jaccard(width, k_a, k_b, moment=2) - mean ** 2)
    n = len(observed)
    # the mean of n independent overlaps: within 4 of its standard errors of the expected mean
    assert abs(np.mean(observed) - np.mean(expected)) < 4 * math.sqrt(sum(variance)) / n
    assert 0.15 < np.mean(expected) < 0.4  # far from 1: random removals are not the same filters


def test_heat_map_one_panel_per_setting(small_cnn, tmp_path):
    plans = {f"{s}{r}": _removed(small_cnn, s, r, 0) for s in ("l1", "l2", "random") for r in (0.3, 0.5)}
    runs = _runs([(key, key[:-3], 0, float(key[-3:])) for key in plans])
    means = agreement_means(agreement_table(runs, ["ratio"], plans), ["ratio"])
    assert len(means) == 2 * 3  # 3 pairs at each ratio
    path = agreement.plot_agreement(means, ["ratio"], tmp_path / "agreement.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = "\n".join(agreement_markdown(means, ["ratio"]))
    assert "**ratio 0.3**" in text and "**ratio 0.5**" in text


SPEC = """
name: agree
dataset: {{name: digits, limit: 200}}
model: {{name: small_cnn}}
base: {{epochs: 2, batch_size: 32}}
finetune: {{epochs: 2, batch_size: 32}}
measure: {{batch_size: 1, warmup: 1, runs: 2}}
prune: {{ratio: 0.5, oracle_batches: {batches}}}
space:
  strategy: {{grid: [oracle, random]}}
  seed: {{grid: [0, 1]}}
resources: {{cpu: 1}}
"""


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_sweep_with_oracle_and_random_reports_their_agreement(local_ray, tmp_path, sqlite_uri):
    """Also the digits sweep of strategy oracle: it finishes, reads oracle_batches (2, not calibration_batches' 4)
    and tags its cost."""
    path = tmp_path / "agree.yaml"
    path.write_text(SPEC.format(batches=2), encoding="utf-8")
    storage = str(tmp_path / "results")
    outcome = run_sweep(load_spec(path), tracking_uri=sqlite_uri, storage=storage, verbose=0)
    assert (outcome.ran, outcome.failed) == (4, 0)

    client = MlflowClient(sqlite_uri)
    runs = tracking.child_runs(client, "agree")
    units = analyse(build_model("small_cnn", 10, None, 1), (EXAMPLE,)).num_units
    for run in runs:
        assert run.info.status == "FINISHED"
        assert json.loads(Path(client.download_artifacts(run.info.run_id, "removed.json", str(tmp_path))).read_text())
        assert run.data.metrics["channels_removed"] == pytest.approx(0.5, abs=0.02)
        if run.data.params["strategy"] == "oracle":  # each unit and the whole network, on each calibration batch
            assert run.data.tags["prune.oracle_forward_passes"] == str((units + 1) * 2)
        else:
            assert "prune.oracle_forward_passes" not in run.data.tags

    out = Path(reports_dir(storage)) / "agree"
    table = pd.read_csv(out / "agreement.csv")
    assert set(zip(table["strategy_a"], table["strategy_b"])) == {("oracle", "random")}
    assert sorted(table["seed"].unique()) == [0, 1] and len(table) == 2 * 3  # 2 seeds x 3 conv layers
    assert ((table["jaccard"] >= 0) & (table["jaccard"] <= 1)).all()
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "## Criteria agreement" in summary and "| oracle | 1.00 |" in summary
    assert (out / "agreement.png").exists()
    logged = {Path(a.path).name for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert {"agreement.csv", "agreement.png", "curves.png", "layers.png"} <= logged

    # the loss curves: each group's per-epoch mean of what its runs logged, epochs 1 and 2
    curves = loss_curves(load_runs("agree", sqlite_uri), Store(sqlite_uri))
    assert set(curves["group"]) == {"strategy=oracle", "strategy=random"} and set(curves["epoch"]) == {1, 2}
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    for (group, metric, epoch), row in curves.set_index(["group", "metric", "epoch"]).iterrows():
        logged_values = [h.value for run in runs if f"strategy={run.data.params['strategy']}" == group
                         for h in client.get_metric_history(run.info.run_id, metric) if h.step == epoch]
        assert row["n"] == 2 and row["mean"] == pytest.approx(np.mean(logged_values))
