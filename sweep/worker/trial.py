"""One trial: base model -> prune -> fine-tune (or train from scratch) -> measure -> report to Ray Tune and MLflow.

Exactly once: every metric point is kept in the trial's state (and checkpoint), and a retried, resumed or restored
trial continues its own run and logs only the (metric, step) points that run lacks. Checkpoints and MLflow writes
wait for ``checkpoint_every_s`` of epochs; a retry redoes the epochs after its checkpoint, and the points the failed
attempt logged for them stay as they were (docs/design.md, "The record: one run per config").
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from logging.handlers import BufferingHandler
from pathlib import Path

import torch
from torch import nn

from sweep.config.arms import CONTROL, NO_CRITERION
from sweep.config.names import METRICS, section_label, tune_metrics
from sweep.config.schema import TrainConfig, TrialConfig
from sweep.pruning import NEEDS_CALIBRATION, PrunePlan, apply_plan, prune, save_pruned
from sweep.store import claims, tracking
from sweep.store.store import Store
from sweep.worker import shared_data
from sweep.worker.base import base_key, ensure_base, example_input, load_base, new_model
from sweep.worker.identity import identity, typed_trial
from sweep.worker.measure import count_flops, count_params, size_mb
from sweep.worker.raycompat import allow_stopped_trials_to_record, quiet_ray_logs
from sweep.worker.train import evaluate, make_optimizer, pick_device, prepare_model, seed_everything, train_epoch
from sweep.zoo.batching import batches
from sweep.zoo.data import DataSplits, load_dataset
from sweep.zoo.models import weights_stats, weights_trained_on

STATE_FILE = "trial.pt"
REMOVED_FILE = "removed.json"  # artifact: per layer, its width and the channels removed
Report = Callable[[dict, "str | None"], None]  # (metrics, checkpoint directory or None)
EpochHook = Callable[[TrialConfig, int], None]  # (trial config, epoch) before each epoch: progress, fault tests
# Each data stream of a trial has its own seed, so a strategy that scores channels on data (taylor, apoz) does not
# change the order in which the fine-tune sees the training set.
_CALIBRATION_STREAM, _BETWEEN_STEPS_STREAM = 1_000_003, 2_000_003


@dataclass(frozen=True)
class SweepContext:
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    cache_dir: str  # shared by every trial (and node) of the sweep: base models live here
    rerun: bool = False  # run even when this exact config already has a FINISHED run (`sweep run --force`)
    on_epoch: EpochHook | None = None  # must pickle: it travels to the trial workers
    launch_id: str = field(default_factory=lambda: claims.new_owner_id("launch"))  # owner of this launch's claims
    launch_started: float = field(default_factory=time.time)
    lease_s: float = claims.DEFAULT_LEASE_S
    shared_data: dict = field(default_factory=dict)  # sweep.worker.shared_data.data_key -> ObjectRef of official splits
    checkpoint_every_s: float = 0.0  # 0: a checkpoint every epoch
    log_every_epoch: bool = False  # a scheduler may stop the trial after any epoch: its record must reach that epoch


@dataclass
class TrialState:
    """Everything a trial needs to continue where it stopped; all of it is in the checkpoint."""

    model: nn.Module
    plan: PrunePlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: TrainConfig  # the fine-tune settings, or the base's for the scratch arm
    epoch: int = 0  # epochs done
    train_time_s: float = 0.0
    points: list[tuple[str, int, float]] = field(default_factory=list)  # every metric point so far
    logged: int = 0  # points[:logged] are in MLflow

    @classmethod
    def new(cls, model: nn.Module, plan: PrunePlan, train: TrainConfig, splits: DataSplits,
            device: torch.device) -> TrialState:
        model = prepare_model(model, device, train)
        steps_per_epoch = len(batches(splits.train, train.batch_size, True))
        return cls(model, plan, *make_optimizer(model, train, steps_per_epoch), train)

    @classmethod
    def load(cls, saved: dict, base_model: nn.Module, train: TrainConfig, splits: DataSplits,
             device: torch.device) -> TrialState:
        plan = PrunePlan.from_dict(saved["plan"])
        model = apply_plan(base_model, plan)
        model.load_state_dict(saved["state_dict"])
        state = cls.new(model, plan, train, splits, device)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])  # dropout draws continue as if the trial had never stopped
        state.epoch, state.train_time_s = saved["epoch"], saved["train_time_s"]
        state.points = [tuple(p) for p in saved["points"]]
        return state

    def save(self, directory: Path, run_id: str) -> None:
        torch.save({"plan": self.plan.to_dict(), "state_dict": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "epoch": self.epoch, "train_time_s": self.train_time_s, "points": self.points,
                    "run_id": run_id, "rng": torch.get_rng_state()}, directory / STATE_FILE)

    def record(self, metrics: dict[str, float], step: int = 0) -> None:
        self.points += [(name, step, float(value)) for name, value in metrics.items() if value is not None]

    def log_new(self, run: tracking.TrialRun) -> None:
        run.log_points(self.points[self.logged:])
        self.logged = len(self.points)

    def latest(self) -> dict[str, float]:
        return {name: value for name, _, value in self.points}


def _tune_reporter() -> tuple[Report, str | None, str]:
    """(report, restored checkpoint directory or None, Tune's trial id)."""
    from ray import tune

    quiet_ray_logs()  # this worker's checkpoint chatter
    allow_stopped_trials_to_record()
    checkpoint = tune.get_checkpoint()
    restored = checkpoint.to_directory(tempfile.mkdtemp(prefix="sweep-restore-")) if checkpoint else None

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    return report, restored, tune.get_context().get_trial_id()


def selection_view(metrics: dict) -> dict:
    """What Ray Tune may see: never a test metric, and every metric a spec may select on (NaN where the trial has no
    value, as a trial left to another): Tune ends the whole sweep on a report without its metric."""
    seen = {k: v for k, v in metrics.items() if k not in METRICS or METRICS[k].selectable}
    return {**dict.fromkeys(tune_metrics(), math.nan), **seen}


def _node_tags(trial: str) -> dict[str, str]:
    try:  # tags are a convenience: never fail a trial over them
        import ray

        return {"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.trial": trial} \
            if ray.is_initialized() else {}
    except Exception:
        return {}


def run_trial(config: dict, context: SweepContext, report: Report | None = None,
              checkpoint_dir: str | None = None) -> dict:
    """Base -> prune -> train -> measure; reports each epoch and logs one MLflow child run.

    Under Ray Tune (``report=None``) it reports to Tune and resumes from ``tune.get_checkpoint()``; standalone,
    ``report(metrics, checkpoint_dir)`` receives each epoch and ``checkpoint_dir`` resumes from one of those
    checkpoints. Returns every metric the run recorded (test metrics included); Tune sees only `selection_view`.
    """
    os.environ.pop("MLFLOW_RUN_ID", None)  # would hijack the parent of our run (mlflow issue 15713)
    cfg = typed_trial(config)  # typed here, once; a control trial drawn with any strategy is the one control trial
    chash = tracking.config_hash(identity(cfg))
    trial_id = "standalone"
    if report is None:
        report, checkpoint_dir, trial_id = _tune_reporter()
    state_file = Path(checkpoint_dir, STATE_FILE) if checkpoint_dir else None
    saved = torch.load(state_file, map_location="cpu", weights_only=True) if state_file and state_file.exists() \
        else None
    store, experiment, parent = Store(context.tracking_uri), context.experiment, context.parent_run_id
    # Claim this config (sweep.store.claims), one owner per Tune trial and its retries: a retry takes its own run over
    # at once, while another trial of this launch that drew the same config (a random search can) finds it held.
    resumed = saved["run_id"] if saved else tracking.find_trial_run(store, experiment, chash, parent)
    claim = claims.claim_trial(
        store, tracking.get_or_create_experiment(store, experiment), chash, f"{context.launch_id}/{trial_id}",
        create_run=lambda tags: tracking.TrialRun.create(store, experiment, parent, identity(cfg), tags).run_id,
        lease_s=context.lease_s, resume_run_id=resumed,
        # a run left by a dead launch keeps its lease until it lapses: wait that long rather than skip it
        wait_s=1.5 * context.lease_s if resumed else 0.0,
        ignore_finished_before=context.launch_started if context.rerun else None)
    if claim.kind != "claimed":  # finished already (perhaps by a launch that died before Tune heard), or running
        recorded = tracking.recorded_result(store, experiment, chash, run_id=claim.run_id) \
            if claim.kind == "finished" else None
        status = "SKIPPED" if recorded is not None else "HELD"
        report(selection_view({**(recorded or {}), "trial_status": status}), None)
        return {**(recorded or {}), "skipped": 1.0} if recorded is not None else {"held": 1.0}

    try:
        device = pick_device(cfg.device)
        seed_everything(cfg.seed)
        shared = context.shared_data.get(shared_data.data_key(identity(cfg)["dataset"]))  # this node's copy
        official = shared_data.fetch(shared) if shared is not None else None
        splits = load_splits(cfg, official)
        run = tracking.TrialRun.resume(store, claim.run_id, identity(cfg)) if claim.run_id == resumed else \
            tracking.TrialRun(store, claim.run_id)
        # data.shared: the node's copy, or loaded by this trial
        tags = {"data.shared": "true" if official is not None else "false", **_node_tags(trial_id)}
        if splits.skipped_files:
            tags["data.skipped_files"] = f"{len(splits.skipped_files)}: " + ", ".join(splits.skipped_files)
        # Which validation split the run measured on: `sweep report --register` does not rank runs of different
        # data.val_split together. Not the seed: seeds hold out different images of one source, one population.
        data = {k: v for k, v in identity(cfg)["dataset"].items() if k not in ("download", "test_limit", "val_source")}
        split = tracking.config_hash({"dataset": data, "source": splits.val_source, "size": len(splits.val)})
        run.set_tags({**tags, "data.val_source": splits.val_source, "data.val_size": str(len(splits.val)),
                      "data.val_split": split})
        result = _pipeline(cfg, context, splits, device, run, saved, report)
        claim.lease.check()  # someone closed our run after our lease lapsed: do not call it FINISHED
    except BaseException as error:  # Ray Tune stops a trial (ASHA) by exiting from inside tune.report
        claim.lease.release("KILLED" if isinstance(error, SystemExit) else "FAILED")
        raise
    claim.lease.release("FINISHED")
    if context.rerun:  # `--force`: this run is now the config's one current run
        tracking.supersede_earlier(store, experiment, chash, claim.run_id)
    # Tune hears of the end after the run is FINISHED: a driver that dies, or a stop, while this report is on its way
    # leaves a complete run, not one a later launch would train again
    report(selection_view({**result, "trial_status": "FINISHED"}), None)
    return result


def sweep_trial(config: dict, context: SweepContext) -> None:
    """The Tune trainable (the trial dict under one key, so a grid can be any list of configs). Not in sweep.driver:
    Ray imports it in every worker, and the driver's pandas and matplotlib would cost each start about 2 s."""
    run_trial(config["trial"], context)  # reports to Tune itself; returning its dict would report it twice


def load_splits(cfg: TrialConfig, official: DataSplits | None = None) -> DataSplits:
    """This trial's splits, carved out of the node's shared official splits when there are some. Validation comes
    from the test split when dataset.val_source says so, or when it is `auto` and the network's starting weights
    were trained on this very dataset: held out of train, it would be images the base memorised."""
    data, model = cfg.dataset, cfg.model
    stats = None if model.factory else weights_stats(model.name, model.weights)  # a plug-in normalises itself
    seen = data.val_source == "test" or (data.val_source == "auto" and section_label(identity(cfg)["dataset"]) in
                                         weights_trained_on(model.name, model.weights, model.factory))
    return load_dataset(data.name, root=data.root, download=data.download, val_fraction=data.val_fraction,
                        seed=cfg.seed, image_size=data.image_size, limit=data.limit, test_limit=data.test_limit,
                        stats=stats, factory=data.factory, kwargs=data.kwargs,
                        official=official, val_from_test=seen)


def _pipeline(cfg: TrialConfig, context, splits, device, run, saved, report) -> dict:
    base_path, cached = ensure_base(cfg, context.cache_dir, splits, device, tracking_uri=context.tracking_uri,
                                    experiment=context.experiment, lease_s=context.lease_s)
    base_model, base_info = load_base(cfg.model, base_path, splits)
    run.set_tags({"base_cache": "hit" if cached else "miss", "base_key": base_key(cfg, splits.val_source)})
    # The scratch arm trains the pruned architecture with the base's recipe (Liu et al. 2019), base.epochs by default.
    train = cfg.base.model_copy(update={"epochs": cfg.prune.scratch_epochs or cfg.base.epochs}) \
        if cfg.prune.arm == "scratch" else cfg.finetune
    state = TrialState.load(saved, base_model, train, splits, device) if saved else \
        _start(cfg, train, base_model, base_info, splits, device, run)
    state.log_new(run)  # a continued run gets only what it lacks (a dead worker may have logged some of it)

    train_batches = batches(splits.train, state.train.batch_size, True, device, seed=cfg.seed)
    val_batches = batches(splits.val, state.train.batch_size, False, device)
    last_checkpoint = time.perf_counter()
    for epoch in range(state.epoch + 1, state.train.epochs + 1):
        if context.on_epoch is not None:
            context.on_epoch(cfg, epoch)
        train_batches.set_epoch(epoch)  # the shuffle depends on (seed, epoch): a resumed trial sees the same order
        start = time.perf_counter()
        loss = train_epoch(state.model, train_batches, state.optimizer, state.scheduler, state.train, device)
        state.train_time_s += time.perf_counter() - start
        val = evaluate(state.model, val_batches, device, splits.num_classes)
        state.epoch = epoch
        state.record({"val_accuracy": val["accuracy"], "val_loss": val["loss"], "train_loss": loss}, step=epoch)
        # Short epochs would spend much of their time checkpointing and logging: both wait for enough epochs.
        due = time.perf_counter() - last_checkpoint >= context.checkpoint_every_s
        if due or context.log_every_epoch:  # before the report: a trial stopped inside it may not get to log
            state.log_new(run)
        try:
            with tempfile.TemporaryDirectory(prefix="sweep-ckpt-") if due else nullcontext() as tmp:
                if due:
                    state.save(Path(tmp), run.run_id)
                # the latest value of each metric: also those recorded at pruning (a spec may select on flops_reduction)
                report(selection_view({**state.latest(), "epoch": state.epoch}), tmp)  # persists the checkpoint
        except BaseException:  # Tune stopped the trial inside report, or it failed: keep what it recorded
            state.log_new(run)
            raise
        if due:
            last_checkpoint = time.perf_counter()

    return {**_finish(state, base_model, splits, device, run), "epoch": state.epoch}


def _start(cfg: TrialConfig, train: TrainConfig, base_model, base_info, splits, device, run) -> TrialState:
    warnings = BufferingHandler(sys.maxsize)  # the pruner's clamps, kept on the run's record
    warnings.setLevel(logging.WARNING)
    logging.getLogger("sweep.pruning").addHandler(warnings)
    try:
        model, plan, prune_time, step_accuracy = _prune(cfg, base_model.to(device), splits, device)
    finally:
        logging.getLogger("sweep.pruning").removeHandler(warnings)
    if warnings.buffer:
        run.set_tags({"prune.warnings": " | ".join(record.getMessage() for record in warnings.buffer)})
    if "oracle_forward_passes" in plan.info:
        run.set_tags({"prune.oracle_forward_passes": str(plan.info["oracle_forward_passes"])})
    if cfg.prune.arm == "scratch" and cfg.prune.strategy == NO_CRITERION:
        # weights of an arbitrary criterion, about to be re-initialised: their accuracy says nothing
        pruned, step_accuracy = {}, []
    else:  # pruned_val_accuracy: per pruning step for iterative schedules (step = pruning step), else once at step 0
        pruned = {"pruned_val_accuracy": _evaluate(model, splits.val, train, splits, device)["accuracy"]} \
            if not step_accuracy else {}
        pruned["pruned_test_accuracy"] = _evaluate(model, splits.test, train, splits, device)["accuracy"]
    flops, params = count_flops(model, example_input(splits, device)), count_params(model)
    points = {**base_info, **pruned, "prune_time_s": prune_time, "flops": float(flops), "macs": float(flops // 2),
              "flops_reduction": 1 - flops / base_info["base_flops"], "params": float(params),
              "size_mb": size_mb(model), "channels_removed": _channels_removed(plan, base_model),
              "params_reduction": 1 - params / base_info["base_params"]}
    if cfg.prune.arm == "scratch":  # the pruned architecture, re-initialised
        seed_everything(cfg.seed)
        model = apply_plan(new_model(cfg.model, splits.num_classes, splits.in_channels, source_weights=False), plan)
    state = TrialState.new(model, plan, train, splits, device)
    for step, accuracy in enumerate(step_accuracy, start=1):
        state.record({"pruned_val_accuracy": accuracy}, step=step)
    state.record(points)
    return state


def _evaluate(model, split, train: TrainConfig, splits: DataSplits, device) -> dict[str, float]:
    return evaluate(model, batches(split, train.batch_size, False, device), device, splits.num_classes)


def _channels_removed(plan: PrunePlan, base_model: nn.Module) -> float:
    """Fraction of conv/linear output channels removed, the output layer (never pruned) left out."""
    rows = plan.channel_counts(base_model)[:-1]
    before = sum(r[2] for r in rows)
    return (before - sum(r[3] for r in rows)) / before if before else 0.0


def _prune(cfg: TrialConfig, model, splits, device) -> tuple[nn.Module, PrunePlan, float, list[float]]:
    p, ft = cfg.prune, cfg.finetune
    arch = {"model": identity(cfg)["model"], "num_classes": splits.num_classes, "in_channels": splits.in_channels,
            "image_size": splits.image_size}
    if p.arm == CONTROL:  # the unpruned base, fine-tuned like every pruned network
        return apply_plan(model, PrunePlan(info={"arch": arch})), PrunePlan(info={"arch": arch}), 0.0, []
    # strategy none (the scratch arm under local scope): every criterion gives this architecture; l1 needs no data
    strategy = "l1" if p.strategy == NO_CRITERION else p.strategy
    calibration = None
    if strategy in NEEDS_CALIBRATION:
        stream = batches(splits.train, ft.batch_size, True, device, seed=cfg.seed + _CALIBRATION_STREAM, augment=False)
        count = p.oracle_batches if strategy == "oracle" else p.calibration_batches
        calibration = _Counted([batch for batch, _ in zip(stream, range(count))])
    between = batches(splits.train, ft.batch_size, True, device, seed=cfg.seed + _BETWEEN_STEPS_STREAM)
    step_accuracy: list[float] = []

    def fine_tune_between_steps(m: nn.Module, step: int) -> None:  # Molchanov et al.: prune, fine-tune, repeat
        step_accuracy.append(_evaluate(m, splits.val, ft, splits, device)["accuracy"])
        one_epoch = ft.model_copy(update={"epochs": 1})
        between.set_epoch(step)
        opt, sched = make_optimizer(m, one_epoch, len(between))
        train_epoch(m, between, opt, sched, one_epoch, device)

    iterative = p.schedule == "iterative"
    start = time.perf_counter()
    result = prune(model, example_input(splits, device), strategy=strategy, ratio=p.ratio, scope=p.scope,
                   target=p.target, calibration=calibration, min_channels=p.min_channels, round_to=p.round_to,
                   ignore=tuple(p.ignore), ratios=p.ratios or None, steps=p.steps if iterative else 1,
                   callback=fine_tune_between_steps, seed=cfg.seed)
    prune_time = time.perf_counter() - start
    if iterative:  # the last step's accuracy, measured like the others
        step_accuracy.append(_evaluate(result.model, splits.val, ft, splits, device)["accuracy"])
    result.plan.info["arch"] = arch
    if strategy == "oracle":  # its cost: (units + 1) x oracle_batches per step, the units known only to the pruner
        result.plan.info["oracle_forward_passes"] = calibration.passes
    return result.model, result.plan, prune_time, step_accuracy


@dataclass
class _Counted:
    """Calibration batches that count how many times a criterion runs the network on one of them."""

    items: list
    passes: int = 0

    def __iter__(self) -> Iterator:
        for item in self.items:
            self.passes += 1
            yield item


def _finish(state: TrialState, base_model, splits, device, run) -> dict:
    """Test once, after the last epoch; save the pruned network and its per-layer channel table."""
    test = _evaluate(state.model, splits.test, state.train, splits, device)
    final = {"test_accuracy": test["accuracy"], "test_accuracy_drop": state.latest()["base_test_accuracy"] -
             test["accuracy"], "train_time_s": state.train_time_s}
    if state.train.epochs == 0:  # no training: the final network is the pruned one, and so are its val metrics
        final["val_accuracy"] = next(v for name, _, v in reversed(state.points) if name == "pruned_val_accuracy")
        final["val_loss"] = _evaluate(state.model, splits.val, state.train, splits, device)["loss"]
    if "top5" in test:
        final["test_top5"] = test["top5"]
    state.record(final)
    counts = state.plan.channel_counts(base_model)
    with tempfile.TemporaryDirectory(prefix="sweep-art-") as tmp:
        out = Path(tmp)
        save_pruned(out / "pruned.pt", state.model.cpu(), state.plan)
        run.log_artifact(out / "pruned.pt", "checkpoint")
        rows = ["layer,type,channels_before,channels_after", *(",".join(map(str, row)) for row in counts)]
        (out / "channels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        run.log_artifact(out / "channels.csv")
        (out / REMOVED_FILE).write_text(json.dumps(removed_channels(state.plan, base_model)), encoding="utf-8")
        run.log_artifact(out / REMOVED_FILE)  # what `sweep report` compares criteria on, without the checkpoint
    state.log_new(run)
    return state.latest()


def removed_channels(plan: PrunePlan, base_model: nn.Module) -> dict:
    """Per conv and Linear of the base: its width and the output channels the plan removed (sweep.report.agreement)."""
    return {name: {"width": before, "removed": plan.removed.get(name, [])}
            for name, _, before, _ in plan.channel_counts(base_model)}
