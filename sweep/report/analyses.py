"""Tables and plots of `sweep sensitivity` and `sweep criteria`, from the MLflow store alone.

`sweep report NAME` comes here when the experiment's newest parent run carries the tag `sweep.kind`; the commands
themselves end by calling the same functions, so what they print and what a later report shows are the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from sweep.config.names import ANALYSIS_KINDS, KIND_TAG
from sweep.errors import InputError
from sweep.report.common import markdown_table, save
from sweep.store import tracking
from sweep.store.store import Store

SENSITIVITY_METRICS = {"val_accuracy": "accuracy", "val_loss": "loss", "ratio": "ratio", "removed": "removed",
                       "accuracy_drop": "accuracy_drop", "flops_reduction": "flops_reduction"}


def _children(store: Store, parent_run_id: str):
    parent = store.get_run(parent_run_id)
    return parent, store.runs(parent.info.experiment_id, f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                                         "attributes.status = 'FINISHED'")


def write_analysis_report(experiment: str, store: Store, out_dir: str | Path = "reports") -> dict[str, Path] | None:
    """The report of the experiment's newest parent run when it is an analysis (its tag sweep.kind), else None."""
    parent = tracking.newest_parent_run(store, experiment)
    kind = store.get_run(parent).data.tags.get(KIND_TAG) if parent else None
    return write_analysis(kind, experiment, store, out_dir, parent)[0] if kind in ANALYSIS_KINDS else None


def write_analysis(kind: str, experiment: str, store: Store, out_dir: str | Path, parent_run_id: str
                   ) -> tuple[dict[str, Path], pd.DataFrame]:
    """The report of an analysis's parent run, also logged to it: sensitivity.png, sensitivity.csv, suggested.yaml and
    summary.md; or criteria.png, criteria.csv and summary.md."""
    table, info = (load_sensitivity if kind == "sensitivity" else load_criteria)(store, parent_run_id)
    if table.empty:
        raise InputError(f"{kind} run {parent_run_id} of {experiment!r} has no finished layers")
    out = Path(out_dir) / tracking.safe_name(experiment)
    out.mkdir(parents=True, exist_ok=True)
    texts = (_sensitivity_texts if kind == "sensitivity" else _criteria_texts)(experiment, table, info)
    for name, content in texts.items():
        (out / name).write_text(content, encoding="utf-8")
    plot = (plot_sensitivity if kind == "sensitivity" else plot_criteria)(table, info, out / f"{kind}.png")
    paths = {kind: plot} | {("table" if n.endswith(".csv") else n.split(".")[0]): out / n for n in texts}
    for path in paths.values():
        store.log_artifact(parent_run_id, path)
    return paths, table


def _labels(table: pd.DataFrame) -> dict[str, str]:
    """Layer group -> its name, with the number of convs tied to it (a residual stream)."""
    return {r.layer: r.layer + (f" +{str(r.modules).count(',')} tied" if "," in str(r.modules) else "")
            for r in table.drop_duplicates("layer").itertuples()}


def load_sensitivity(store: Store, parent_run_id: str) -> tuple[pd.DataFrame, dict]:
    """One row per (layer, ratio) as the child runs recorded them, layers in model order; and the parent's
    params and metrics (base_val_accuracy, strategy, tolerance, ...)."""
    parent, runs = _children(store, parent_run_id)
    rows = []
    for run in runs:
        p = run.data.params
        history = {}
        for metric, column in SENSITIVITY_METRICS.items():
            for m in store.get_metric_history(run.info.run_id, metric):
                history.setdefault(m.step, {})[column] = m.value
        rows += [{"layer": p["layer"], "modules": p["modules"], "width": int(p["width"]), "step": step, **values,
                  "run_id": run.info.run_id} for step, values in history.items()]
    table = pd.DataFrame(rows, columns=["layer", "modules", "width", "step", *SENSITIVITY_METRICS.values(), "run_id"])
    table["removed"] = table["removed"].astype("Int64")
    # layers in the order the tasks were submitted (model order): the child runs' layer_index
    order = {r.data.params["layer"]: int(r.data.params.get("layer_index", i)) for i, r in enumerate(runs)}
    table = table.assign(_order=table["layer"].map(order)).sort_values(["_order", "ratio"])
    return table.drop(columns="_order").reset_index(drop=True), {**parent.data.params, **parent.data.metrics}


def _panels(layers: list[str]) -> list[tuple[str, list[str]]]:
    """Li et al. draw one panel per stage; a small network gets one panel."""
    if len(layers) <= 8:
        return [("all layers", layers)]
    stages: dict[str, list[str]] = {}
    for layer in layers:
        stages.setdefault(layer.split(".")[0], []).append(layer)
    panels = [(stage, members) for stage, members in stages.items() if len(members) > 1]
    rest = [m for members in stages.values() if len(members) == 1 for m in members]
    return panels + ([("other" if len(rest) > 1 else rest[0], rest)] if rest else [])


def plot_sensitivity(table: pd.DataFrame, info: dict, path: str | Path) -> Path:
    """Accuracy vs fraction of filters pruned, one line per layer group (Li et al. 2017, Fig. 2)."""
    labels = _labels(table)
    panels = _panels(list(dict.fromkeys(table["layer"])))
    fig = Figure(figsize=(5.2 * len(panels), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    base = float(info.get("base_val_accuracy", np.nan))
    for (title, members), ax in zip(panels, axes):
        n = len(members)
        cmap = colormaps["tab10" if n <= 10 else "viridis"]
        for layer, colour in zip(members, map(cmap, range(n) if n <= 10 else np.linspace(0, 0.95, n))):
            rows = table[table["layer"] == layer].sort_values("ratio")
            ax.plot(100 * rows["ratio"], 100 * rows["accuracy"], marker="o", markersize=3.5, color=colour,
                    label=labels[layer])
        if not np.isnan(base):
            ax.axhline(100 * base, color="black", linestyle="--", linewidth=1, label=f"base ({100 * base:.1f}%)")
        ax.set(title=title if len(panels) > 1 else "", xlabel="Filters pruned away (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2 if len(members) > 10 else 1)
    axes[0].set_ylabel("Validation accuracy (%), no fine-tune")
    fig.suptitle(f"{info.get('model', '')}: each layer group pruned alone ({info.get('strategy', '')})")
    return save(fig, path)


def _sensitivity_texts(name: str, table: pd.DataFrame, info: dict) -> dict[str, str]:
    tolerance, base = float(info.get("tolerance", 0.01)), float(info["base_val_accuracy"])
    suggestion = suggestion_yaml(table, base, tolerance, f"{name}, strategy {info.get('strategy')}")
    grid = table.pivot_table(index="layer", columns="ratio", values="accuracy", sort=False)
    widths = table.drop_duplicates("layer").set_index("layer")["width"]
    labels = _labels(table)
    shown = pd.DataFrame({"layer": [labels[layer] for layer in grid.index],
                          "filters": widths.reindex(grid.index).to_numpy()})
    for ratio in grid.columns:
        shown[f"{100 * ratio:g}%"] = grid[ratio].map(lambda v: "–" if pd.isna(v) else f"{100 * v:.1f}").to_numpy()
    summary = "\n".join([
        f"# Sensitivity `{name}`", "",
        (f"{info.get('model', '')} on {info.get('dataset', '')}, strategy {info.get('strategy', '')}: each layer group "
         f"pruned alone, no fine-tune; validation accuracy (%) on {int(float(info.get('val_examples', 0)))} held-out "
         f"examples. Unpruned base: {100 * base:.2f} %."), "",
        markdown_table(shown), "",
        f"## Suggested block (tolerated drop {100 * tolerance:g} point(s))", "",
        "```yaml", suggestion.rstrip(), "```", "",
    ])
    return {"sensitivity.csv": table.to_csv(index=False), "suggested.yaml": suggestion, "summary.md": summary}


def suggest(table: pd.DataFrame, base_accuracy: float, tolerance: float) -> tuple[dict[str, float], list[str]]:
    """Per layer, the largest tested ratio up to which every ratio stays within ``tolerance`` of the base accuracy;
    layers that lose more than that already at the smallest ratio go to ``ignore``."""
    ratios: dict[str, float] = {}
    ignore: list[str] = []
    for layer, rows in table.groupby("layer", sort=False):
        rows = rows.sort_values("ratio")
        ok = (base_accuracy - rows["accuracy"]).le(tolerance + 1e-12).to_numpy()
        allowed = next((i for i, within in enumerate(ok) if not within), len(ok))  # how many ratios in a row
        if allowed == 0:
            ignore.append(layer)
        else:
            ratios[layer] = float(rows["ratio"].iloc[allowed - 1])
    return ratios, ignore


def suggestion_yaml(table: pd.DataFrame, base_accuracy: float, tolerance: float, source: str) -> str:
    """The `prune:` block a later search space can take over: per-layer `ratios` and `ignore`."""
    ratios, ignore = suggest(table, base_accuracy, tolerance)
    tied = {r.layer: r.modules for r in table.drop_duplicates("layer").itertuples() if "," in str(r.modules)}
    key = lambda name: name if all(c.isalnum() or c in "._-" for c in name) else f'"{name}"'
    lines = [
        f"# Suggested by `sweep sensitivity` ({source}):",
        "# for each layer group, the largest tested ratio up to which its validation accuracy, pruned alone",
        f"# without fine-tune, stays within {100 * tolerance:g} point(s) of the base ({100 * base_accuracy:.2f} %);",
        "# groups that lose more already at the smallest ratio are ignored. A group is named by its first conv;",
        "# the convs tied to it (a residual stream) go with it. Effects add up when several groups are pruned",
        "# together: fine-tune, or tolerate less. `ratio: 0` prunes only the listed groups.",
        "prune:",
        *(["  ratio: 0"] if ratios else []),
        "  ratios:" + ("" if ratios else " {}"),
        *(f"    {key(layer)}: {ratio:g}" + (f"  # with {len(tied[layer].split(',')) - 1} tied convs"
                                            if layer in tied else "") for layer, ratio in ratios.items()),
        "  ignore: [" + ", ".join(map(key, ignore)) + "]",
    ]
    return "\n".join(lines) + "\n"


def load_criteria(store: Store, parent_run_id: str) -> tuple[pd.DataFrame, dict]:
    """One row per layer group (model order): units, spearman_<strategy> and spearman_signed_<strategy>."""
    parent, runs = _children(store, parent_run_id)
    strategies = parent.data.params.get("strategies", "").split(",")
    names = [f"spearman_{s}" for s in strategies] + [f"spearman_signed_{s}" for s in strategies]
    rows = [{"layer": r.data.params["layer"], "modules": r.data.params.get("modules", r.data.params["layer"]),
             "units": int(r.data.params["units"]), "_order": int(r.data.params.get("layer_index", 0)),
             **{name: r.data.metrics.get(name, np.nan) for name in names},
             "oracle_mean_abs": r.data.metrics.get("oracle_mean_abs", np.nan), "run_id": r.info.run_id} for r in runs]
    columns = ["layer", "modules", "units", "_order", *names, "oracle_mean_abs", "run_id"]  # also when none finished
    table = pd.DataFrame(rows, columns=columns).sort_values("_order").drop(columns="_order").reset_index(drop=True)
    return table, {**parent.data.params, **parent.data.metrics, "strategy_list": strategies}


def plot_criteria(table: pd.DataFrame, info: dict, path: str | Path) -> Path:
    """Spearman rho of each strategy against the oracle: per layer (heatmap) and the mean over layers (bars)."""
    strategies = info["strategy_list"]
    values = table[[f"spearman_{s}" for s in strategies]].to_numpy(float)
    fig = Figure(figsize=(4.0 + 0.9 * len(strategies) + 4.2, max(3.5, 0.32 * len(table) + 1.6)), layout="constrained")
    heat, bars = fig.subplots(1, 2, width_ratios=[0.9 * len(strategies) + 2.5, 4.2])
    image = heat.imshow(values, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    heat.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
    labels = _labels(table)
    heat.set_yticks(range(len(table)), [f"{labels[layer]} ({n})" for layer, n in zip(table["layer"], table["units"])],
                    fontsize="small")
    if len(table) * len(strategies) <= 400:
        for (i, j), v in np.ndenumerate(values):
            heat.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize="x-small",
                      color="white" if abs(v) > 0.6 else "black")
    heat.set_title("per layer group (units)")
    fig.colorbar(image, ax=heat, shrink=0.8, label="Spearman ρ vs oracle |Δloss|")
    means = np.nanmean(values, axis=0)
    order = np.argsort(-np.nan_to_num(means, nan=-2))
    colours = ["tab:blue" if m >= 0 else "tab:red" for m in means[order]]
    drawn = bars.barh([strategies[i] for i in order][::-1], means[order][::-1], color=colours[::-1])
    bars.bar_label(drawn, fmt="%.2f", fontsize="small", padding=2)
    low = np.nanmin(means) if np.isfinite(means).any() else 0.0
    bars.set(xlim=(min(-0.15, low - 0.3), 1.15), title="mean over layers", xlabel="Spearman ρ")
    bars.axvline(0, color="black", linewidth=0.8)
    bars.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{info.get('model', '')} on {info.get('dataset', '')}: criteria vs the oracle "
                 f"(Molchanov et al. 2017, Table 1)")
    return save(fig, path)


def _criteria_texts(name: str, table: pd.DataFrame, info: dict) -> dict[str, str]:
    mean = table.select_dtypes("number").mean(skipna=True).to_dict()  # over the layers whose correlation is defined
    mean.update(layer="mean", modules="", units=int(table["units"].sum()), run_id="")
    full = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    shown = pd.DataFrame({"layer": full["layer"].map({**_labels(table), "mean": "mean"}),
                          "units": full["units"].astype(int)})
    for s in info["strategy_list"]:
        shown[s] = full[f"spearman_{s}"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}")
    summary = "\n".join([
        f"# Criteria vs oracle `{name}`", "",
        (f"{info.get('model', '')} on {info.get('dataset', '')}: Spearman's rank correlation between each strategy's "
         f"per-filter scores and the oracle |Δ loss| (the held-out loss change when that filter alone is removed, "
         f"on {int(float(info.get('val_examples', 0)))} validation examples), per layer group; the last row is the "
         "mean over layers."), "",
        markdown_table(shown), "",
    ])
    return {"criteria.csv": full.to_csv(index=False), "summary.md": summary}
