"""The names a user sees: one table of metrics and one of parameters, read by the spec, the trial, the tracking,
the progress display, the report and the tables of docs/spec.md (tests check them)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    meaning: str
    direction: str  # "max" or "min": which way is better
    unit: str  # "fraction" (0..1), "count", "nats", "ms", "s", "MB", "x" or "epoch"
    when: str  # "epoch" (one value per fine-tune epoch, step = epoch), "prune", "base" or "end" (once)
    selectable: bool = True  # may a scheduler, a search or "best" read it? test metrics: never (logged once)


METRICS: dict[str, MetricInfo] = {
    "val_accuracy": MetricInfo("top-1 accuracy on the validation split after each epoch", "max", "fraction", "epoch"),
    "val_loss": MetricInfo("cross-entropy on the validation split after each epoch", "min", "nats", "epoch"),
    "train_loss": MetricInfo("mean training cross-entropy of each epoch", "min", "nats", "epoch"),
    "epoch": MetricInfo("fine-tune epochs done (what ASHA's budget counts)", "max", "epoch", "epoch"),
    "test_accuracy": MetricInfo("top-1 accuracy on the test split, once, after the last epoch", "max", "fraction",
                                "end", selectable=False),
    "test_top5": MetricInfo("top-5 accuracy on the test split (more than 10 classes)", "max", "fraction", "end",
                            selectable=False),
    "test_accuracy_drop": MetricInfo("base_test_accuracy - test_accuracy", "min", "fraction", "end",
                                     selectable=False),
    "pruned_val_accuracy": MetricInfo("validation accuracy right after pruning, before any fine-tune (iterative: "
                                      "per step, step = pruning step)", "max", "fraction", "prune"),
    "pruned_test_accuracy": MetricInfo("test accuracy right after pruning, before any fine-tune", "max", "fraction",
                                       "prune", selectable=False),
    "base_val_accuracy": MetricInfo("validation accuracy of the unpruned base network", "max", "fraction", "base"),
    "base_test_accuracy": MetricInfo("test accuracy of the unpruned base network", "max", "fraction", "base",
                                     selectable=False),
    "macs": MetricInfo("multiply-adds of one forward pass of one sample (what papers usually call FLOPs)", "min",
                       "count", "prune"),
    "flops": MetricInfo("floating-point operations of one sample's forward pass, 2 per multiply-add", "min", "count",
                        "prune"),
    "base_macs": MetricInfo("multiply-adds of the unpruned base network", "min", "count", "base"),
    "base_flops": MetricInfo("FLOPs of the unpruned base network", "min", "count", "base"),
    "flops_reduction": MetricInfo("1 - flops / base_flops (the same for MACs)", "max", "fraction", "prune"),
    "params": MetricInfo("parameters of the pruned network", "min", "count", "prune"),
    "base_params": MetricInfo("parameters of the unpruned base network", "min", "count", "base"),
    "params_reduction": MetricInfo("1 - params / base_params", "max", "fraction", "prune"),
    "channels_removed": MetricInfo("fraction of prunable output channels actually removed", "max", "fraction",
                                   "prune"),
    "size_mb": MetricInfo("size of the saved state_dict in MB (1e6 bytes)", "min", "MB", "prune"),
    "latency_ms": MetricInfo("median forward latency, measured after the sweep one model at a time (see "
                             "tags latency.*)", "min", "ms", "end"),
    "latency_iqr_ms": MetricInfo("interquartile range of the latency samples", "min", "ms", "end"),
    "base_latency_ms": MetricInfo("median latency of the unpruned base, measured the same way", "min", "ms", "end"),
    "speedup": MetricInfo("base_latency_ms / latency_ms", "max", "x", "end"),
    "prune_time_s": MetricInfo("wall-clock seconds to score and cut the network", "min", "s", "prune"),
    "train_time_s": MetricInfo("wall-clock seconds of fine-tuning (or scratch training)", "min", "s", "end"),
    "base_train_time_s": MetricInfo("wall-clock seconds that training the shared base took", "min", "s", "base"),
}

# What a run of an older release called a metric; `sweep report` reads old stores through this map.
LEGACY_METRICS = {"accuracy": "test_accuracy", "accuracy_drop": "test_accuracy_drop", "base_accuracy":
                  "base_test_accuracy", "top5": "test_top5"}

# Parameter names users filter on in the MLflow UI and write as `space:` keys, and the trial path each stands for.
PARAMS: dict[str, str] = {
    "model": "model.name",
    "weights": "model.weights",
    "dataset": "dataset.name",
    "strategy": "prune.strategy",
    "ratio": "prune.ratio",
    "scope": "prune.scope",
    "target": "prune.target",
    "schedule": "prune.schedule",
    "steps": "prune.steps",
    "arm": "prune.arm",
    "seed": "seed",
}


def section_label(section: dict) -> str | None:
    """What a model or dataset section is called wherever a person reads it (the `model`/`dataset` params, progress,
    report, analysis headers): its registry name, or for a plug-in its factory path (`mypkg:build`)."""
    return section.get("name") or section.get("factory")


def selectable_metrics() -> list[str]:
    return [name for name, info in METRICS.items() if info.selectable]


def tune_metrics() -> list[str]:
    """The selectable metrics known while a trial trains (each epoch, at pruning, with the base): every report to
    Ray Tune carries them, so a spec's `metric` is one of these. One recorded at the end (latency is measured after
    the sweep) can pick a winner from MLflow (`--by`), but no scheduler or search could read it."""
    return [name for name, info in METRICS.items() if info.selectable and info.when != "end"]


# The parent run of `sweep sensitivity` or `sweep criteria` says which analysis it holds.
KIND_TAG = "sweep.kind"
ANALYSIS_KINDS = ("sensitivity", "criteria")
