"""MLflow runs of a sweep -> one pandas table, its Pareto front, plots and a markdown summary.

Units as the trials log them: accuracy, accuracy_drop, *_reduction and ratio are fractions (0..1); the plots and the
summary show them in percent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend; savefig renders with Agg
from mlflow.tracking import MlflowClient

from sweep import tracking

TEXT_PARAMS = ["model", "dataset", "strategy", "scope", "target", "schedule"]
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
METRIC_COLUMNS = [
    "accuracy", "base_accuracy", "accuracy_drop", "flops", "flops_reduction", "params", "params_reduction",
    "size_mb", "latency_ms", "speedup", "train_time_s", "prune_time_s",
]  # fmt: skip
COLUMNS = [
    "run_id", "model", "dataset", "strategy", "ratio", "scope", "target", "schedule", *METRIC_COLUMNS, "status",
]  # fmt: skip

# Fixed colour and marker per strategy, so a strategy looks the same in every figure of every sweep.
STYLES = {
    "random": ("tab:gray", "x"),
    "l1": ("tab:blue", "o"),
    "l2": ("tab:orange", "s"),
    "bn_scale": ("tab:green", "^"),
    "taylor": ("tab:red", "D"),
    "apoz": ("tab:purple", "v"),
    "fpgm": ("tab:brown", "P"),
}
_EXTRA_STYLES = [("tab:pink", "*"), ("tab:olive", "h"), ("tab:cyan", "<"), ("black", ">")]


def _style(strategy: str, order: list[str]) -> tuple[str, str]:
    if strategy in STYLES:
        return STYLES[strategy]
    unknown = [s for s in order if s not in STYLES]
    return _EXTRA_STYLES[unknown.index(strategy) % len(_EXTRA_STYLES)]


def load_runs(
    experiment: str, tracking_uri: str | None = None, parent_run_id: str | None = None, status: str | None = "FINISHED"
) -> pd.DataFrame:
    """One row per trial (child runs only), newest run per config; status=None keeps runs of every status."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} is invalid: use one of {', '.join(STATUSES)} or None for all")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    if tracking.find_experiment_id(client, experiment) is None:
        raise ValueError(f"MLflow experiment {experiment!r} not found at {uri}: check the sweep name or --tracking-uri")
    filters = []
    if status is not None:
        filters.append(f"attributes.status = '{status}'")
    if parent_run_id is not None:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    rows = []
    for run in tracking.child_runs(client, experiment, " and ".join(filters)):
        params, metrics = run.data.params, run.data.metrics
        row = {name: params.get(name) for name in TEXT_PARAMS}
        row.update(run_id=run.info.run_id, status=run.info.status, ratio=params.get("ratio"))
        row.update({name: metrics.get(name) for name in METRIC_COLUMNS})
        row.update(config_hash=run.data.tags["config_hash"], start_time=run.info.start_time)
        rows.append(row)
    df = pd.DataFrame(rows, columns=[*COLUMNS, "config_hash", "start_time"])
    for name in ["ratio", *METRIC_COLUMNS]:
        df[name] = pd.to_numeric(df[name], errors="coerce").astype(float)
    # A config run again with --force: the newest finished run stands for it.
    df = df.sort_values("start_time", ascending=False, kind="stable")
    df = df[~(df["status"].eq("FINISHED") & df.duplicated("config_hash"))]
    df = df.sort_values(["model", "strategy", "ratio", "scope", "target", "schedule"], kind="stable")
    return df[COLUMNS].reset_index(drop=True)


def pareto_front(df: pd.DataFrame, x: str = "flops_reduction", y: str = "accuracy") -> pd.Series:
    """True for rows no other row beats on both x and y (maximising both); rows missing x or y are never on it."""
    xs, ys = df[x].to_numpy(float), df[y].to_numpy(float)
    # dominated_by[i, j]: row j is at least as good as row i on both axes and strictly better on one.
    x_i, x_j, y_i, y_j = xs[:, None], xs[None, :], ys[:, None], ys[None, :]
    dominated_by = (x_j >= x_i) & (y_j >= y_i) & ((x_j > x_i) | (y_j > y_i))
    on_front = ~dominated_by.any(axis=1) & ~np.isnan(xs) & ~np.isnan(ys)
    return pd.Series(on_front, index=df.index, name="pareto")


def _model_axes(df: pd.DataFrame) -> tuple[Figure, list[tuple[str, pd.DataFrame, Axes]]]:
    """One panel per model, side by side: accuracies of different models do not share a scale."""
    models = sorted(df["model"].dropna().unique())
    if not models:
        raise ValueError("nothing to plot: the table has no trials (check load_runs' experiment and status)")
    fig = Figure(figsize=(6.4 * len(models), 4.8), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    return fig, [(model, df[df["model"] == model], ax) for model, ax in zip(models, axes)]


def _base_line(ax: Axes, sub: pd.DataFrame) -> None:
    base = sub["base_accuracy"].dropna()
    if len(base):
        label = f"unpruned base ({100 * base.mean():.1f}%)"
        ax.axhline(100 * base.mean(), color="black", linestyle="--", linewidth=1, label=label)


def _legend(ax: Axes) -> None:
    # Strategies first, reference lines (front, base) last, whatever order matplotlib collected them in.
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith(("Pareto front", "unpruned base")))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], title="strategy", fontsize="small")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_pareto(df: pd.DataFrame, path: str | Path) -> Path:
    """Accuracy vs FLOPs reduction per strategy, with the Pareto front as a step line and the base accuracy dashed."""
    fig, panels = _model_axes(df)
    order = sorted(df["strategy"].dropna().unique())
    for model, sub, ax in panels:
        for strategy in order:
            points = sub[sub["strategy"] == strategy]
            if points.empty:
                continue
            colour, marker = _style(strategy, order)
            x, y = 100 * points["flops_reduction"], 100 * points["accuracy"]
            ax.scatter(x, y, color=colour, marker=marker, s=45, alpha=0.85, label=strategy, zorder=3)
        front = sub[pareto_front(sub)].sort_values("flops_reduction")
        # Accuracy y_i is reachable at any FLOPs reduction up to x_i: the front is a staircase falling to the right.
        x, y = 100 * front["flops_reduction"], 100 * front["accuracy"]
        ax.step(x, y, where="pre", color="black", linewidth=1.2, alpha=0.6, label="Pareto front", zorder=2)
        ax.scatter(x, y, s=150, facecolors="none", edgecolors="black", linewidths=1, zorder=4)  # ring the front
        _base_line(ax, sub)
        ax.set(title=f"{model}: accuracy vs FLOPs reduction", xlabel="FLOPs reduction (%)", ylabel="Top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(fig, path)


def _series_label(df: pd.DataFrame) -> pd.Series:
    """Strategy name, plus the scope/target/schedule settings that vary within the sweep (else lines would mix them)."""
    varying = [c for c in ("scope", "target", "schedule") if df[c].nunique(dropna=True) > 1]
    label = df["strategy"].astype(str)
    for column in varying:
        label = label + " " + df[column].astype(str)
    return label


def plot_levels(df: pd.DataFrame, path: str | Path) -> Path:
    """Accuracy vs pruning ratio per strategy (mean, with std over repeats as error bars); one panel per model."""
    fig, panels = _model_axes(df)
    order = sorted(df["strategy"].dropna().unique())
    labels = _series_label(df)
    for model, sub, ax in panels:
        for label in sorted(labels[sub.index].unique()):
            points = sub[labels[sub.index] == label]
            stats = points.groupby("ratio")["accuracy"].agg(["mean", "std"]).reset_index()
            colour, marker = _style(points["strategy"].iloc[0], order)
            x, y, err = 100 * stats["ratio"], 100 * stats["mean"], 100 * stats["std"].fillna(0)
            ax.errorbar(x, y, yerr=err, color=colour, marker=marker, capsize=3, label=label)
        _base_line(ax, sub)
        ax.set(
            title=f"{model}: accuracy at each pruning level",
            xlabel="Pruning ratio (% of target removed)",
            ylabel="Top-1 accuracy (%)",
        )
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(fig, path)


def plot_train_time(df: pd.DataFrame, path: str | Path) -> Path:
    """Fine-tune wall-clock time per trial: mean +- std per model, or per strategy when the sweep has one model."""
    by = "model" if df["model"].nunique() > 1 else "strategy"
    stats = df.groupby(by)["train_time_s"].agg(["mean", "std", "count"]).reset_index()
    fig = Figure(figsize=(max(6.4, 1.0 * len(stats) + 2), 4.8), layout="constrained")
    ax = fig.subplots()
    order = sorted(df["strategy"].dropna().unique())
    colours = [_style(s, order)[0] for s in stats[by]] if by == "strategy" else "tab:blue"
    bars = ax.bar(stats[by].astype(str), stats["mean"], yerr=stats["std"].fillna(0), color=colours, capsize=4)
    ax.bar_label(bars, labels=[f"n={n}" for n in stats["count"]], label_type="center", color="white", fontsize="small")
    title = "Fine-tune time per trial" + (f" ({df['model'].iloc[0]})" if by == "strategy" else "")
    ax.set(title=f"{title}, mean ± std", xlabel=by, ylabel="Wall-clock time (s)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Best trial of each (model, strategy, ratio), strategies ranked by accuracy within each ratio."""
    keys = ["model", "strategy", "ratio"]
    best = df.sort_values("accuracy", ascending=False, na_position="last").groupby(keys, dropna=False)
    table = best.head(1).set_index(keys)
    columns = ["accuracy", "accuracy_drop", "flops_reduction", "params_reduction", "speedup", "latency_ms", "run_id"]
    table = table[columns]
    table.insert(0, "trials", best.size())
    table["train_time_s"] = best["train_time_s"].mean()  # cost of a trial: mean, not the best run's
    table = table.reset_index().sort_values(["model", "ratio", "accuracy"], ascending=[True, True, False])
    return table.reset_index(drop=True)


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _fmt(values: pd.Series, spec: str, scale: float = 1.0) -> pd.Series:
    """Numbers as text for a table; a missing metric shows as a dash, not 'nan'."""
    return values.map(lambda v: "–" if pd.isna(v) else format(scale * v, spec))


def _pct(values: pd.Series) -> pd.Series:
    return _fmt(values, ".1f", 100)


def summary_markdown(experiment: str, df: pd.DataFrame) -> str:
    """summary.md: the accuracy grid first (what a researcher compares), then the best trials and the Pareto front."""
    models = ", ".join(sorted(df["model"].dropna().unique()))
    parts = [f"# Sweep `{experiment}`", "", f"{len(df)} finished trials; models: {models}."]
    for model, sub in df.groupby("model"):
        grid = sub.groupby(["strategy", "ratio"])["accuracy"].max().unstack("ratio")
        best = grid.eq(grid.max())  # bold the best strategy at each ratio
        text = grid.apply(_pct)
        grid = text.where(~best, "**" + text + "**")
        grid.columns = [f"ratio {r:g}" for r in grid.columns]
        base = sub["base_accuracy"].mean()
        parts += ["", f"## {model}: best top-1 accuracy (%) by strategy and pruning ratio", ""]
        parts += [f"Unpruned base: {100 * base:.1f}%.", "", _markdown(grid.reset_index())]

    table = summary_table(df)
    shown = pd.DataFrame({
        "model": table["model"], "ratio": _fmt(table["ratio"], "g"), "strategy": table["strategy"],
        "trials": table["trials"],
        "accuracy %": _pct(table["accuracy"]), "drop (pp)": _pct(table["accuracy_drop"]),
        "FLOPs −%": _pct(table["flops_reduction"]), "params −%": _pct(table["params_reduction"]),
        "speedup ×": _fmt(table["speedup"], ".2f"), "latency ms": _fmt(table["latency_ms"], ".2f"),
        "fine-tune s": _fmt(table["train_time_s"], ".1f"), "run": table["run_id"].str[:8],
    })  # fmt: skip
    parts += ["", "## Best trial per strategy and ratio", "", _markdown(shown)]

    on_front = pd.concat([pareto_front(sub) for _, sub in df.groupby("model")]).reindex(df.index, fill_value=False)
    front = df[on_front].sort_values(["model", "flops_reduction"])  # a front per model: models are not alternatives
    shown = pd.DataFrame({
        "model": front["model"], "strategy": front["strategy"], "ratio": _fmt(front["ratio"], "g"),
        "scope": front["scope"], "FLOPs −%": _pct(front["flops_reduction"]), "accuracy %": _pct(front["accuracy"]),
        "run": front["run_id"].str[:8],
    })  # fmt: skip
    parts += ["", "## Pareto front: accuracy vs FLOPs reduction", "", _markdown(shown), ""]
    return "\n".join(parts)


def write_report(
    experiment: str, tracking_uri: str | None = None, out_dir: str | Path = "reports", log_to_parent: bool = True
) -> dict[str, Path]:
    """Write trials.csv, pareto.png, levels.png, train_time.png and summary.md; log them to the newest parent run."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    from sweep.analysis.report import write_analysis_report  # `sweep sensitivity` and `sweep criteria` parents

    analysis = write_analysis_report(experiment, uri, out_dir)
    if analysis is not None:
        return analysis
    df = load_runs(experiment, uri)
    if df.empty:
        raise ValueError(f"MLflow experiment {experiment!r} has no finished trials yet: run the sweep first")
    out = Path(out_dir) / tracking.safe_name(experiment)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "trials.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(experiment, df), encoding="utf-8")
    paths = {
        "trials": out / "trials.csv",
        "pareto": plot_pareto(df, out / "pareto.png"),
        "levels": plot_levels(df, out / "levels.png"),
        "train_time": plot_train_time(df, out / "train_time.png"),
        "summary": out / "summary.md",
    }
    if log_to_parent:
        client = MlflowClient(uri)
        parent = tracking.newest_parent_run(client, experiment)
        if parent is not None:
            for path in paths.values():
                tracking.with_retry(client.log_artifact, parent, str(path), "report")
    return paths
