"""Criteria agreement: for each pair of strategies, the per-layer Jaccard overlap of the filters they remove, at the
same seed and settings, beside the overlap two independent random choices of those sizes would have. Two criteria
that remove the same filters must tie. A layer counts when either strategy removed some of its channels; every conv
and Linear counts once, so the coupled convs of a residual stream (which lose the same channels) each count.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from scipy.stats import hypergeom

from sweep.config.arms import NO_CRITERION
from sweep.report.common import groups, markdown_table, save, text
from sweep.store.store import Store

# The artifact sweep.worker.trial writes (its REMOVED_FILE): {layer: {"width": n, "removed": [channel, ...]}}.
REMOVED_FILE = "removed.json"
Removed = dict[str, dict]
COLUMNS = ["seed", "strategy_a", "strategy_b", "layer", "width", "removed_a", "removed_b", "jaccard", "chance"]


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|A ∩ B| / |A ∪ B|; NaN when both are empty (nothing removed: no agreement to measure)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return len(a & b) / union if union else math.nan


def chance_jaccard(width: int, k_a: int, k_b: int, moment: int = 1) -> float:
    """E[J^moment] for two independent uniformly random subsets of sizes k_a and k_b of `width` items: their
    intersection is hypergeometric."""
    if k_a + k_b == 0:
        return math.nan
    i = np.arange(max(0, k_a + k_b - width), min(k_a, k_b) + 1)
    return float((hypergeom(width, k_a, k_b).pmf(i) * (i / (k_a + k_b - i)) ** moment).sum())


def agreement_table(runs: pd.DataFrame, keys: Sequence[str], removed: dict[str, Removed]) -> pd.DataFrame:
    """One row per (setting, seed, pair of strategies, layer): the Jaccard overlap of the two removed sets and its
    chance value. runs: run_id, strategy, seed and the `keys` columns, the settings two runs must share besides the
    seed; runs without an entry in `removed`, and runs of strategy none, are left out."""
    keys = [k for k in keys if k not in ("strategy", "seed")]
    runs = runs[runs["run_id"].isin(list(removed)) & runs["strategy"].astype(str).ne(NO_CRITERION)]
    rows = []
    for setting, group in groups(runs, [*keys, "seed"]):
        first = group.drop_duplicates("strategy")
        by_strategy = dict(zip(first["strategy"].astype(str), first["run_id"]))
        for a, b in combinations(sorted(by_strategy), 2):
            plan_a, plan_b = removed[by_strategy[a]], removed[by_strategy[b]]
            for layer in (name for name in plan_a if name in plan_b):
                gone_a, gone_b = plan_a[layer]["removed"], plan_b[layer]["removed"]
                if not gone_a and not gone_b:
                    continue
                width = int(plan_a[layer]["width"])
                rows.append({**setting, "strategy_a": a, "strategy_b": b, "layer": layer, "width": width,
                             "removed_a": len(gone_a), "removed_b": len(gone_b), "jaccard": jaccard(gone_a, gone_b),
                             "chance": chance_jaccard(width, len(gone_a), len(gone_b))})
    return pd.DataFrame(rows, columns=[*keys, *COLUMNS])


def agreement_means(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per (setting, pair): the mean Jaccard over layers and seeds, its chance value, how many of each."""
    keys = [k for k in keys if k in table and k not in ("strategy", "seed")]
    by = [*keys, "strategy_a", "strategy_b"]
    if table.empty:
        return pd.DataFrame(columns=[*by, "jaccard", "chance", "layers", "seeds"])
    return table.groupby(by, dropna=False, sort=True).agg(
        jaccard=("jaccard", "mean"), chance=("chance", "mean"), layers=("layer", "nunique"),
        seeds=("seed", "nunique")).reset_index()


def _matrices(means: pd.DataFrame, keys: Sequence[str]) -> list[tuple[str, pd.DataFrame, float]]:
    """Per setting: (title, strategy x strategy matrix of mean Jaccard, mean chance)."""
    keys = [k for k in keys if k in means and means[k].astype(str).nunique() > 1]
    out = []
    for setting, group in groups(means, keys):
        title = ", ".join(f"{k} {text(v)}" for k, v in setting.items())
        names = sorted(set(group["strategy_a"]) | set(group["strategy_b"]))
        matrix = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
        for row in group.itertuples():
            matrix.loc[row.strategy_a, row.strategy_b] = matrix.loc[row.strategy_b, row.strategy_a] = row.jaccard
        out.append((title, matrix, float(group["chance"].mean())))
    return out


def agreement_markdown(means: pd.DataFrame, keys: Sequence[str], missing: int = 0) -> list[str]:
    """The section of summary.md: one matrix per setting, with the chance overlap under it."""
    lines = ["## Criteria agreement (Jaccard overlap of the removed filters)", "",
             "Per layer, |A ∩ B| / |A ∪ B| of the output channels two strategies removed at the same seed and "
             "settings, averaged over layers and seeds (agreement.csv has every layer). 1: the same filters (the two "
             "must tie); chance: what two independent random choices of the same sizes would share.", ""]
    if missing:
        lines += [f"{missing} run(s) have no {REMOVED_FILE} (recorded by an older release) and are left out.", ""]
    for title, matrix, chance in _matrices(means, keys):
        shown = matrix.map(lambda v: f"{v:.2f}")
        shown.insert(0, "", matrix.index)
        lines += [f"**{title}**" if title else "", "", markdown_table(shown), "", f"Chance: {chance:.2f}.", ""]
    return lines


def plot_agreement(means: pd.DataFrame, keys: Sequence[str], path: str | Path) -> Path | None:
    """A heat map per setting: mean Jaccard of each pair of strategies, the chance value in its title."""
    panels = _matrices(means, keys)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    side = max(3.2, 0.55 * max(len(m) for _, m, _ in panels) + 1.6)
    fig = Figure(figsize=(side * cols + 1, side * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, matrix, chance) in zip(axes, panels):
        image = ax.imshow(matrix.to_numpy(float), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(matrix)), matrix.columns, rotation=45, ha="right")
        ax.set_yticks(range(len(matrix)), matrix.index)
        for (i, j), value in np.ndenumerate(matrix.to_numpy(float)):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
                    color="black" if value > 0.6 else "white")
        ax.set_title(f"{title + '; ' if title else ''}chance {chance:.2f}", fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[:len(panels)].tolist(), label="Jaccard of removed filters", shrink=0.8)
    return save(fig, path)


def load_removed(store: Store, run_ids: Iterable[str]) -> dict[str, Removed]:
    """Each run's removed.json; runs without one (older releases, the control arm) or with an unreadable one are
    left out."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="sweep-agreement-") as tmp:
        for run_id in run_ids:
            if REMOVED_FILE not in {a.path for a in store.list_artifacts(run_id)}:
                continue
            try:
                local = store.download_artifacts(run_id, REMOVED_FILE, f"{tmp}/{run_id}")
                out[run_id] = json.loads(Path(local).read_text(encoding="utf-8"))
            except (MlflowException, OSError, ValueError):
                continue
    return out


def write_agreement(runs: pd.DataFrame, keys: Sequence[str], store: Store, out: Path
                    ) -> tuple[dict[str, Path], list[str]] | None:
    """agreement.csv and agreement.png under `out`, and the summary.md section; None when no two strategies share
    a setting and seed (nothing to compare)."""
    runs = runs[runs["strategy"].astype(str).ne(NO_CRITERION)]
    if runs["strategy"].nunique() < 2:
        return None
    removed = load_removed(store, runs["run_id"])
    table = agreement_table(runs, keys, removed)
    if table.empty:
        return None
    means = agreement_means(table, keys)
    table.to_csv(out / "agreement.csv", index=False)
    # a table with a row has a setting to draw: plot_agreement gives None only for an empty one
    paths = {"agreement": out / "agreement.csv", "agreement_plot": plot_agreement(means, keys, out / "agreement.png")}
    return paths, agreement_markdown(means, keys, missing=len(runs) - len(removed))
