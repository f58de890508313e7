"""MLflow runs of a sweep -> a researcher's table: groups of like runs, statistics over seeds, paired verdicts, plots.

    runs = load_runs("quickstart")              # one row per trial run, every param and metric as a column
    table = summary_table(runs)                 # one row per setting, n seeds, mean / std / 95 % CI
    pairs = paired_table(runs, "random")        # each strategy against a reference over matching seeds
    write_report("quickstart")                  # summary.md, CSVs and plots, also logged to the parent run

Honest by construction: runs are grouped by *every* setting that differs between them (read from the logged
params), except the seed; a difference is called a win only when its 95 % confidence interval excludes zero;
accuracies are test accuracies (logged once per run, never used for selection); x axes are the reductions actually
achieved, not the nominal ratio. Units: accuracies and reductions are fractions in the data, percent in text and
plots; FLOPs count 2 per multiply-add (`macs` holds the multiply-adds).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
from mlflow.tracking import MlflowClient
from scipy import stats

from sweep.config.names import LEGACY_METRICS, METRICS
from sweep.errors import InputError
from sweep.report.analyses import write_analysis_report
from sweep.store import tracking

log = logging.getLogger(__name__)

STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
# Params that do not change what a run computes: the seed (what groups pool over) and how carefully latency is
# timed. Everything else splits groups, where-things-live included: a different dataset.root may be another dataset,
# and device, measure.batch_size and measure.threads change the latency itself.
NOT_SETTINGS = {"seed", "dataset.download", "measure.warmup", "measure.runs"}
ACCURACY = "test_accuracy"
# Fixed colour and marker per strategy, so a strategy looks the same in every figure of every sweep.
STYLES = {
    "random": ("tab:gray", "x"), "l1": ("tab:blue", "o"), "l2": ("tab:orange", "s"), "bn_scale": ("tab:green", "^"),
    "taylor": ("tab:red", "D"), "apoz": ("tab:purple", "v"), "fpgm": ("tab:brown", "P"),
}
_EXTRA_STYLES = [("tab:pink", "*"), ("tab:olive", "h"), ("tab:cyan", "<"), ("black", ">")]


class ReportError(InputError):
    """The store holds nothing to report (unknown experiment, no finished trial)."""


def _style(strategy: str, order: list[str]) -> tuple[str, str]:
    if strategy in STYLES:
        return STYLES[strategy]
    unknown = [s for s in order if s not in STYLES]
    return _EXTRA_STYLES[unknown.index(strategy) % len(_EXTRA_STYLES)]


# --- loading ----------------------------------------------------------------------------------------------------

def load_runs(experiment: str, tracking_uri: str | None = None, parent_run_id: str | None = None,
              status: str | None = "FINISHED") -> pd.DataFrame:
    """One row per trial run (child runs only; a config rerun with --force: its newest run); status=None: all.

    Columns: run_id, status, config_hash, every logged param (numeric ones as numbers), every metric of
    sweep.config.names.METRICS (runs of older releases are read through LEGACY_METRICS).
    """
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} is invalid: use one of {', '.join(STATUSES)} or None for all")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    if tracking.find_experiment_id(client, experiment) is None:
        raise ReportError(f"MLflow experiment {experiment!r} not found at {uri}: check the sweep name or "
                          "--tracking-uri")
    filters = [f"attributes.status = '{status}'"] if status else []
    if parent_run_id is not None:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    rows = []
    for run in tracking.child_runs(client, experiment, " and ".join(filters)):
        if not {"model", "strategy"} <= run.data.params.keys():  # no group to put it in: say so, do not guess
            log.warning("run %s left out of the report: it has no model or strategy param (a worker of an older "
                        "release killed before it logged them)", run.info.run_id)
            continue
        metrics = {LEGACY_METRICS.get(k, k): v for k, v in run.data.metrics.items()}
        rows.append({"run_id": run.info.run_id, "status": run.info.status, "config_hash": run.data.tags["config_hash"],
                     "start_time": run.info.start_time, **run.data.params,
                     **{name: metrics.get(name) for name in METRICS}})
    fixed = ["run_id", "status", "config_hash", "start_time", *METRICS]
    df = pd.DataFrame(rows)
    df = df.reindex(columns=[*fixed, *sorted(df.columns.difference(fixed))])
    for column in df.columns.difference(["run_id", "status", "config_hash"]):
        numbers = pd.to_numeric(df[column], errors="coerce")
        if numbers.notna().sum() == df[column].notna().sum():  # a numeric param (ratio, seed, lr): compare as numbers
            df[column] = numbers.astype(float)
    df = df.sort_values("start_time", ascending=False, kind="stable")
    df = df[~(df["status"].eq("FINISHED") & df.duplicated("config_hash"))]
    return df.drop(columns="start_time").reset_index(drop=True)


def settings(df: pd.DataFrame) -> list[str]:
    """The params that differ between runs (the seed and where-things-live excepted): what tells groups apart."""
    params = [c for c in df.columns if c not in METRICS and c not in ("run_id", "status", "config_hash")]
    varying = [c for c in params if c not in NOT_SETTINGS and df[c].astype(str).nunique(dropna=False) > 1]
    first = [c for c in ("model", "strategy") if c in df.columns]
    return first + [c for c in varying if c not in first]


# --- statistics -------------------------------------------------------------------------------------------------

def interval(values: pd.Series) -> tuple[float, float, float, int]:
    """(mean, std, half-width of the 95 % t interval, n) of the values present; the interval needs n >= 2."""
    v = values.dropna().to_numpy(float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, math.nan, 1
    std = float(v.std(ddof=1))
    return float(v.mean()), std, float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)), n


SUMMARY_METRICS = ["test_accuracy", "test_accuracy_drop", "pruned_test_accuracy", "flops_reduction",
                   "params_reduction", "channels_removed", "macs", "train_time_s", "speedup"]


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per group of like runs: n (seeds), and for each summary metric mean, std and 95 % CI half-width."""
    keys = settings(df)
    rows = []
    for values, group in df.groupby(keys, dropna=False, sort=True) if keys else [((), df)]:  # no setting differs
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["n"] = len(group)
        for name in SUMMARY_METRICS:
            mean, std, half, _ = interval(group[name])
            row.update({name: mean, f"{name}_std": std, f"{name}_ci95": half})
        row["run_ids"] = " ".join(sorted(group["run_id"]))
        rows.append(row)
    return pd.DataFrame(rows)


def paired_table(df: pd.DataFrame, reference: str = "random", metric: str = ACCURACY) -> pd.DataFrame:
    """Each strategy against `reference` in the same setting, paired by seed: mean difference with its 95 % CI.

    verdict is "better" / "worse" when the interval excludes 0, "tied" when it spans 0, "n/a" below 2 pairs.
    """
    keys = [k for k in settings(df) if k != "strategy"]
    rows = []
    for values, group in df.groupby(keys, dropna=False, sort=True) if keys else [((), df)]:
        # one value per seed on each side (runs that differ only in how latency was timed share a seed)
        ref = group[group["strategy"] == reference].groupby("seed")[metric].mean()
        for strategy, runs in group[group["strategy"] != reference].groupby("strategy"):
            diff = (runs.groupby("seed")[metric].mean() - ref).dropna()
            mean, _, half, n = interval(diff)
            if n < 2 or math.isnan(half):
                verdict = "n/a"
            else:
                verdict = "tied" if mean - half <= 0 <= mean + half else ("better" if mean > 0 else "worse")
            row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
            row.update(strategy=strategy, reference=reference, pairs=n, difference=mean, ci95=half, verdict=verdict,
                       flops_reduction=runs["flops_reduction"].mean())
            rows.append(row)
    return pd.DataFrame(rows)


def verdicts(pairs: pd.DataFrame) -> list[str]:
    """One line per setting: who beats the reference, by how much, and who is tied with it."""
    if pairs.empty:
        return []
    keys = [c for c in pairs.columns if c not in ("strategy", "reference", "pairs", "difference", "ci95", "verdict",
                                                  "flops_reduction")]
    lines = []
    for values, group in pairs.groupby(keys, dropna=False, sort=True) if keys else [((), pairs)]:
        where = ", ".join(f"{k} {_text(v)}" for k, v in zip(keys, values if isinstance(values, tuple) else (values,)))
        reference = group["reference"].iloc[0]
        parts = []
        for verdict, word in (("better", "beat"), ("worse", "lose to")):
            chosen = group[group["verdict"] == verdict]
            if len(chosen):
                names = " and ".join(chosen["strategy"])
                size = ", ".join(f"{s} {100 * abs(d):.1f} ± {100 * h:.1f}"
                                 for s, d, h in zip(chosen["strategy"], chosen["difference"], chosen["ci95"]))
                parts.append(f"{names} {word} {reference} ({size} points)")
        tied = group[group["verdict"] == "tied"]["strategy"].tolist()
        if tied:
            parts.append(f"{', '.join(tied)} tied with {reference}")
        unknown = group[group["verdict"] == "n/a"]["strategy"].tolist()
        if unknown:
            parts.append(f"{', '.join(unknown)}: too few paired seeds to tell")
        removed = group["flops_reduction"].mean()
        lines.append(f"{where} ({100 * removed:.0f} % FLOPs removed): " + "; ".join(parts))
    return lines


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- plots ------------------------------------------------------------------------------------------------------

def _series(table: pd.DataFrame) -> pd.Series:
    """A legend label per row: the strategy plus every other setting that varies, except the x-axis ones."""
    others = [k for k in settings_of(table) if k not in (*PANEL_KEYS, "strategy", "ratio")]
    label = table["strategy"].astype(str)
    for column in others:
        label = label + f" {column}=" + table[column].map(_text)
    return label


def settings_of(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ("n", "run_ids") and not c.startswith(tuple(SUMMARY_METRICS))]


PANEL_KEYS = ("model", "dataset")  # accuracies of different models, or of one on different tasks, share no scale


def _panels(table: pd.DataFrame) -> tuple[Figure, list[tuple[str, pd.DataFrame, Axes, dict]]]:
    """One panel per model and dataset: (title, the table's rows, axes, {column: value} that selects its runs)."""
    keys = [k for k in PANEL_KEYS if k in table]
    names = table[keys].astype(str)
    panels = sorted({tuple(row) for row in names.itertuples(index=False)})
    if not panels:
        raise ReportError("nothing to plot: no finished trials")
    fig = Figure(figsize=(6.8 * len(panels), 5.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    return fig, [(" on ".join(values), table[(names == values).all(axis=1)], ax, dict(zip(keys, values)))
                 for values, ax in zip(panels, axes)]


def _base_line(ax: Axes, runs: pd.DataFrame, where: dict) -> None:
    """The unpruned base of the runs of one panel."""
    for column, value in where.items():
        runs = runs[runs[column].astype(str) == value]
    base = runs["base_test_accuracy"].dropna()
    if len(base):
        ax.axhline(100 * base.mean(), color="black", linestyle="--", linewidth=1,
                   label=f"unpruned base ({100 * base.mean():.1f}%)")


def _finish_axes(ax: Axes, title: str, xlabel: str, ylabel: str = "Test top-1 accuracy (%)") -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith(("Pareto front", "unpruned base")))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize="x-small", framealpha=0.7)


_VARIANTS = [{"linestyle": "-"}, {"linestyle": "--", "mfc": "none"}, {"linestyle": ":"}, {"linestyle": "-.",
                                                                                         "mfc": "none"}]


def _errorbars(ax: Axes, rows: pd.DataFrame, x: str, y: str, label: str, order: list[str], variant: int = 0,
               **kw) -> None:
    """Means with 95 % CI (y) and std (x); a strategy's colour and marker, its k-th setting a line/fill variant."""
    colour, marker = _style(str(rows["strategy"].iloc[0]), order)
    rows = rows.sort_values(x)
    style = {**_VARIANTS[variant % len(_VARIANTS)], **kw}
    ax.errorbar(100 * rows[x], 100 * rows[y], yerr=100 * rows[f"{y}_ci95"].fillna(0),
                xerr=100 * rows[f"{x}_std"].fillna(0), color=colour, marker=marker, capsize=3, label=label, **style)


def _each_series(table: pd.DataFrame, sub: pd.DataFrame):
    """(label, rows, variant) per legend series of a panel; variant numbers the series of one strategy."""
    labels = _series(table)
    seen: dict[str, int] = {}
    for label in sorted(labels[sub.index].unique()):
        rows = sub[labels[sub.index] == label]
        strategy = str(rows["strategy"].iloc[0])
        seen[strategy] = seen.get(strategy, -1) + 1
        yield label, rows, seen[strategy]


def pareto_front(df: pd.DataFrame, x: str = "flops_reduction", y: str = ACCURACY) -> pd.Series:
    """True for rows no other row beats on both x and y (maximising both); rows missing x or y are never on it."""
    xs, ys = df[x].to_numpy(float), df[y].to_numpy(float)
    x_i, x_j, y_i, y_j = xs[:, None], xs[None, :], ys[:, None], ys[None, :]
    dominated_by = (x_j >= x_i) & (y_j >= y_i) & ((x_j > x_i) | (y_j > y_i))
    return pd.Series(~dominated_by.any(axis=1) & ~np.isnan(xs) & ~np.isnan(ys), index=df.index, name="pareto")


def plot_pareto(runs: pd.DataFrame, table: pd.DataFrame, path: str | Path) -> Path:
    """Mean test accuracy (95 % CI) against the mean FLOPs reduction achieved, with the Pareto front of means."""
    fig, panels = _panels(table)
    order = sorted(table["strategy"].astype(str).unique())
    for title, sub, ax, where in panels:
        for label, rows, variant in _each_series(table, sub):
            _errorbars(ax, rows, "flops_reduction", ACCURACY, label, order, variant, linestyle="none", alpha=0.9)
        front = sub[pareto_front(sub)].sort_values("flops_reduction")
        ax.step(100 * front["flops_reduction"], 100 * front[ACCURACY], where="pre", color="black", linewidth=1.2,
                alpha=0.6, label="Pareto front (means)")
        _base_line(ax, runs, where)
        _finish_axes(ax, f"{title}: accuracy vs FLOPs removed (mean, 95% CI)", "FLOPs removed (%), achieved")
    return _save(fig, path)


def plot_levels(runs: pd.DataFrame, table: pd.DataFrame, path: str | Path) -> Path:
    """Test accuracy at each pruning level, against the fraction of channels actually removed."""
    fig, panels = _panels(table)
    order = sorted(table["strategy"].astype(str).unique())
    for title, sub, ax, where in panels:
        for label, rows, variant in _each_series(table, sub):
            _errorbars(ax, rows, "channels_removed", ACCURACY, label, order, variant)
        _base_line(ax, runs, where)
        _finish_axes(ax, f"{title}: accuracy at each pruning level (mean, 95% CI)", "Channels removed (%), achieved")
    return _save(fig, path)


def plot_finetune(runs: pd.DataFrame, table: pd.DataFrame, path: str | Path) -> Path:
    """Accuracy right after pruning (dashed, hollow) and after training (solid): what fine-tuning recovers."""
    fig, panels = _panels(table)
    order = sorted(table["strategy"].astype(str).unique())
    for title, sub, ax, where in panels:
        before_drawn = set()
        for label, rows, variant in _each_series(table, sub):
            _errorbars(ax, rows, "flops_reduction", ACCURACY, f"{label}: trained", order, variant)
            strategy = str(rows["strategy"].iloc[0])
            if strategy not in before_drawn:  # before training, the arms and budgets are one and the same network
                before_drawn.add(strategy)
                _errorbars(ax, rows, "flops_reduction", "pruned_test_accuracy", f"{strategy}: right after pruning",
                           order, linestyle=(0, (1, 3)), mfc="none", alpha=0.6)
        _base_line(ax, runs, where)
        _finish_axes(ax, f"{title}: before vs after fine-tuning", "FLOPs removed (%), achieved")
    return _save(fig, path)


def plot_train_time(table: pd.DataFrame, path: str | Path) -> Path:
    """Wall-clock training time per trial by group (mean, 95 % CI; the lower bar stops at zero)."""
    labels = table["model"].astype(str) + " " + _series(table)
    if "ratio" in table:
        labels = labels + " ratio=" + table["ratio"].map(_text)
    mean, half = table["train_time_s"], table["train_time_s_ci95"].fillna(0)
    # Horizontal bars: a group's label names every setting that differs and can be long; the figure grows with
    # the longest label and the number of groups, so the axes keep their size.
    longest = int(labels.str.len().max()) if len(labels) else 0
    fig = Figure(figsize=(6.4 + 0.065 * longest, max(3.0, 0.32 * len(table) + 1.6)), layout="constrained")
    ax = fig.subplots()
    order = sorted(table["strategy"].astype(str).unique())
    colours = [_style(str(s), order)[0] for s in table["strategy"]]
    rows = range(len(table))[::-1]  # the table's first group on top
    bars = ax.barh(rows, mean, xerr=[np.minimum(half, mean), half], color=colours, capsize=3)
    ax.bar_label(bars, labels=[f" n={n}" for n in table["n"]], label_type="edge", fontsize="x-small")
    ax.set_yticks(rows, labels, fontsize="x-small")
    ax.set(title="Training time per trial (mean, 95% CI)", xlabel="Wall-clock time (s)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_layers(runs: pd.DataFrame, uri: str, path: str | Path) -> Path | None:
    """Channels kept per layer, one line per strategy, at the pruning level nearest half: which layers a criterion
    spares. Reads one run's channels.csv artifact per strategy (the first seed), of one model and dataset (the first
    by name): layers of different networks share no axis."""
    if "ratio" not in runs or runs["ratio"].isna().all():
        return None
    for column in (k for k in PANEL_KEYS if k in runs):
        runs = runs[runs[column].astype(str) == sorted(runs[column].astype(str).unique())[0]]
    level = runs.loc[(runs["ratio"] - 0.5).abs().idxmin(), "ratio"]
    chosen = runs[runs["ratio"] == level].sort_values("seed").groupby("strategy").head(1)
    client = MlflowClient(uri)
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    order = sorted(runs["strategy"].astype(str).unique())
    for _, run in chosen.iterrows():
        files = {a.path for a in tracking.with_retry(client.list_artifacts, run["run_id"])}
        if "channels.csv" not in files:  # runs of older releases have no table
            continue
        layers = pd.read_csv(tracking.with_retry(client.download_artifacts, run["run_id"], "channels.csv"))
        colour, marker = _style(str(run["strategy"]), order)
        ax.plot(range(len(layers)), 100 * layers["channels_after"] / layers["channels_before"], color=colour,
                marker=marker, markersize=4, label=str(run["strategy"]))
        ax.set_xticks(range(len(layers)), layers["layer"], rotation=90, fontsize="x-small")
    if not ax.lines:
        return None
    ax.set(title=f"Channels kept per layer at ratio {level:g} ({chosen['model'].iloc[0]})", ylabel="kept (%)",
           ylim=(0, 105))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# --- the written report -----------------------------------------------------------------------------------------

def _pm(mean: float, half: float, scale: float = 100, digits: int = 1) -> str:
    if pd.isna(mean):
        return "–"
    return f"{scale * mean:.{digits}f}" + ("" if pd.isna(half) else f" ± {scale * half:.{digits}f}")


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def summary_markdown(experiment: str, runs: pd.DataFrame, table: pd.DataFrame, pairs: pd.DataFrame,
                     reference: str) -> str:
    keys = settings_of(table)
    shown = table[keys].map(_text) if len(keys) else pd.DataFrame(index=table.index)
    shown["n"] = table["n"]
    for name, title in (("test_accuracy", "test acc %"), ("test_accuracy_drop", "drop (pp)"),
                        ("pruned_test_accuracy", "before fine-tune %"), ("flops_reduction", "FLOPs −%"),
                        ("params_reduction", "params −%"), ("channels_removed", "channels −%")):
        shown[title] = [_pm(m, h) for m, h in zip(table[name], table[f"{name}_ci95"])]
    shown["MACs (M)"] = [_pm(m, math.nan, 1e-6, 2) for m in table["macs"]]
    shown["train s"] = [_pm(m, h, 1, 1) for m, h in zip(table["train_time_s"], table["train_time_s_ci95"])]
    shown["speed-up ×"] = [_pm(m, math.nan, 1, 2) for m in table["speedup"]]
    base = runs["base_test_accuracy"].dropna()
    parts = [f"# Sweep `{experiment}`", "",
             f"{len(runs)} finished trials in {len(table)} groups; groups differ in: {', '.join(keys)}. "
             "Values are mean ± the half-width of a 95 % t interval over seeds (n); accuracies are test accuracies, "
             "logged once per run and never used for selection. FLOPs count 2 per multiply-add; MACs are "
             "multiply-adds.", ""]
    # Groups that differ in what the base is trained from have a base each; never one mean over all of them.
    base_keys = [k for k in keys if k in ("model", "weights", "dataset")
                 or k.startswith(("base.", "model.", "dataset."))]
    if len(base) and base_keys:
        per = runs.loc[base.index].groupby(base_keys, dropna=False, sort=True)["base_test_accuracy"].mean()
        named = [" ".join(map(str, k if isinstance(k, tuple) else (k,))) + f" {100 * v:.1f} %" for k, v in per.items()]
        parts += [f"Unpruned bases, test accuracy: {', '.join(named)}.", ""]
    elif len(base):
        parts += [f"Unpruned base: {100 * base.mean():.1f} % test accuracy.", ""]
    parts += ["## Groups", "", _markdown(shown), ""]
    if not pairs.empty:
        parts += [f"## Paired against `{reference}` (same seeds, same settings)", ""]
        parts += [f"- {line}" for line in verdicts(pairs)]
        parts += ["", "A difference counts only when its 95 % interval excludes zero; otherwise it is called tied.",
                  ""]
    return "\n".join(parts)


def write_report(experiment: str, tracking_uri: str | None = None, out_dir: str | Path = "reports",
                 reference: str = "random", log_to_parent: bool = True) -> dict[str, Path]:
    """Write runs.csv, summary.csv, paired.csv, summary.md and the plots; log them to the newest parent run."""
    uri = tracking.resolve_tracking_uri(tracking_uri)

    analysis = write_analysis_report(experiment, uri, out_dir)
    if analysis is not None:
        return analysis
    runs = load_runs(experiment, uri)
    if runs.empty:
        raise ReportError(f"MLflow experiment {experiment!r} has no finished trials yet: run the sweep first")
    table = summary_table(runs)
    pairs = paired_table(runs, reference) if reference in set(runs["strategy"]) else pd.DataFrame()
    out = Path(out_dir) / tracking.safe_name(experiment)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    table.to_csv(out / "summary.csv", index=False)
    pairs.to_csv(out / "paired.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(experiment, runs, table, pairs, reference), encoding="utf-8")
    paths = {"runs": out / "runs.csv", "summary_csv": out / "summary.csv", "paired": out / "paired.csv",
             "summary": out / "summary.md",
             "pareto": plot_pareto(runs, table, out / "pareto.png"),
             "levels": plot_levels(runs, table, out / "levels.png"),
             "finetune": plot_finetune(runs, table, out / "finetune.png"),
             "train_time": plot_train_time(table, out / "train_time.png")}
    layers = plot_layers(runs, uri, out / "layers.png")
    if layers is not None:
        paths["layers"] = layers
    if log_to_parent:
        client = MlflowClient(uri)
        parent = tracking.newest_parent_run(client, experiment)
        if parent is not None:
            for path in paths.values():
                tracking.with_retry(client.log_artifact, parent, str(path), "report")
    return paths
