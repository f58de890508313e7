"""MLflow runs of a sweep -> a researcher's table: groups of like runs, statistics over seeds, paired verdicts, plots
(docs/comparing.md shows the calls). Runs are grouped by every setting that differs between them but the seed;
accuracies are test accuracies (never used for selection); x axes are the reductions achieved, not the nominal ratio.
Accuracies and reductions are fractions in the data, percent in text and plots; FLOPs count 2 per multiply-add (`macs`:
the multiply-adds).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.exceptions import MlflowException
from scipy.stats import t as student_t

from sweep.config.arms import CONTROL
from sweep.config.names import LEGACY_METRICS, METRICS
from sweep.config.schema import ReportConfig, report_rules
from sweep.errors import InputError
from sweep.report import stats
from sweep.report.agreement import write_agreement
from sweep.report.analyses import write_analysis_report
from sweep.report.common import groups, markdown_table, save, text
from sweep.store import tracking
from sweep.store.store import Store, StoreLike

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
    "taylor": ("tab:red", "D"), "apoz": ("tab:purple", "v"), "fpgm": ("tab:brown", "P"), "oracle": ("black", "*"),
}
_EXTRA_STYLES = [("tab:pink", "*"), ("tab:olive", "h"), ("tab:cyan", "<"), ("black", ">")]
SUMMARY_METRICS = ["test_accuracy", "test_accuracy_drop", "pruned_test_accuracy", "flops_reduction",
                   "params_reduction", "channels_removed", "macs", "train_time_s", "speedup"]
# Prune settings: what a control run (the unpruned base fine-tuned with the same recipe) does not share with the
# pruned runs it is paired with. Logged under their short names (sweep.config.names.PARAMS) or as prune.*.
_PRUNE_PARAMS = {"strategy", "ratio", "scope", "target", "schedule", "steps", "arm"}
PANEL_KEYS = ("model", "dataset")  # accuracies of different models, or of one on different tasks, share no scale
LEAK_POINTS = 3.0  # a base's validation accuracy this far above its test accuracy is worth a warning
CURVES = ("train_loss", "val_loss")
FLAGS = {"references": "--reference"} | {k: f"--{k}" for k in ("family", "alpha", "correction", "margin", "metric")}
_POST_HOC = " (post hoc)"
_VARIANTS = [{"linestyle": "-"}, {"linestyle": "--", "mfc": "none"}, {"linestyle": ":"},
             {"linestyle": "-.", "mfc": "none"}]
# kind: (x column, title, x label)
ACCURACY_PLOTS = {
    "pareto": ("flops_reduction", "accuracy vs FLOPs removed (mean, 95% CI)", "FLOPs removed (%), achieved"),
    "levels": ("channels_removed", "accuracy at each pruning level (mean, 95% CI)", "Channels removed (%), achieved"),
    "finetune": ("flops_reduction", "before vs after fine-tuning", "FLOPs removed (%), achieved"),
}


class ReportError(InputError):
    """The store holds nothing to report (unknown experiment, no finished trial)."""


def _style(strategy: str, order: list[str]) -> tuple[str, str]:
    if strategy in STYLES:
        return STYLES[strategy]
    unknown = [s for s in order if s not in STYLES]
    return _EXTRA_STYLES[unknown.index(strategy) % len(_EXTRA_STYLES)]


def load_runs(experiment: str, tracking_uri: str | None = None, parent_run_id: str | None = None,
              status: str | None = "FINISHED") -> pd.DataFrame:
    """One row per trial run (a config rerun with --force: its newest run; status=None: all): run_id, status,
    config_hash, every param (numeric ones as numbers), every metric of METRICS (older names: LEGACY_METRICS)."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} is invalid: use one of {', '.join(STATUSES)} or None for all")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    store = Store(uri)
    if store.experiment_id(experiment) is None:
        raise ReportError(f"MLflow experiment {experiment!r} not found at {uri}: check the sweep name or "
                          "--tracking-uri")
    filters = [f"attributes.status = '{status}'"] if status else []
    if parent_run_id is not None:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    rows = []
    # a run a forced rerun of its config replaced (tag sweep.superseded_by) is kept in the store, never reported
    for run in tracking.current(tracking.child_runs(store, experiment, " and ".join(filters))):
        if not {"model", "strategy"} <= run.data.params.keys():  # no group to put it in: say so, do not guess
            log.warning("run %s left out of the report: it has no model or strategy param (a worker of an older "
                        "release killed before it logged them)", run.info.run_id)
            continue
        metrics = {LEGACY_METRICS.get(k, k): v for k, v in run.data.metrics.items()}
        params = dict(run.data.params)
        for section in ("model", "dataset"):  # a plug-in run of an older release logged its name as "None"
            if params.get(section) == "None" and params.get(f"{section}.factory") not in (None, "None"):
                params[section] = params[f"{section}.factory"]
        rows.append({"run_id": run.info.run_id, "status": run.info.status, "config_hash": run.data.tags["config_hash"],
                     "start_time": run.info.start_time, **params,
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


def read_runs_csv(path: str | Path) -> pd.DataFrame:
    """The runs.csv an earlier report wrote, as load_runs gives it (metrics of older releases renamed)."""
    try:
        runs = pd.read_csv(path)
    except (OSError, pd.errors.ParserError) as error:
        raise ReportError(f"--runs-csv {path}: cannot be read ({error}); give a runs.csv that `sweep report` "
                          "wrote") from None
    runs = runs.rename(columns={k: v for k, v in LEGACY_METRICS.items() if v not in runs})
    missing = [c for c in ("run_id", "model", "strategy", "seed") if c not in runs]
    if missing:
        raise ReportError(f"--runs-csv {path}: no column {missing[0]}; give a runs.csv that `sweep report` wrote")
    return runs.reindex(columns=[*runs.columns, *(m for m in METRICS if m not in runs)])


def settings(df: pd.DataFrame) -> list[str]:
    """The params that differ between runs (the seed and where-things-live excepted): what tells groups apart."""
    varying = _varying(df, [c for c in df.columns if c not in (*METRICS, *NOT_SETTINGS, "run_id", "status",
                                                                 "config_hash")])
    first = [c for c in ("model", "strategy") if c in df.columns]
    return first + [c for c in varying if c not in first]


def interval(values: pd.Series) -> tuple[float, float, float, int]:
    """(mean, std, half-width of the 95 % t interval, n) of the values present; the interval needs n >= 2."""
    v = values.dropna().to_numpy(float)
    n = len(v)
    if n < 2:
        return (float(v[0]) if n else math.nan), math.nan, math.nan, n
    std = float(v.std(ddof=1))
    return float(v.mean()), std, float(student_t.ppf(0.975, n - 1) * std / math.sqrt(n)), n


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per group of like runs: n (seeds), and for each summary metric mean, std and 95 % CI half-width."""
    rows = []
    for setting, group in groups(df, settings(df)):
        row = {**setting, "n": len(group)}
        for name in SUMMARY_METRICS:
            mean, std, half, _ = interval(group[name])
            row.update({name: mean, f"{name}_std": std, f"{name}_ci95": half})
        rows.append(row | {"run_ids": " ".join(sorted(group["run_id"]))})
    return pd.DataFrame(rows)


def _is_control(df: pd.DataFrame) -> pd.Series:
    return df["arm"].astype(str).eq(CONTROL) if "arm" in df else pd.Series(False, index=df.index)


def _order(strategies) -> list[str]:
    """Strategies in the fixed order of STYLES (random first), others after by name: a pair reads later vs earlier,
    so random is always the side compared with."""
    known = [s for s in STYLES if s in set(strategies)]
    return known + sorted(set(map(str, strategies)) - set(known))


def _comparisons(strategies, config: ReportConfig) -> list[tuple[str, str]]:
    """(strategy, compared with) for each comparison of the family among the strategies present."""
    order = _order(strategies)
    references = [r for r in config.references if r in order]
    if config.resolved_family() == "references":
        pairs = []
        for reference in references:
            pairs += [(s, reference) for s in order if s != reference and (reference, s) not in pairs]
        return pairs
    # all pairs: later vs earlier, except that a reference is the side compared with, whatever the order
    return [(earlier, later) if later in references and earlier not in references else (later, earlier)
            for i, later in enumerate(order) for earlier in order[:i]]


def as_config(config: ReportConfig | str | list | None) -> ReportConfig:
    """A ReportConfig from one (a reference's name, a list of them, or None: the defaults, all pairs)."""
    if isinstance(config, ReportConfig):
        return config
    references = [config] if isinstance(config, str) else list(config or [])
    return ReportConfig.from_dict({"references": references}, where="report")


def paired_table(df: pd.DataFrame, config: ReportConfig | str | list | None = None,
                 post_hoc: frozenset[str] | set[str] = frozenset()) -> pd.DataFrame:
    """Every comparison of the declared family (config: see as_config), paired by seed within each setting, with its
    verdict; columns as docs/analyses.md "Reading a verdict" lists them. Control runs: see control_table."""
    config = as_config(config)
    metric, margin = config.metric, config.margin / 100
    runs = df[~_is_control(df)]
    keys = [k for k in settings(runs) if k != "strategy"]
    rows, tests = [], []
    for setting, group in groups(runs, keys):
        # one value per seed and strategy (runs that differ only in how latency was timed share a seed)
        per_seed = group.groupby(["seed", "strategy"])[metric].mean().unstack("strategy")
        for strategy, reference in _comparisons(per_seed.columns, config):
            both = per_seed[[strategy, reference]].dropna()
            test = stats.paired(both[strategy].to_numpy(), both[reference].to_numpy(), margin)
            tests.append(test)
            rows.append({**setting, "strategy": strategy, "reference": reference, "post_hoc": reference in post_hoc,
                         "pairs": test.n, "difference": test.difference, "ci_low": test.ci_low,
                         "ci_high": test.ci_high, "ci95": (test.ci_high - test.ci_low) / 2, "sd": test.sd,
                         "p": test.p_t, "p_sign_flip": test.p_sign_flip, "p_equivalence": test.p_equivalence,
                         "flops_reduction": group.loc[group["strategy"] == strategy, "flops_reduction"].mean()})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for column in ("p", "p_sign_flip", "p_equivalence"):
        table[f"{column}_adjusted"] = stats.adjust(table[column], config.correction)
    lone = stats.level(config.alpha, config.correction, len(table))
    for column, sign_flip in (("detectable", True), ("detectable_t", False)):
        table[column] = [stats.detectable(t.sd, t.n, lone, sign_flip=sign_flip) for t in tests]
    table["verdict"], table["why"] = zip(*(
        stats.outcome(test, row.p_adjusted, row.p_sign_flip_adjusted, row.p_equivalence_adjusted, config.alpha)
        for test, row in zip(tests, table.itertuples(index=False))))
    return table


def control_table(df: pd.DataFrame, metric: str = ACCURACY) -> pd.DataFrame:
    """Each group of pruned runs against the unpruned control (arm `control`), paired by seed: the control shares every
    setting but the prune ones. Columns: the settings, pairs, difference (pruned - control), ci95; empty without one."""
    control = _is_control(df)
    if not control.any():
        return pd.DataFrame()
    keys = settings(df[~control])
    shared = [k for k in keys if k not in _PRUNE_PARAMS and not k.startswith("prune.")]
    controls = df[control]
    rows = []
    for where, group in groups(df[~control], keys):
        match = controls[(controls[shared].astype(str) == [str(where[k]) for k in shared]).all(axis=1)]
        diff = (group.groupby("seed")[metric].mean() - match.groupby("seed")[metric].mean()).dropna()
        mean, _, half, n = interval(diff)
        rows.append({**where, "pairs": n, "difference": mean, "ci95": half})
    return pd.DataFrame(rows)


def _unset(value) -> bool:
    """NaN (no such param) or null in the spec (logged as the text None)."""
    return pd.isna(value) or value == "None"


def _where(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k} {text(row[k])}" for k in keys if not _unset(row[k])) or "all runs"


def _varying(table: pd.DataFrame, keys) -> list[str]:
    return [k for k in keys if k in table and table[k].astype(str).nunique(dropna=False) > 1]


def _points(value: float, sign: bool = False) -> str:
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def _compared(row) -> str:
    return f"{row.strategy} vs {row.reference}{_POST_HOC if row.post_hoc else ''}"


def verdict_line(row) -> str:
    """One comparison in words: outcome, difference with its 95 % CI, raw and adjusted p, what it could detect."""
    head = f"{_compared(row)}: **{row.verdict}**"
    if row.pairs < 2 or pd.isna(row.difference):
        return f"{head} ({row.why})"
    ci = "at every seed" if pd.isna(row.ci_low) else f"(95 % CI {_points(row.ci_low, True)} to " \
                                                     f"{_points(row.ci_high, True)})"
    size = f"{_points(row.difference, sign=True)} points {ci}"
    p = lambda value: "–" if pd.isna(value) else f"{value:.2g}" if value >= 0.001 else "< 0.001"
    tests = f"p {p(row.p)}, adjusted {p(row.p_adjusted)}; sign-flip p {p(row.p_sign_flip)}, adjusted " \
            f"{p(row.p_sign_flip_adjusted)}"
    detectable = ("detectable: – (no SD to estimate it from)" if pd.isna(row.detectable) else
                  f"detectable: none at n {row.pairs}" if math.isinf(row.detectable) else
                  f"detectable ≥ {_points(row.detectable)} points")
    why = f"; {row.why}" if row.why else ""
    return f"{head}, {size}, n {row.pairs}; {tests}; {detectable}{why}"


def verdicts(pairs: pd.DataFrame) -> list[str]:
    """Markdown: a heading per setting (only what differs between settings), then one line per comparison."""
    if pairs.empty:
        return []
    keys = _settings_of_pairs(pairs)
    lines = []
    for _, group in groups(pairs, keys):
        removed = group["flops_reduction"].mean()
        share = "" if pd.isna(removed) else f" ({100 * removed:.0f} % FLOPs removed)"
        lines += [f"**{_where(group.iloc[0], keys)}**{share}", "",
                  *(f"- {verdict_line(row)}" for row in group.itertuples(index=False)), ""]
    return lines


def _settings_of_pairs(pairs: pd.DataFrame) -> list[str]:
    return _varying(pairs, pairs.columns[:pairs.columns.get_loc("strategy")])  # paired_table puts them first


def significance_counts(pairs: pd.DataFrame, alpha: float = 0.05) -> dict[str, int]:
    """How many of the family's t-test p-values are below alpha raw, after Holm and after Benjamini-Hochberg."""
    p = pairs["p"] if len(pairs) else pd.Series(dtype=float)
    return {"comparisons": len(p), "raw": int((p < alpha).sum()),
            **{name: int((stats.adjust(p, name) < alpha).sum()) for name in ("holm", "bh")}}


def _plan(pairs: pd.DataFrame, delta_points: float, config: ReportConfig) -> list[str]:
    """The section of summary.md: per setting, the seeds each comparison needs to detect delta points."""
    lone = stats.level(config.alpha, config.correction, len(pairs))
    keys = _settings_of_pairs(pairs)
    lines = [f"## Seeds needed to detect {delta_points:g} points", "",
             f"With 80 % power at level {lone:.2g} (alpha {config.alpha:g}, "
             f"{stats.CORRECTION_NAMES[config.correction]} over {len(pairs)} comparisons), from each comparison's "
             "observed paired SD; at least as many as the sign-flip test needs to reach that level:", ""]
    for _, group in groups(pairs, keys):
        parts = []
        for row in group.itertuples(index=False):
            need = stats.seeds_needed(row.sd, delta_points / 100, lone)
            parts.append(f"{_compared(row)} {need} (paired SD {_points(row.sd)} points)" if need is not None
                         else f"{_compared(row)} – (no paired SD yet: run at least 2 seeds with different outcomes)")
        lines.append(f"- {_where(group.iloc[0], keys)}: " + "; ".join(parts))
    return lines + [""]


def _series(table: pd.DataFrame) -> pd.Series:
    """A legend label per row: the strategy plus every other setting that varies, except the x-axis ones."""
    others = [k for k in settings_of(table) if k not in (*PANEL_KEYS, "strategy", "ratio")]
    label = table["strategy"].astype(str)
    for column in others:
        label = label + f" {column}=" + table[column].map(text)
    return label


def settings_of(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ("n", "run_ids") and not c.startswith(tuple(SUMMARY_METRICS))]


def plot_accuracy(runs: pd.DataFrame, table: pd.DataFrame, path: str | Path, kind: str) -> Path:
    """Each group's mean test accuracy (95 % CI), a panel per model and dataset with its unpruned bases. pareto: against
    the FLOPs reduction achieved, with the Pareto front of means; levels: against the channels removed; finetune: also
    the accuracy right after pruning (dotted, hollow): what fine-tuning recovers. Fronts and bases close the legend."""
    x, title, xlabel = ACCURACY_PLOTS[kind]
    keys = [k for k in PANEL_KEYS if k in table]
    names = table[keys].astype(str)
    panels = sorted({tuple(row) for row in names.itertuples(index=False)})
    if not panels:
        raise ReportError("nothing to plot: no finished trials")
    fig = Figure(figsize=(6.8 * len(panels), 5.0), layout="constrained")
    order = sorted(table["strategy"].astype(str).unique())
    series = _series(table)
    for values, ax in zip(panels, fig.subplots(1, len(panels), squeeze=False)[0]):
        sub = table[(names == values).all(axis=1)]
        variants: dict[str, int] = {}  # a strategy's k-th series in the panel: its k-th line/fill variant
        for label in sorted(series[sub.index].unique()):
            rows = sub[series[sub.index] == label]
            strategy = str(rows["strategy"].iloc[0])
            variants[strategy] = variants.get(strategy, -1) + 1
            _errorbars(ax, rows, x, ACCURACY, f"{label}: trained" if kind == "finetune" else label, order,
                       variants[strategy], **({"linestyle": "none", "alpha": 0.9} if kind == "pareto" else {}))
            if kind == "finetune" and not variants[strategy]:  # before training, the arms and budgets are one network
                _errorbars(ax, rows, x, "pruned_test_accuracy", f"{strategy}: right after pruning", order,
                           linestyle=(0, (1, 3)), mfc="none", alpha=0.6)
        if kind == "pareto":
            front = sub[pareto_front(sub)].sort_values(x)
            ax.step(100 * front[x], 100 * front[ACCURACY], where="pre", color="black", linewidth=1.2, alpha=0.6,
                    label="Pareto front (means)")
        _base_line(ax, runs, dict(zip(keys, values)))
        ax.set(title=f"{' on '.join(values)}: {title}", xlabel=xlabel, ylabel="Test top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        last = sorted(range(len(labels)), key=lambda i: labels[i].startswith(("Pareto front", "unpruned base")))
        ax.legend([handles[i] for i in last], [labels[i] for i in last], fontsize="x-small", framealpha=0.7)
    return save(fig, path)


def _base_line(ax: Axes, runs: pd.DataFrame, where: dict) -> None:
    """One line per unpruned base of the panel's runs (named by its settings that differ), never a mean over bases."""
    for column, value in where.items():
        runs = runs[runs[column].astype(str) == value]
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for i, (setting, group) in enumerate(_per_base(runs)):
        mean = 100 * group["base_test_accuracy"].mean()
        named = " ".join(f"{k}={text(v)}" for k, v in setting.items())
        ax.axhline(mean, color="black", linestyle=styles[i % len(styles)], linewidth=1,
                   label=f"unpruned base{' ' + named if named else ''} ({mean:.1f}%)")


def _per_base(runs: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """The runs with a base accuracy, one group per base: by the base settings (worker.base.BASE_KEYS) that differ."""
    runs = runs[runs["base_test_accuracy"].notna()]
    keys = [k for k in settings(runs) if k in ("model", "weights", "dataset") or k.startswith(("base.", "model.",
                                                                                               "dataset."))]
    return list(groups(runs, _varying(runs, keys)))


def _errorbars(ax: Axes, rows: pd.DataFrame, x: str, y: str, label: str, order: list[str], variant: int = 0,
               **kw) -> None:
    """Means with 95 % CI (y) and std (x); a strategy's colour and marker, its k-th setting a line/fill variant."""
    colour, marker = _style(str(rows["strategy"].iloc[0]), order)
    rows = rows.sort_values(x)
    style = {**_VARIANTS[variant % len(_VARIANTS)], **kw}
    ax.errorbar(100 * rows[x], 100 * rows[y], yerr=100 * rows[f"{y}_ci95"].fillna(0),
                xerr=100 * rows[f"{x}_std"].fillna(0), color=colour, marker=marker, capsize=3, label=label, **style)


def pareto_front(df: pd.DataFrame, x: str = "flops_reduction", y: str = ACCURACY) -> pd.Series:
    """True for rows no other row beats on both x and y (maximising both); rows missing x or y are never on it."""
    xs, ys = df[x].to_numpy(float), df[y].to_numpy(float)
    x_i, x_j, y_i, y_j = xs[:, None], xs[None, :], ys[:, None], ys[None, :]
    dominated_by = (x_j >= x_i) & (y_j >= y_i) & ((x_j > x_i) | (y_j > y_i))
    return pd.Series(~dominated_by.any(axis=1) & ~np.isnan(xs) & ~np.isnan(ys), index=df.index, name="pareto")


def plot_train_time(table: pd.DataFrame, path: str | Path) -> Path:
    """Wall-clock training time per trial by group (mean, 95 % CI; the lower bar stops at zero)."""
    labels = table["model"].astype(str) + " " + _series(table)
    if "ratio" in table:
        labels = labels + " ratio=" + table["ratio"].map(text)
    mean, half = table["train_time_s"], table["train_time_s_ci95"].fillna(0)
    # horizontal bars, the figure growing with the longest label and the number of groups: the axes keep their size
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
    return save(fig, path)


def plot_layers(runs: pd.DataFrame, store: Store, path: str | Path) -> Path | None:
    """Channels kept per layer, one line per strategy, at the pruning level nearest half: which layers a criterion
    spares. One run's channels.csv per strategy (the first seed), of the first model and dataset by name."""
    if "ratio" not in runs or runs["ratio"].isna().all():
        return None
    for column in (k for k in PANEL_KEYS if k in runs):
        runs = runs[runs[column].astype(str) == sorted(runs[column].astype(str).unique())[0]]
    level = runs.loc[(runs["ratio"] - 0.5).abs().idxmin(), "ratio"]
    chosen = runs[runs["ratio"] == level].sort_values("seed").groupby("strategy").head(1)
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    order = sorted(runs["strategy"].astype(str).unique())
    for _, run in chosen.iterrows():
        if "channels.csv" not in {a.path for a in store.list_artifacts(run["run_id"])}:  # older releases: no table
            continue
        with tempfile.TemporaryDirectory() as tmp:
            layers = pd.read_csv(store.download_artifacts(run["run_id"], "channels.csv", tmp))
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
    return save(fig, path)


def loss_curves(runs: pd.DataFrame, store: Store) -> pd.DataFrame:
    """Each group's fine-tune losses by epoch, mean over its seeds (MLflow's per-epoch history of every run):
    columns group, metric, epoch, mean, n. Empty when no run logged a history (older releases)."""
    keys = [k for k in settings(runs) if k not in PANEL_KEYS]
    rows = []
    for where, group in groups(runs, keys):
        label = " ".join(f"{k}={text(v)}" for k, v in where.items())
        for metric in CURVES:
            history = pd.DataFrame([(h.step, h.value) for run_id in group["run_id"]
                                    for h in store.get_metric_history(run_id, metric)], columns=["epoch", "value"])
            for epoch, values in history.groupby("epoch"):
                rows.append((label, metric, epoch, values["value"].mean(), len(values)))
    return pd.DataFrame(rows, columns=["group", "metric", "epoch", "mean", "n"])


def plot_curves(runs: pd.DataFrame, store: Store, path: str | Path) -> Path | None:
    """Training and validation loss per fine-tune epoch, one line per group: did the fine-tune learn?"""
    curves = loss_curves(runs, store)
    if curves.empty:
        return None
    fig = Figure(figsize=(12, 4.8 + 0.1 * curves["group"].nunique()), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), CURVES):
        for label, line in curves[curves["metric"] == metric].groupby("group", sort=False):
            ax.plot(line["epoch"], line["mean"], marker=".", label=label)
        ax.set(title=f"{metric} per epoch (mean over seeds)", xlabel="fine-tune epoch", ylabel=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="x-small")
    return save(fig, path)


def _pm(mean: float, half: float, scale: float = 100, digits: int = 1) -> str:
    if pd.isna(mean):
        return "–"
    return f"{scale * mean:.{digits}f}" + ("" if pd.isna(half) else f" ± {scale * half:.{digits}f}")


def _bases(runs: pd.DataFrame) -> list[str]:
    """One "<what> NN.N %" per unpruned base, named by the base settings that differ (but those it lacks)."""
    if runs["base_test_accuracy"].isna().all():
        return []
    per = [(setting, group["base_test_accuracy"].mean()) for setting, group in _per_base(runs)]
    if len(per) == 1:
        return [f"Unpruned base: {100 * per[0][1]:.1f} % test accuracy.", ""]
    named = [" ".join(text(v) if k in ("model", "dataset") else f"{k} {text(v)}" for k, v in setting.items()
                      if not _unset(v)) + f" {100 * mean:.1f} %" for setting, mean in per]
    return [f"Unpruned bases, test accuracy: {', '.join(named)}.", ""]


def leak_warnings(runs: pd.DataFrame) -> list[str]:
    """A warning per base (told apart by the base settings that differ) whose validation accuracy, mean over its
    seeds, exceeds its test accuracy by more than LEAK_POINTS: its validation images may be memorised ones."""
    lines = []
    for setting, group in _per_base(runs.dropna(subset=["base_val_accuracy"])):
        val, test = 100 * group["base_val_accuracy"].mean(), 100 * group["base_test_accuracy"].mean()
        if val - test > LEAK_POINTS:
            named = " ".join(f"{k} {text(v)}" for k, v in setting.items())
            lines.append(f"**Warning:** the unpruned base{' (' + named + ')' if named else ''} scores {val:.1f} % on "
                         f"validation but {test:.1f} % on test ({val - test:.1f} points more): its validation images "
                         "may be ones its weights were trained on, and selection by val_accuracy would read memorised "
                         "images. Declare the data the weights were trained on (`trained_on`, docs/analyses.md "
                         "\"Controls and validation\") so that validation is carved from the test split.")
    return [*lines, ""] if lines else []


def _family_text(pairs: pd.DataFrame, config: ReportConfig, changed: list[str]) -> list[str]:
    """The paragraph that says what was compared and how it was corrected, before any verdict."""
    m = len(pairs)
    correction = stats.CORRECTION_NAMES[config.correction]
    margin = f"{config.margin:.1f}" if round(config.margin, 1) == config.margin else f"{config.margin:g}"
    head = f"{correction} over {m} comparison{'s' * (m != 1)}, alpha {config.alpha:g}, margin {margin} points"
    if config.resolved_family() == "references":
        names = " and ".join(f"{r}{_POST_HOC if r in set(pairs['reference'][pairs['post_hoc']]) else ''}"
                             for r in config.references)
        family = f"each strategy against {names}, paired by seed within each setting"
    else:
        family = "every pair of strategies, paired by seed within each setting"
    lines = [f"## Verdicts: {head}", "", f"Compared on {config.metric}: {family}."]
    if changed:
        lines.append(f"**Post hoc:** {', '.join(changed)} chosen at report time, after the runs, not declared in the "
                     "spec's `report:` block; read these verdicts as exploration, not as the test planned.")
    if config.correction == "none":
        lines.append(f"**Warning: no correction for {m} comparisons.** At alpha {config.alpha:g} about "
                     f"{config.alpha * m:.1f} of them would come out better or worse by chance alone.")
    counts = significance_counts(pairs, config.alpha)
    lines += ["", f"A comparison is **better** or **worse** only when its paired t-test and its exact sign-flip test "
              f"are both below alpha {'without correction' if config.correction == 'none' else 'after ' + correction}; "
              f"**equivalent** when two one-sided tests put the difference within ±{margin} points; "
              "otherwise **inconclusive** (could not tell, not tied). Differences are in accuracy points, with "
              "their 95 % interval; \"detectable\" is the difference this comparison finds 80 % of the time. "
              f"T-test p < {config.alpha:g}: {counts['raw']} of {m} uncorrected, {counts['holm']} after Holm, "
              f"{counts['bh']} after Benjamini-Hochberg."]
    lone = stats.level(config.alpha, config.correction, m)
    few = sorted(set(pairs.loc[np.isinf(pairs["detectable"].astype(float)), "pairs"]))
    if few:
        lines.append(f"With {' or '.join(map(str, few))} paired seeds the exact sign-flip test cannot give a p below "
                     f"{stats.smallest_sign_flip_p(max(few)):.2g}, so no comparison there can be better or worse "
                     f"(\"detectable: none\"): under this correction a comparison's p must reach {lone:.2g}, which "
                     f"takes {stats.seeds_for_sign_flip(lone)} seeds; `sweep report NAME --plan POINTS` says how many "
                     "each comparison needs.")
    return lines + [""]


def summary_markdown(experiment: str, runs: pd.DataFrame, table: pd.DataFrame, pairs: pd.DataFrame,
                     config: ReportConfig | str | list | None = None, changed: list[str] | None = None,
                     control: pd.DataFrame | None = None, plan: float | None = None) -> str:
    """summary.md: the groups, the bases, the verdicts with the family's correction, the control, the plan; changed:
    what was chosen at report time rather than declared (each named as post hoc)."""
    config = as_config(config)
    keys = settings_of(table)
    differ = _varying(table, keys)
    shown = table[keys].map(lambda v: "–" if _unset(v) else text(v)) if len(keys) else pd.DataFrame(index=table.index)
    shown["n"] = table["n"]
    for name, title in (("test_accuracy", "test acc %"), ("test_accuracy_drop", "drop (pp)"),
                        ("pruned_test_accuracy", "before fine-tune %"), ("flops_reduction", "FLOPs −%"),
                        ("params_reduction", "params −%"), ("channels_removed", "channels −%")):
        shown[title] = [_pm(m, h) for m, h in zip(table[name], table[f"{name}_ci95"])]
    shown["MACs (M)"] = [_pm(m, math.nan, 1e-6, 2) for m in table["macs"]]
    shown["train s"] = [_pm(m, h, 1, 1) for m, h in zip(table["train_time_s"], table["train_time_s_ci95"])]
    shown["speed-up ×"] = [_pm(m, math.nan, 1, 2) for m in table["speedup"]]
    parts = [f"# Sweep `{experiment}`", "",
             f"{len(runs)} finished trials in {len(table)} groups; groups differ in: "
             f"{', '.join(differ) or 'nothing (one group)'}. "
             "Values are mean ± the half-width of a 95 % t interval over seeds (n); accuracies are test accuracies, "
             "logged once per run and never used for selection. FLOPs count 2 per multiply-add; MACs are "
             "multiply-adds.", "", *_bases(runs), *leak_warnings(runs), "## Groups", "", markdown_table(shown), ""]
    if not pairs.empty:
        parts += [*_family_text(pairs, config, changed or []), *verdicts(pairs),
                  *(_plan(pairs, plan, config) if plan is not None else [])]
    if control is not None and not control.empty:
        ckeys = _varying(control, [c for c in control.columns if c not in ("pairs", "difference", "ci95")])
        parts += ["## Against the unpruned control (the base fine-tuned with the same recipe, paired by seed)", "",
                  *(f"- {_where(row, ckeys)}: {_pm(row['difference'], row['ci95'])} points (n {row['pairs']})"
                    for _, row in control.iterrows()), ""]
    return "\n".join(parts)


def declared_config(store: StoreLike, experiment: str) -> ReportConfig:
    """The `report:` block of the newest launch's spec (spec.yaml on its parent run); the defaults without one."""
    store = Store.of(store)
    parent = tracking.newest_parent_run(store, experiment)
    if parent is None:
        return ReportConfig()
    with tempfile.TemporaryDirectory(prefix="sweep-report-") as tmp:
        try:
            path = store.download_artifacts(parent, "spec.yaml", tmp)
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (MlflowException, OSError, yaml.YAMLError):  # a launch of an older release, without its spec
            return ReportConfig()
    block = raw.get("report") if isinstance(raw, dict) else None
    try:
        return ReportConfig.from_dict(block or {}, where="report")
    except InputError as error:
        raise ReportError(f"the spec of launch {parent} (spec.yaml): {error}") from None


def report_config(declared: ReportConfig, overrides: dict) -> tuple[ReportConfig, list[str]]:
    """The declared config with the report-time flags applied, and what they changed, in words (post hoc)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "references" in given and "family" not in given:
        given["family"] = "references"  # --reference X: compare with X
    try:
        ReportConfig.from_dict(given)
    except InputError as error:  # "alpha: ..." -> "--alpha: ...": name the flag the user typed
        raise ReportError("\n".join(FLAGS.get(line.split(":")[0], "") + line[line.index(":"):]
                                     for line in str(error).splitlines())) from None
    config = ReportConfig.from_dict({**declared.model_dump(), **given}, where="report")
    for problem in report_rules(config, where="--"):
        raise ReportError(problem.replace("references: [random]", "--reference random").replace(
            "family: all_pairs", "--family all_pairs"))
    changed = []
    for name, value in given.items():
        before = getattr(declared, name) if name != "family" else declared.resolved_family()
        if name == "references":
            changed += [f"reference {r}" for r in value if r not in declared.references]
        elif value != before:
            changed.append(f"{name} {text(value)} (declared: {text(before)})")
    return config, changed


def write_report(experiment: str, tracking_uri: str | None = None, out_dir: str | Path = "reports",
                 reference: str | list[str] | None = None, *,
                 family: str | None = None, alpha: float | None = None, correction: str | None = None,
                 margin: float | None = None, plan: float | None = None,
                 runs_csv: str | Path | None = None) -> dict[str, Path]:
    """Write runs.csv, summary.csv, paired.csv, summary.md and the plots; log them to the newest parent run. The
    comparisons are the spec's `report:` block; a setting given here instead is post hoc, and every output showing it
    says so. plan: also the seeds each comparison needs to detect this many points. runs_csv: from a runs.csv an
    earlier report wrote (results/ keeps them), without MLflow: no layer plot, nothing logged, every choice post hoc."""
    if runs_csv is None:
        uri = tracking.resolve_tracking_uri(tracking_uri)
        store = Store(uri)
        analysis = write_analysis_report(experiment, store, out_dir)
        if analysis is not None:
            return analysis
        runs = load_runs(experiment, uri)
        if runs.empty:
            raise ReportError(f"MLflow experiment {experiment!r} has no finished trials yet: run the sweep first")
        declared = declared_config(store, experiment)
    else:
        runs, declared = read_runs_csv(runs_csv), ReportConfig()  # no spec to declare anything: all is post hoc
    references = [reference] if isinstance(reference, str) else reference
    config, changed = report_config(declared, {"references": references, "family": family, "alpha": alpha,
                                               "correction": correction, "margin": margin})
    strategies = set(runs.loc[~_is_control(runs), "strategy"].astype(str))
    missing = [r for r in config.references if r not in strategies]
    if references and missing:
        raise ReportError(f"--reference {missing[0]}: no finished trial of this sweep uses it; compare with one of "
                          f"{', '.join(_order(strategies))}")
    post_hoc = {r for r in config.references if r not in declared.references}
    table = summary_table(runs)
    pairs = paired_table(runs, config, post_hoc)
    control = control_table(runs, config.metric)
    out = Path(out_dir) / tracking.safe_name(experiment)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"runs": out / "runs.csv", "summary_csv": out / "summary.csv", "paired": out / "paired.csv"}
    for frame, path in zip((runs, table, pairs), paths.values()):
        frame.to_csv(path, index=False)
    (out / "summary.md").write_text(summary_markdown(experiment, runs, table, pairs, config, changed, control, plan),
                                    encoding="utf-8")
    paths["summary"] = out / "summary.md"
    paths |= {kind: plot_accuracy(runs, table, out / f"{kind}.png", kind) for kind in ACCURACY_PLOTS}
    paths["train_time"] = plot_train_time(table, out / "train_time.png")
    if not control.empty:
        control.to_csv(out / "control.csv", index=False)
        paths["control"] = out / "control.csv"
    if runs_csv is not None:
        return paths
    drawn = {"layers": plot_layers(runs, store, out / "layers.png"),
             "curves": plot_curves(runs, store, out / "curves.png")}
    paths |= {name: path for name, path in drawn.items() if path is not None}
    agreement = write_agreement(runs[~_is_control(runs)], [k for k in settings(runs) if k != "strategy"], store, out)
    if agreement is not None:  # its section closes summary.md
        written, section = agreement
        paths.update(written)
        with paths["summary"].open("a", encoding="utf-8") as summary_md:
            summary_md.write("\n".join(["", *section]))
    parent = tracking.newest_parent_run(store, experiment)
    if parent is not None:
        for path in paths.values():
            store.log_artifact(parent, path, "report")
    return paths
