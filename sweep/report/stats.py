"""Paired comparisons over seeds, for verdicts one could defend in review: every number comes from scipy.stats or
statsmodels, never a hand-written formula. Units are the data's (accuracies and margins as fractions)."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

POWER = 0.8
CONFIDENCE = 0.95
OUTCOMES = ("better", "worse", "equivalent", "inconclusive")
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh", "none": None}  # spec name -> statsmodels method
CORRECTION_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no correction"}
# Paired differences closer than this (a fraction: a millionth of a point) are the same number written twice by
# floating point: the t statistic of such "varying" differences would be noise divided by noise.
_SAME = 1e-8
# Up to this many seeds the sign-flip test enumerates all 2^n flips (exact); beyond, it draws this many (seeded).
_EXACT_UP_TO = 16


@dataclass(frozen=True)
class Paired:
    """One paired comparison of a against b (difference a - b per seed). NaN where a quantity does not exist: a
    t-test and its interval need two pairs and differences that vary."""

    n: int
    difference: float  # mean of a - b
    sd: float  # sample SD of the paired differences (ddof 1)
    ci_low: float
    ci_high: float
    p_t: float  # two-sided paired t-test (scipy.stats.ttest_rel)
    p_sign_flip: float  # two-sided exact sign-flip permutation test of the mean difference (n >= 2)
    p_equivalence: float  # two one-sided tests against ±margin (statsmodels ttost_paired)
    constant: bool  # every pair differs by the same amount: no variance, so no t-test

    @property
    def testable(self) -> bool:
        return self.n >= 2 and not self.constant


def paired(a: np.ndarray, b: np.ndarray, margin: float) -> Paired:
    """Paired tests of a against b, seed i of one with seed i of the other; margin bounds equivalence (a fraction)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = a - b
    n = len(diff)
    mean = float(diff.mean()) if n else math.nan
    constant = n >= 2 and float(np.ptp(diff)) <= _SAME
    p_flip = sign_flip_p(diff) if n >= 2 else math.nan
    if n < 2 or constant:  # scipy would give t = ±inf, p = 0, a zero-width interval: a verdict from nothing
        sd = 0.0 if constant else math.nan
        return Paired(n, mean, sd, math.nan, math.nan, math.nan, p_flip, math.nan, constant)
    test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(CONFIDENCE)
    p_equivalence = float(ttost_paired(a, b, -margin, margin)[0])
    return Paired(n, mean, float(diff.std(ddof=1)), float(ci.low), float(ci.high), float(test.pvalue), p_flip,
                  p_equivalence, False)


def sign_flip_p(diff: np.ndarray) -> float:
    """Two-sided p of the mean paired difference under random sign flips (scipy.stats.permutation_test): exact up to
    _EXACT_UP_TO pairs. Its smallest value is 2 / 2^n: 0.25 at n = 3, 0.0625 at n = 5."""
    diff = np.asarray(diff, float)
    resamples = np.inf if len(diff) <= _EXACT_UP_TO else 2**_EXACT_UP_TO
    result = stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=resamples,
                                    alternative="two-sided", vectorized=True, rng=0)
    return float(result.pvalue)


def smallest_sign_flip_p(n: int) -> float:
    """The smallest two-sided p the exact sign-flip test can give with n pairs (every difference of one sign)."""
    return min(1.0, 2.0 / 2**n) if n >= 1 else math.nan


def adjust(pvalues, correction: str) -> np.ndarray:
    """Adjusted p-values over the whole family (statsmodels multipletests). A comparison without a p (NaN: too few
    pairs, no variance) still counts in the family, as p = 1: it was declared, so it may not shrink the correction;
    its adjusted p stays NaN."""
    p = np.asarray(pvalues, float)
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r} is invalid: use one of {', '.join(CORRECTIONS)}")
    if len(p) == 0 or CORRECTIONS[correction] is None:
        return p.copy()
    # statsmodels' Holm ends with gc.collect(), which scans every live object: 0.8 s in a process holding torch and
    # MLflow. Frozen objects are skipped; whatever they leave is collected once they are unfrozen.
    gc.freeze()
    try:
        adjusted = multipletests(np.nan_to_num(p, nan=1.0), method=CORRECTIONS[correction])[1]
    finally:
        gc.unfreeze()
    adjusted[np.isnan(p)] = math.nan
    return adjusted


def level(alpha: float, correction: str, family_size: int) -> float:
    """The per-comparison level a lone difference must reach: alpha / m under Holm or Benjamini-Hochberg (the
    first step of each), alpha without correction."""
    return alpha if correction == "none" else alpha / max(1, family_size)


def detectable(sd: float, n: int, level: float, sign_flip: bool = True) -> float:
    """The smallest true difference (unit of sd) the t-test finds with POWER at this level; infinite when the
    sign-flip test, which a verdict also needs (sign_flip=False: the t-test alone), cannot reach the level with n
    pairs. NaN without an SD (n < 2, constant differences)."""
    if n < 2 or not sd > 0:
        return math.nan
    if sign_flip and smallest_sign_flip_p(n) >= level:
        return math.inf
    return float(TTestPower().solve_power(nobs=n, alpha=level, power=POWER, alternative="two-sided")) * sd


def seeds_for_sign_flip(level: float) -> int:
    """The fewest pairs with which the exact sign-flip test can give p below this level."""
    n = 1
    while smallest_sign_flip_p(n) >= level:
        n += 1
    return n


def seeds_needed(sd: float, delta: float, level: float) -> int | None:
    """Seeds (pairs) a comparison needs to find a true difference of delta with POWER at this level, from the SD of
    its paired differences, and at least as many as the sign-flip test needs. None without an SD to plan from."""
    if not sd > 0 or not delta > 0:
        return None
    nobs = float(TTestPower().solve_power(effect_size=delta / sd, alpha=level, power=POWER, alternative="two-sided"))
    if math.isnan(nobs):  # the root finder fails when a handful of pairs already suffice: count up instead
        nobs = next(n for n in range(2, 10_000)
                    if TTestPower().power(delta / sd, n, level, alternative="two-sided") >= POWER)
    return max(2, math.ceil(nobs), seeds_for_sign_flip(level))


def outcome(test: Paired, p_t_adjusted: float, p_flip_adjusted: float, p_equivalence_adjusted: float,
            alpha: float) -> tuple[str, str]:
    """(outcome, why) of one comparison. better / worse: the adjusted t-test p and the adjusted sign-flip p are both
    below alpha (the t-test alone trusts normality that three to five seeds cannot check); equivalent: the adjusted
    TOST p is below alpha; else inconclusive, with the reason when it is structural."""
    if test.n < 2:
        return "inconclusive", f"{test.n} paired seed{'s' * (test.n != 1)}: at least 2 are needed"
    if test.constant:
        return "inconclusive", "the same difference at every seed: no variance to test"
    if p_t_adjusted < alpha and p_flip_adjusted < alpha:
        return ("better" if test.difference > 0 else "worse"), ""
    if p_equivalence_adjusted < alpha:
        return "equivalent", ""
    if p_t_adjusted < alpha:
        return "inconclusive", "the t-test alone finds a difference; the sign-flip test does not confirm it"
    return "inconclusive", ""
