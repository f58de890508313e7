"""Verdicts: sweep.report.stats checked against scipy and statsmodels called directly on fixed data; the four outcomes
from constructed runs; the family's correction; post hoc labels; --plan; `sweep report` end to end on a real sqlite
MLflow store filled through sweep.store.tracking."""

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from sweep import cli
from sweep.config.names import METRICS
from sweep.config.schema import ReportConfig
from sweep.config.spec import SpecError, parse_spec
from sweep.report import stats
from sweep.report import summary as report
from sweep.store import tracking
from sweep.store.tracking import TrialRun

# Fixed paired data: accuracy of a and b at eight seeds (fractions).
A = np.array([0.712, 0.698, 0.731, 0.705, 0.720, 0.689, 0.716, 0.709])
B = np.array([0.690, 0.691, 0.702, 0.699, 0.703, 0.688, 0.694, 0.700])
MARGIN = 0.01
RESNET20_RUNS = Path(__file__).resolve().parents[1] / "results" / "cifar10_resnet20" / "runs.csv"


def test_paired_tests_are_scipy_and_statsmodels():
    test = stats.paired(A, B, MARGIN)
    reference = scipy_stats.ttest_rel(A, B)
    ci = reference.confidence_interval(0.95)
    assert test.n == 8 and test.difference == pytest.approx((A - B).mean())
    assert test.sd == pytest.approx(np.std(A - B, ddof=1))
    assert (test.ci_low, test.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert test.p_t == pytest.approx(reference.pvalue)
    assert test.p_equivalence == pytest.approx(ttost_paired(A, B, -MARGIN, MARGIN)[0])
    # TOST is the larger of two one-sided t-tests: scipy's, against each end of the margin
    lower = scipy_stats.ttest_1samp(A - B, -MARGIN, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(A - B, MARGIN, alternative="less").pvalue
    assert test.p_equivalence == pytest.approx(max(lower, upper))
    # the exact sign-flip p: the share of all 2^8 sign patterns whose |mean| reaches the observed one
    diff = A - B
    flips = [abs((diff * signs).mean()) for signs in itertools.product([1, -1], repeat=len(diff))]
    exact = np.mean([f >= abs(diff.mean()) - 1e-12 for f in flips])
    assert test.p_sign_flip == pytest.approx(exact)
    assert stats.sign_flip_p(np.full(6, 0.01) + np.arange(6) * 1e-3) == pytest.approx(2 / 2**6)


def test_a_zero_variance_difference_gets_no_t_test_and_no_verdict():
    """Constant non-zero differences: scipy's t-test says p = 0 with a zero-width interval; we say inconclusive."""
    b = np.array([0.60, 0.64, 0.61])
    a = b + 0.05
    assert scipy_stats.ttest_rel(a, b).pvalue < 1e-6  # what a naive verdict would read as "better"
    test = stats.paired(a, b, MARGIN)
    assert test.constant and not test.testable and test.sd == 0
    assert math.isnan(test.p_t) and math.isnan(test.ci_low) and math.isnan(test.p_equivalence)
    assert test.p_sign_flip == pytest.approx(0.25)  # still exists: 2 / 2^3, far from any alpha
    verdict, why = stats.outcome(test, math.nan, test.p_sign_flip, math.nan, 0.05)
    assert verdict == "inconclusive" and "same difference at every seed" in why
    # many seeds do not rescue it: the rule is never a verdict from a zero-variance t-test
    many = stats.paired(np.arange(8) * 0.01 + 0.05, np.arange(8) * 0.01, MARGIN)
    assert many.constant and stats.outcome(many, math.nan, 0.008, math.nan, 0.05)[0] == "inconclusive"


def test_corrections_are_statsmodels_multipletests_over_the_whole_family():
    p = np.array([0.001, 0.011, 0.02, 0.04, 0.3, np.nan])
    filled = np.nan_to_num(p, nan=1.0)  # an untestable comparison still counts in the family
    for name, method in (("holm", "holm"), ("bh", "fdr_bh")):
        expected = multipletests(filled, method=method)[1]
        assert np.allclose(stats.adjust(p, name)[:5], expected[:5]) and math.isnan(stats.adjust(p, name)[5])
    assert np.allclose(stats.adjust(p, "none")[:5], p[:5])
    below = {name: int((stats.adjust(p, name) < 0.05).sum()) for name in ("none", "holm", "bh")}
    assert below == {"none": 4, "holm": 1, "bh": 3}
    with pytest.raises(ValueError, match="correction 'bonferroni' is invalid"):
        stats.adjust(p, "bonferroni")


def test_power_is_statsmodels_ttestpower():
    sd = 0.009
    # the figure: at n = 3 and alpha 0.05 a paired t-test sees about 3.0 points with SD 0.9 points
    assert stats.detectable(sd, 3, 0.05, sign_flip=False) == pytest.approx(
        TTestPower().solve_power(nobs=3, alpha=0.05, power=0.8) * sd)
    assert 100 * stats.detectable(sd, 3, 0.05, sign_flip=False) == pytest.approx(2.94, abs=0.01)
    assert stats.detectable(sd, 3, 0.05) == math.inf  # the sign-flip test cannot go below 0.25 with 3 seeds
    assert stats.detectable(sd, 8, 0.05) == pytest.approx(TTestPower().solve_power(nobs=8, alpha=0.05, power=0.8) * sd)
    assert math.isnan(stats.detectable(0.0, 5, 0.05)) and math.isnan(stats.detectable(sd, 1, 0.05))
    level = 0.05 / 6
    assert stats.seeds_for_sign_flip(level) == 8 and stats.smallest_sign_flip_p(8) < level <= \
        stats.smallest_sign_flip_p(7)
    needed = TTestPower().solve_power(effect_size=0.01 / 0.02, alpha=level, power=0.8)
    assert stats.seeds_needed(0.02, 0.01, level) == math.ceil(needed)
    assert stats.seeds_needed(0.001, 0.05, level) == 8  # the t-test needs 2; the sign-flip test needs 8
    assert stats.seeds_needed(0.0, 0.01, level) is None
    assert stats.level(0.05, "holm", 10) == stats.level(0.05, "bh", 10) == 0.005 and stats.level(0.05, "none", 10) \
        == 0.05


def runs_frame(accuracies: dict[str, list[float]], ratio: float = 0.5) -> pd.DataFrame:
    rows = [{"run_id": f"{s}{i}", "model": "m", "strategy": s, "ratio": ratio, "seed": float(i),
             "test_accuracy": acc, "flops_reduction": 0.6} for s, values in accuracies.items()
            for i, acc in enumerate(values)]
    return pd.DataFrame(rows)


NOISE = np.array([0.004, -0.006, 0.002, 0.007, -0.003, -0.005, 0.001, 0.0])
BASE = 0.70 + np.array([0.01, -0.02, 0.015, 0.0, -0.01, 0.02, -0.005, 0.005])  # seed-to-seed, cancels in pairs


def test_each_of_the_four_outcomes_from_constructed_runs():
    df = runs_frame({"random": list(BASE), "l1": list(BASE + 0.05 + NOISE), "fpgm": list(BASE + 0.001 + NOISE / 4),
                     "taylor": list(BASE - 0.05 + NOISE)})
    df = pd.concat([df, runs_frame({"random": list(BASE[:3]), "l1": list(BASE[:3] + 0.05 + NOISE[:3])}, 0.3)])
    pairs = report.paired_table(df, "random").set_index(["ratio", "strategy"])
    assert pairs.loc[(0.5, "l1"), "verdict"] == "better"
    assert pairs.loc[(0.5, "taylor"), "verdict"] == "worse"
    assert pairs.loc[(0.5, "fpgm"), "verdict"] == "equivalent"
    assert pairs.loc[(0.3, "l1"), "verdict"] == "inconclusive"  # 3 seeds: a 5-point gain nobody could confirm
    assert pairs.loc[(0.3, "l1"), "detectable"] == math.inf and pairs.loc[(0.3, "l1"), "p"] < 0.05
    # every p is the library's on the paired values, and the adjustment runs over all four comparisons
    l1 = pairs.loc[(0.5, "l1")]
    assert l1["p"] == pytest.approx(scipy_stats.ttest_rel(BASE + 0.05 + NOISE, BASE).pvalue)
    assert list(pairs["p_adjusted"]) == pytest.approx(list(multipletests(pairs["p"], method="holm")[1]))
    assert l1["p_sign_flip"] == pytest.approx(2 / 2**8)


def test_the_family_all_pairs_and_its_corrections():
    df = runs_frame({"random": list(BASE), "l1": list(BASE + 0.012 + NOISE), "l2": list(BASE + 0.02 + 2 * NOISE)})
    pairs = report.paired_table(df)  # no references: all pairs, each read later vs earlier (random last)
    assert [tuple(p) for p in pairs[["strategy", "reference"]].to_numpy()] == [("l1", "random"), ("l2", "random"),
                                                                               ("l2", "l1")]
    for correction, method in (("holm", "holm"), ("bh", "fdr_bh")):
        table = report.paired_table(df, ReportConfig(correction=correction))
        assert list(table["p_adjusted"]) == pytest.approx(list(multipletests(table["p"], method=method)[1]))
    none = report.paired_table(df, ReportConfig(correction="none"))
    assert list(none["p_adjusted"]) == list(none["p"])
    runs = df.assign(status="FINISHED", config_hash="x", base_test_accuracy=0.8)
    runs = runs.reindex(columns=[*runs.columns, *(m for m in METRICS if m not in runs)])
    text = report.summary_markdown("e", runs, report.summary_table(runs), none, ReportConfig(correction="none"))
    assert "**Warning: no correction for 3 comparisons.**" in text and "no correction over 3 comparisons" in text
    holm = report.summary_markdown("e", runs, report.summary_table(runs), pairs, None)
    assert "## Verdicts: Holm over 3 comparisons, alpha 0.05, margin 1.0 points" in holm and "Warning" not in holm


def test_report_block_validation():
    base = ("name: t\nmodel: {name: small_cnn}\ndataset: {name: digits}\n"
            "space: {strategy: {grid: [l1, random]}, seed: {grid: [0, 1]}}\n")
    assert parse_spec(base).report == {"references": [], "family": "all_pairs", "alpha": 0.05, "correction": "holm",
                                       "margin": 1.0, "metric": "test_accuracy"}
    assert parse_spec(base + "report: {references: [random]}\n").report["family"] == "references"
    with pytest.raises(SpecError) as error:
        parse_spec(base + "report: {references: [l3], alpha: 0.7, correction: bonferoni, metric: latency_ms}\n")
    lines = error.value.errors
    assert "report.references: unknown strategy 'l3'; did you mean 'l2'? choose one of" in lines[0]
    assert "report.alpha: 0.7 is outside (0, 0.5); use a number in (0, 0.5) such as 0.05" in lines
    assert any(line.startswith("report.correction: unknown correction 'bonferoni'") for line in lines)
    assert any(line.startswith("report.metric: unknown report metric 'latency_ms'") for line in lines)
    with pytest.raises(SpecError, match=r"report.references: 'fpgm' is not among the sweep's strategies \(l1, "
                                        r"random\)"):
        parse_spec(base + "report: {references: [fpgm]}\n")
    with pytest.raises(SpecError, match="report.family: 'references' compares with the references, and none are"):
        parse_spec(base + "report: {family: references}\n")


def test_the_resnet20_counts_recompute_from_the_committed_runs(tmp_path):
    """RESULTS.md section 1 read as all pairs per ratio: 63 paired tests, 25 with p < 0.05, 3 after Holm, 10 after
    Benjamini-Hochberg (issue 23's counts), from results/cifar10_resnet20/runs.csv through `sweep report --runs-csv`."""
    runs = report.read_runs_csv(RESNET20_RUNS)
    pairs = report.paired_table(runs)
    assert report.significance_counts(pairs) == {"comparisons": 63, "raw": 25, "holm": 3, "bh": 10}
    assert set(pairs["verdict"]) == {"inconclusive"}  # three seeds: the sign-flip test cannot go below 0.25
    paths = report.write_report("cifar10_resnet20", out_dir=tmp_path, runs_csv=RESNET20_RUNS)
    text = paths["summary"].read_text()
    assert "## Verdicts: Holm over 63 comparisons, alpha 0.05, margin 1.0 points" in text
    assert "T-test p < 0.05: 25 of 63 uncorrected, 3 after Holm, 10 after Benjamini-Hochberg." in text


# --- end to end: a real sqlite MLflow store -------------------------------------------------------------------------

EXPERIMENT = "stats-test"
SEEDS = range(8)
SPEC = "name: stats-test\nreport: {references: [random], margin: 1.0}\n"


def trial(strategy: str, ratio: float, seed: int) -> dict:
    return {"name": EXPERIMENT, "seed": seed, "model": {"name": "resnet20", "weights": None},
            "dataset": {"name": "cifar10", "root": None},
            "prune": {"strategy": strategy, "ratio": ratio, "scope": "local", "target": "channels",
                      "arm": "finetune"}, "finetune": {"epochs": 3, "lr": 0.01}}


def accuracy(strategy: str, ratio: float, seed: int) -> float:
    gain = {"random": 0.0, "l1": 0.08}[strategy] * ratio / 0.5
    return 0.6 + BASE[seed] - 0.7 + gain + (NOISE[seed] if strategy != "random" else 0.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory, template_db):
    """2 strategies x 2 ratios x 8 seeds under a parent whose spec declares random as the reference (8: with 2
    comparisons under Holm the sign-flip test needs 7 seeds to reach alpha at all)."""
    path = tmp_path_factory.mktemp("stats") / "mlflow.db"
    shutil.copy(template_db, path)
    sqlite_uri = f"sqlite:///{path}"
    parent = tracking.start_parent_run(sqlite_uri, EXPERIMENT, SPEC)
    for strategy, ratio, seed in itertools.product(("random", "l1"), (0.3, 0.5), SEEDS):
        run = TrialRun.create(sqlite_uri, EXPERIMENT, parent, trial(strategy, ratio, seed))
        acc = accuracy(strategy, ratio, seed)
        run.log_points([(name, 0, value) for name, value in {
            "test_accuracy": acc, "base_test_accuracy": 0.9, "test_accuracy_drop": 0.9 - acc,
            "pruned_test_accuracy": 0.2, "flops_reduction": ratio, "params_reduction": ratio,
            "channels_removed": ratio, "macs": 1e7, "train_time_s": 5.0, "speedup": 1.5}.items()])
        run.finish()
    tracking.end_run(sqlite_uri, parent)
    return sqlite_uri


def test_sweep_report_states_the_correction_and_every_verdict(store, tmp_path, capsys):
    status = cli.main(["report", EXPERIMENT, "--tracking-uri", store, "--out", str(tmp_path), "--plan", "0.5"])
    assert status == 0
    text = (tmp_path / EXPERIMENT / "summary.md").read_text()
    assert text in capsys.readouterr().out
    assert "## Verdicts: Holm over 2 comparisons, alpha 0.05, margin 1.0 points" in text
    assert "Compared on test_accuracy: each strategy against random, paired by seed within each setting." in text
    assert "post hoc" not in text.lower() and "nan" not in text and "None" not in text
    pairs = pd.read_csv(tmp_path / EXPERIMENT / "paired.csv")
    assert len(pairs) == 2 and set(pairs["verdict"]) <= set(stats.OUTCOMES) and (pairs["pairs"] == 8).all()
    l1 = pairs[(pairs["strategy"] == "l1") & (pairs["ratio"] == 0.5)].iloc[0]
    assert l1["verdict"] == "better"
    line = next(line for line in text.splitlines() if line.startswith("- l1 vs random") and "+8.0" in line)
    assert f"(95 % CI {100 * l1['ci_low']:+.1f} to {100 * l1['ci_high']:+.1f})" in line
    assert l1["p_adjusted"] < 0.001 and "p < 0.001, adjusted < 0.001" in line
    assert f"sign-flip p {2 / 2**8:.2g}, adjusted {2 * 2 / 2**8:.2g}" in line  # exact: 2 / 2^8, Holm over 2
    assert f"detectable ≥ {100 * l1['detectable']:.1f} points" in line
    # --plan 0.5: seeds per comparison, from the observed paired SD, at the level a lone difference needs (0.05 / 2)
    plan = text.split("## Seeds needed to detect 0.5 points")[1]
    need = stats.seeds_needed(l1["sd"], 0.005, 0.05 / 2)
    assert f"l1 vs random {need} (paired SD {100 * l1['sd']:.1f} points)" in plan
    # the same verdicts from the runs.csv it wrote, without MLflow; a spec-less report declares nothing
    again = tmp_path / "again"
    csv = str(tmp_path / EXPERIMENT / "runs.csv")
    assert cli.main(["report", EXPERIMENT, "--runs-csv", csv, "--out", str(again), "--reference", "random"]) == 0
    assert pd.read_csv(again / EXPERIMENT / "paired.csv")["verdict"].tolist() == pairs["verdict"].tolist()
    assert "random (post hoc)" in (again / EXPERIMENT / "summary.md").read_text()
    assert cli.main(["report", EXPERIMENT, "--runs-csv", csv, "--register", "m"]) == cli.USER_ERROR


def post_hoc_report(uri: str, **flags) -> tuple[str, pd.DataFrame]:
    """summary.md's text and the pairs as write_report makes them (without its plots)."""
    runs = report.load_runs(EXPERIMENT, uri)
    declared = report.declared_config(MlflowClient(uri), EXPERIMENT)
    config, changed = report.report_config(declared, flags)
    pairs = report.paired_table(runs, config, {r for r in config.references if r not in declared.references})
    return report.summary_markdown(EXPERIMENT, runs, report.summary_table(runs), pairs, config, changed), pairs


def test_a_reference_chosen_at_report_time_is_post_hoc(store, tmp_path):
    assert report.declared_config(MlflowClient(store), EXPERIMENT).references == ["random"]  # from spec.yaml
    text, pairs = post_hoc_report(store, references=["l1"], margin=0.5)
    assert "each strategy against l1 (post hoc)" in text
    assert "**Post hoc:** reference l1, margin 0.5 (declared: 1) chosen at report time" in text
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(lines) == 2 and all("random vs l1 (post hoc):" in line for line in lines)
    assert pairs["post_hoc"].all()
    text, pairs = post_hoc_report(store, references=["random"])
    assert "post hoc" not in text.lower() and not pairs["post_hoc"].any()  # the spec declared random
    with pytest.raises(report.ReportError, match="--reference l2: no finished trial of this sweep uses it"):
        report.write_report(EXPERIMENT, store, out_dir=tmp_path, reference="l2")
    with pytest.raises(report.ReportError, match=r"--alpha: 0.9 is outside \(0, 0.5\)"):
        report.write_report(EXPERIMENT, store, out_dir=tmp_path, alpha=0.9)
    with pytest.raises(report.ReportError, match="--family: 'references' compares with the references, and none"):
        report.write_report(EXPERIMENT, store, out_dir=tmp_path, family="references", reference=[])
