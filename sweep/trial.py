"""One trial: base model -> prune -> fine-tune -> measure -> report to Ray Tune and MLflow.

``run_trial`` is a Ray Tune function trainable (``tune.with_parameters(run_trial, context=ctx)``)
and also runs standalone, without Ray. Its config is the resolved trial dict of ``sweep.spec``.
"""

from __future__ import annotations

import copy
import csv
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import tracking
from .data import DataSplits, batches, load_dataset
from .measure import measure_model
from .pruning import PrunePlan, apply_plan, prune, save_pruned
from .base import ensure_base, load_base
from .train import TrainConfig, evaluate, make_optimizer, pick_device, prepare_model, seed_everything, train_epoch

STATE_FILE = "trial.pt"
Report = Callable[[dict, "str | None"], None]  # (metrics, checkpoint directory or None)


@dataclass(frozen=True)
class SweepContext:
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    cache_dir: str  # shared by every trial (and node) of the sweep: base models live here
    rerun: bool = False  # run even when this exact config already has a FINISHED run (`sweep run --force`)


class InjectedFault(RuntimeError):
    """Raised by the test-only ``fault.fail_at_epoch`` setting."""


# --- checkpoints and artifacts -----------------------------------------------------------------------

def _save_state(directory: Path, model, plan, optimizer, scheduler, epoch: int, run_id: str, progress: dict) -> None:
    torch.save({"plan": plan.to_dict(), "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "run_id": run_id, "progress": progress},
               directory / STATE_FILE)


def _restore_state(directory: str | None) -> dict | None:
    if directory is None or not (Path(directory) / STATE_FILE).exists():
        return None
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def _channel_artifacts(out: Path, plan: PrunePlan, base_model: nn.Module) -> list[Path]:
    rows = plan.channel_counts(base_model)
    table = out / "channels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "type", "channels_before", "channels_after"])
        writer.writerows(rows)
    from matplotlib.figure import Figure  # only the trial's end needs plotting

    fig = Figure(figsize=(max(6, 0.25 * len(rows)), 4), layout="constrained")
    ax = fig.subplots()
    x = range(len(rows))
    ax.bar(x, [r[2] for r in rows], color="#c7c7c7", label="before")
    ax.bar(x, [r[3] for r in rows], color="#1f77b4", label="after")
    ax.set_xticks(list(x), [r[0] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.set_title(f"Channels per layer: {plan.info.get('strategy')} {plan.info.get('ratio')} {plan.info.get('scope')}")
    ax.legend()
    fig.savefig(out / "channels.png", dpi=120)
    return [table, out / "channels.png"]


# --- the trial ---------------------------------------------------------------------------------------

def _tune_reporter() -> tuple[Report, str | None]:
    from ray import tune

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return report, None
    local = tempfile.mkdtemp(prefix="sweep-restore-")
    checkpoint.to_directory(local)
    return report, local


def _finished_run(context: SweepContext, run_id: str) -> dict | None:
    """The recorded result of a FINISHED run (a trial that must not be redone), else None."""
    from mlflow.tracking import MlflowClient

    run = tracking.with_retry(MlflowClient(context.tracking_uri).get_run, run_id)
    return {**run.data.metrics, "skipped": 1.0} if run.info.status == "FINISHED" else None


def _existing_result(context: SweepContext, chash: str) -> dict | None:
    run_id = tracking.finished_trials(context.tracking_uri, context.experiment).get(chash)
    return None if run_id is None else _finished_run(context, run_id)


def _node_tags() -> dict[str, str]:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return {"ray.node_id": ctx.get_node_id(), "ray.trial": os.environ.get("TUNE_TRIAL_ID", "")}
    except Exception:  # tags are a convenience: never fail a trial over them
        pass
    return {}


def run_trial(config: dict, context: SweepContext, report: Report | None = None,
              checkpoint_dir: str | None = None) -> dict:
    """Base -> prune -> fine-tune -> measure; reports each epoch and logs one MLflow child run.

    Under Ray Tune (``report=None``) it reports to Tune and resumes from ``tune.get_checkpoint()``;
    standalone, ``report(metrics, checkpoint_dir)`` receives each epoch and ``checkpoint_dir``
    resumes from one of those checkpoints.
    """
    os.environ.pop("MLFLOW_RUN_ID", None)  # would hijack the parent of our run (mlflow issue 15713)
    if report is None:
        report, checkpoint_dir = _tune_reporter()
    state = _restore_state(checkpoint_dir)
    chash = tracking.config_hash(config)
    if state is not None:  # the driver may have died after this run finished but before Tune recorded it
        existing = _finished_run(context, state["run_id"])
    else:
        existing = None if context.rerun else _existing_result(context, chash)
    if existing is not None:
        report(existing, None)
        return existing

    device = pick_device(config["device"])
    seed_everything(config["seed"])
    data = config["dataset"]
    splits = load_dataset(data.get("name"), root=data["root"], download=data["download"],
                          val_fraction=data["val_fraction"], seed=config["seed"], image_size=data["image_size"],
                          limit=data["limit"], factory=data.get("factory"), kwargs=data.get("kwargs"))
    run_id = state["run_id"] if state else tracking.find_trial_run(
        context.tracking_uri, context.experiment, chash, context.parent_run_id)
    run = tracking.TrialRun.open(context.tracking_uri, context.experiment, context.parent_run_id, config, run_id)
    try:
        result = _pipeline(config, context, splits, device, run, state, report)
    except SystemExit:  # Ray Tune stops a trial (ASHA) by exiting from inside tune.report
        run.finish("KILLED")
        raise
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
    return result


def _pipeline(config, context, splits, device, run, state, report) -> dict:
    base_path, cached = ensure_base(config, context.cache_dir, splits, device)
    base_model, base = load_base(config, base_path, splits)
    run.client.set_tag(run.run_id, "base_cache", "hit" if cached else "miss")
    for key, value in _node_tags().items():
        run.client.set_tag(run.run_id, key, value)
    ft = TrainConfig.from_dict(config["finetune"])
    train_batches = batches(splits.train, ft.batch_size, True, device, seed=config["seed"])
    val_batches = batches(splits.val, ft.batch_size, False, device)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)

    if state is None:
        model, plan, prune_time = _prune(config, base_model.to(device), example, train_batches, ft, device)
        progress = {"prune_time_s": prune_time, "train_time_s": 0.0}
        start_epoch = 0
    else:
        plan = PrunePlan.from_dict(state["plan"])
        model = apply_plan(base_model, plan)
        model.load_state_dict(state["state_dict"])
        progress, start_epoch = state["progress"], state["epoch"]
    model = prepare_model(model, device, ft)
    optimizer, scheduler = make_optimizer(model, ft, len(train_batches))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    fault = config.get("fault", {}).get("fail_at_epoch")
    for epoch in range(start_epoch + 1, ft.epochs + 1):
        if fault == epoch and state is None:
            raise InjectedFault(f"fault.fail_at_epoch: injected failure in fine-tune epoch {epoch}")
        start = time.perf_counter()
        loss = train_epoch(model, train_batches, optimizer, scheduler, ft, device)
        progress["train_time_s"] += time.perf_counter() - start
        val = evaluate(model, val_batches, device, splits.num_classes)
        run.log_metrics({"train_loss": loss, "val_accuracy": val["accuracy"]}, step=epoch)
        with tempfile.TemporaryDirectory(prefix="sweep-ckpt-") as tmp:
            _save_state(Path(tmp), model, plan, optimizer, scheduler, epoch, run.run_id, progress)
            report({"accuracy": val["accuracy"], "val_accuracy": val["accuracy"], "train_loss": loss,
                    "epoch": epoch}, tmp)

    final = _measure(config, model, base_model.to(device), base, plan, splits, device, progress)
    run.log_metrics(final)
    with tempfile.TemporaryDirectory(prefix="sweep-art-") as tmp:
        out = Path(tmp)
        (out / "checkpoint").mkdir()
        save_pruned(out / "checkpoint" / "pruned.pt", model.cpu(), plan)
        run.log_artifact(out / "checkpoint" / "pruned.pt", "checkpoint")
        for path in _channel_artifacts(out, plan, base_model.cpu()):
            run.log_artifact(path)
    report({**final, "epoch": ft.epochs}, None)
    return final


def _prune(config, model, example, train_batches, ft: TrainConfig, device):
    p = config["prune"]
    calibration = None
    if p["strategy"] in ("taylor", "apoz"):
        calibration = []
        for x, y in train_batches:
            calibration.append((x.to(device), y.to(device)))
            if len(calibration) >= p["calibration_batches"]:
                break

    def fine_tune_between_steps(m: nn.Module, step: int) -> None:  # Molchanov et al.: prune, fine-tune, repeat
        cfg = copy.copy(ft)
        cfg.epochs = 1
        opt, sched = make_optimizer(m, cfg, len(train_batches))
        train_epoch(m, train_batches, opt, sched, cfg, device)

    steps = p["steps"] if p["schedule"] == "iterative" else 1
    start = time.perf_counter()
    result = prune(model, example, strategy=p["strategy"], ratio=p["ratio"], scope=p["scope"], target=p["target"],
                   calibration=calibration, min_channels=p["min_channels"], round_to=p["round_to"],
                   ignore=tuple(p["ignore"]), steps=steps, callback=fine_tune_between_steps, seed=config["seed"])
    return result.model, result.plan, time.perf_counter() - start


def _measure(config, model, base_model, base, plan, splits, device, progress) -> dict:
    m = config["measure"]
    shape = (splits.in_channels, splits.image_size, splits.image_size)
    test = evaluate(model, batches(splits.test, config["finetune"]["batch_size"], False, device), device,
                    splits.num_classes)
    after = measure_model(model, shape, device, m["batch_size"], m["warmup"], m["runs"])
    before = measure_model(base_model, shape, device, m["batch_size"], m["warmup"], m["runs"])
    final = {
        "base_accuracy": base["base_test_accuracy"], "accuracy": test["accuracy"],
        "accuracy_drop": base["base_test_accuracy"] - test["accuracy"],
        "flops": after["flops"], "base_flops": before["flops"],
        "flops_reduction": 1 - after["flops"] / before["flops"],
        "params": after["params"], "base_params": before["params"],
        "params_reduction": 1 - after["params"] / before["params"],
        "size_mb": after["size_mb"], "latency_ms": after["latency_ms"], "base_latency_ms": before["latency_ms"],
        "speedup": before["latency_ms"] / after["latency_ms"],
        "prune_time_s": progress["prune_time_s"], "train_time_s": progress["train_time_s"],
        "base_train_time_s": base["base_train_time_s"],
    }
    if "top5" in test:
        final["top5"] = test["top5"]
    return final
