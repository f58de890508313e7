"""One trial: base model -> prune -> fine-tune (or train from scratch) -> measure -> report to Ray Tune and MLflow.

``run_trial`` is a Ray Tune function trainable (``tune.with_parameters(run_trial, context=ctx)``) and also runs
standalone, without Ray. Its config is the resolved trial dict of ``sweep.config.spec``, typed once where the trial
starts (sweep.worker.identity); from there on every step takes the typed config or the section it reads.

Exactly once: every metric point is first kept in the trial's state, and a retried, resumed or restored trial
continues its own run and logs only the (metric, step) points that run does not hold yet, so each epoch appears once
in a run's history whatever was killed when. Checkpoints (Tune copies them to storage inside ``report``) and MLflow
writes happen each time ``checkpoint_every_s`` of epochs have passed, and the rest is written when the trial ends; a
retry redoes the epochs after its checkpoint (at most that long), and the points the failed attempt logged for them
stay as they were.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from sweep.worker.train import (
    evaluate,
    make_optimizer,
    pick_device,
    prepare_model,
    seed_everything,
    train_epoch,
)
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

    def record(self, metrics: dict[str, float], step: int = 0) -> None:
        self.points += [(name, step, float(value)) for name, value in metrics.items() if value is not None]

    def save(self, directory: Path, run_id: str) -> None:
        torch.save({"plan": self.plan.to_dict(), "state_dict": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "epoch": self.epoch, "train_time_s": self.train_time_s, "points": self.points,
                    "run_id": run_id, "rng": torch.get_rng_state()}, directory / STATE_FILE)


@contextmanager
def _captured_warnings(logger: str) -> Iterator[list[str]]:
    """The warnings a library logs while the block runs (the pruner's clamps), to keep them on the run's record."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield messages
    finally:
        target.removeHandler(handler)


def _read_checkpoint(directory: str | None) -> dict | None:
    if directory is None or not (Path(directory) / STATE_FILE).exists():
        return None
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


# --- the Tune adapter ---------------------------------------------------------------------------------------------

def _tune_reporter() -> tuple[Report, str | None, str]:
    """(report, restored checkpoint directory or None, Tune's trial id)."""
    from ray import tune

    quiet_ray_logs()  # this worker's checkpoint chatter
    allow_stopped_trials_to_record()
    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    trial_id = tune.get_context().get_trial_id()
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return report, None, trial_id
    local = tempfile.mkdtemp(prefix="sweep-restore-")
    checkpoint.to_directory(local)
    return report, local, trial_id


def selection_view(metrics: dict) -> dict:
    """What Ray Tune may see of a trial's metrics: schedulers and searchers never read a test metric. Every metric a
    spec may select on is there, NaN where the trial has no value (a trial left to another has none): Tune ends
    the whole sweep on a report without its metric."""
    seen = {k: v for k, v in metrics.items() if k not in METRICS or METRICS[k].selectable}
    return {**dict.fromkeys(tune_metrics(), math.nan), **seen}


def _node_tags(trial: str) -> dict[str, str]:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return {"ray.node_id": ctx.get_node_id(), "ray.trial": trial}
    except Exception:  # tags are a convenience: never fail a trial over them
        pass
    return {}


# --- the trial ----------------------------------------------------------------------------------------------------

def run_trial(config: dict, context: SweepContext, report: Report | None = None,
              checkpoint_dir: str | None = None, official: DataSplits | None = None) -> dict:
    """Base -> prune -> train -> measure; reports each epoch and logs one MLflow child run.

    Under Ray Tune (``report=None``) it reports to Tune and resumes from ``tune.get_checkpoint()``; standalone,
    ``report(metrics, checkpoint_dir)`` receives each epoch and ``checkpoint_dir`` resumes from one of those
    checkpoints. Returns every metric the run recorded (test metrics included); Tune sees only `selection_view`.
    `config` (a resolved trial dict, as Tune hands it) is typed here, once; nothing after reads the dict.
    """
    os.environ.pop("MLFLOW_RUN_ID", None)  # would hijack the parent of our run (mlflow issue 15713)
    cfg = typed_trial(config)  # a control trial drawn with any strategy is the one control trial (config.arms)
    chash = tracking.config_hash(identity(cfg))
    if report is None:
        report, checkpoint_dir, trial_id = _tune_reporter()
    else:
        trial_id = "standalone"
    saved = _read_checkpoint(checkpoint_dir)
    store = Store(context.tracking_uri)
    claim, resumed = _claim(store, cfg, chash, context, saved["run_id"] if saved else None, trial_id)
    if claim.kind != "claimed":  # finished already (perhaps by a launch that died before Tune heard), or running
        recorded = tracking.recorded_result(store, context.experiment, chash,
                                            run_id=claim.run_id) if claim.kind == "finished" else None
        status = "SKIPPED" if recorded is not None else "HELD"
        report(selection_view({**(recorded or {}), "trial_status": status}), None)
        return {**(recorded or {}), "skipped": 1.0} if recorded is not None else {"held": 1.0}

    lease = claim.lease
    try:
        device = pick_device(cfg.device)
        seed_everything(cfg.seed)
        if official is None:
            shared = context.shared_data.get(shared_data.data_key(identity(cfg)["dataset"]))  # this node's copy
            official = shared_data.fetch(shared) if shared is not None else None
        splits = load_splits(cfg, official)
        continued = claim.run_id == resumed
        run = tracking.TrialRun.resume(store, claim.run_id, identity(cfg)) if continued else \
            tracking.TrialRun(store, claim.run_id)
        # data.shared: the node's copy, or loaded by this trial
        run.set_tags({"data.shared": "true" if official is not None else "false", **_node_tags(trial_id)})
        if splits.skipped_files:
            run.set_tags({"data.skipped_files": f"{len(splits.skipped_files)}: " + ", ".join(splits.skipped_files)})
        run.set_tags(validation_tags(cfg, splits))
        result = _pipeline(cfg, context, splits, device, run, saved, report)
        lease.check()  # someone closed our run after our lease lapsed: do not call it FINISHED
    except SystemExit:  # Ray Tune stops a trial (ASHA) by exiting from inside tune.report
        lease.release("KILLED")
        raise
    except BaseException:
        lease.release("FAILED")
        raise
    lease.release("FINISHED")
    if context.rerun:  # `--force`: this run is now the config's one current run
        tracking.supersede_earlier(store, context.experiment, chash, claim.run_id)
    # Tune hears of the end after the run is FINISHED: a driver that dies, or a stop, while this report is on its way
    # leaves a complete run, not one a later launch would train again
    report(selection_view({**result, "trial_status": "FINISHED"}), None)
    return result


def sweep_trial(config: dict, context: SweepContext) -> None:
    """The Tune trainable: the trial dict sits under one key so a grid can be any list of configs. It lives here,
    not in sweep.driver.launch, because Ray imports a trainable's module in every trial worker: orchestrate would
    bring the report's pandas and matplotlib along (about 2 s of every worker's start)."""
    run_trial(config["trial"], context)  # reports to Tune itself; returning its dict would report it twice


def _claim(store: Store, cfg: TrialConfig, chash: str, context: SweepContext, checkpoint_run: str | None,
           trial_id: str) -> tuple[claims.ClaimResult, str | None]:
    """Claim this config in the tracking store (sweep.store.claims): a new run, the continued one, or someone else's.
    Returns the claim and the run this trial set out to continue (its checkpoint's, or its parent's unfinished)."""
    experiment, parent = context.experiment, context.parent_run_id
    resume = checkpoint_run or tracking.find_trial_run(store, experiment, chash, parent)
    # One owner per Tune trial, the same for its retries: a retry takes its own run over at once, while another
    # trial of this launch that drew the same config (a random search can) finds it held
    owner = f"{context.launch_id}/{trial_id}"
    result = claims.claim_trial(
        store, tracking.get_or_create_experiment(store, experiment), chash, owner,
        create_run=lambda tags: tracking.TrialRun.create(store, experiment, parent, identity(cfg), tags).run_id,
        lease_s=context.lease_s, resume_run_id=resume,
        # a run left by a dead launch keeps its lease until it lapses: wait that long rather than skip it
        wait_s=1.5 * context.lease_s if resume else 0.0,
        ignore_finished_before=context.launch_started if context.rerun else None)
    return result, resume


def load_splits(cfg: TrialConfig, official: DataSplits | None = None) -> DataSplits:
    """This trial's splits; carved out of the node's shared copy of the official splits when there is one.
    Validation comes from the test split (sweep.zoo.data.load_dataset, val_from_test) when dataset.val_source says
    so, or when it is `auto` and the network's starting weights were trained on this very dataset: held out of
    train, it would be images the base memorised."""
    data, model = cfg.dataset, cfg.model
    stats = None if model.factory else weights_stats(model.name, model.weights)  # a plug-in normalises itself
    seen = data.val_source == "test" or (data.val_source == "auto" and section_label(identity(cfg)["dataset"]) in
                                         weights_trained_on(model.name, model.weights, model.factory))
    return load_dataset(data.name, root=data.root, download=data.download, val_fraction=data.val_fraction,
                        seed=cfg.seed, image_size=data.image_size, limit=data.limit, test_limit=data.test_limit,
                        stats=stats, factory=data.factory, kwargs=data.kwargs,
                        official=official, val_from_test=seen)


def validation_tags(cfg: TrialConfig, splits: DataSplits) -> dict[str, str]:
    """Where the run's validation came from and which split it is: runs with different `data.val_split` measured
    val_accuracy on different images, and `sweep report --register` does not rank them together. The seed is not
    part of it: seeds hold out different images of one source at one size, draws of the same population."""
    data = {k: v for k, v in identity(cfg)["dataset"].items() if k not in ("download", "test_limit", "val_source")}
    split = tracking.config_hash({"dataset": data, "source": splits.val_source, "size": len(splits.val)})
    return {"data.val_source": splits.val_source, "data.val_size": str(len(splits.val)), "data.val_split": split}


def _pipeline(cfg: TrialConfig, context, splits, device, run, saved, report) -> dict:
    base_path, cached = ensure_base(cfg, context.cache_dir, splits, device, tracking_uri=context.tracking_uri,
                                    experiment=context.experiment, lease_s=context.lease_s)
    base_model, base_info = load_base(cfg.model, base_path, splits)
    run.set_tags({"base_cache": "hit" if cached else "miss", "base_key": base_key(cfg, splits.val_source)})
    state = _resume(cfg, base_model, saved, splits, device) if saved else \
        _start(cfg, base_model, base_info, splits, device, run)
    _log_new(run, state)  # a continued run gets only what it lacks (a dead worker may have logged some of it)

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
        epoch_metrics = {"val_accuracy": val["accuracy"], "val_loss": val["loss"], "train_loss": loss}
        state.record(epoch_metrics, step=epoch)
        # Short epochs would spend much of their time checkpointing and logging: both wait for enough epochs.
        # A retry redoes the epochs after the last checkpoint, and log_points skips the (metric, step) points the
        # failed attempt already logged, so each epoch is still recorded once.
        due = time.perf_counter() - last_checkpoint >= context.checkpoint_every_s
        if due or context.log_every_epoch:  # before the report: a trial stopped inside it may not get to log
            _log_new(run, state)
        try:
            if due:
                with tempfile.TemporaryDirectory(prefix="sweep-ckpt-") as tmp:
                    state.save(Path(tmp), run.run_id)
                    report(_epoch_view(state), tmp)  # persists the checkpoint before it returns
            else:
                report(_epoch_view(state), None)
        except BaseException:  # Tune stopped the trial inside report, or it failed: keep what it recorded
            _log_new(run, state)
            raise
        if due:
            last_checkpoint = time.perf_counter()

    return {**_finish(state, base_model, base_info, splits, device, run), "epoch": state.epoch}


def _epoch_view(state: TrialState) -> dict:
    """This epoch's report to Tune: its metrics, and the latest value of those recorded at pruning and with the base
    (a spec may select on flops_reduction)."""
    return selection_view({**{name: value for name, _, value in state.points}, "epoch": state.epoch})


def _log_new(run: tracking.TrialRun, state: TrialState) -> None:
    run.log_points(state.points[state.logged:])
    state.logged = len(state.points)


def _train_config(cfg: TrialConfig) -> TrainConfig:
    """The scratch arm trains the pruned architecture with the base's recipe (Liu et al. 2019), by default for as
    many epochs as the base had; the finetune arm uses the finetune section."""
    if cfg.prune.arm != "scratch":
        return cfg.finetune
    return cfg.base.model_copy(update={"epochs": cfg.prune.scratch_epochs or cfg.base.epochs})


def _start(cfg: TrialConfig, base_model, base_info, splits, device, run) -> TrialState:
    train = _train_config(cfg)
    points: dict[str, float] = {}
    with _captured_warnings("sweep.pruning") as warnings:
        model, plan, prune_time, step_accuracy = _prune(cfg, base_model.to(device), splits, device)
    if warnings:
        run.set_tags({"prune.warnings": " | ".join(warnings)})
    if "oracle_forward_passes" in plan.info:
        run.set_tags({"prune.oracle_forward_passes": str(plan.info["oracle_forward_passes"])})
    if cfg.prune.arm == "scratch" and cfg.prune.strategy == NO_CRITERION:
        # weights of an arbitrary criterion, about to be re-initialised: their accuracy says nothing
        pruned, step_accuracy = {}, []
    else:
        pruned = {"pruned_val_accuracy": step_accuracy[-1] if step_accuracy else
                  _accuracy(model, splits.val, train, splits, device),
                  "pruned_test_accuracy": _accuracy(model, splits.test, train, splits, device)}
    flops = count_flops(model, example_input(splits, device))
    points.update(base_info)
    points.update({
        **pruned, "prune_time_s": prune_time,
        "flops": float(flops), "macs": float(flops // 2), "flops_reduction": 1 - flops / base_info["base_flops"],
        "params": float(count_params(model)), "size_mb": size_mb(model),
        "channels_removed": _channels_removed(plan, base_model),
    })
    points["params_reduction"] = 1 - points["params"] / base_info["base_params"]
    if cfg.prune.arm == "scratch":  # the pruned architecture, re-initialised
        seed_everything(cfg.seed)
        model = apply_plan(new_model(cfg.model, splits.num_classes, splits.in_channels, source_weights=False), plan)
    model = prepare_model(model, device, train)
    optimizer, scheduler = make_optimizer(model, train, len(batches(splits.train, train.batch_size, True)))
    state = TrialState(model, plan, optimizer, scheduler, train)
    # pruned_val_accuracy: per pruning step for iterative schedules (step = pruning step), else once at step 0
    for step, accuracy in enumerate(step_accuracy, start=1):
        state.record({"pruned_val_accuracy": accuracy}, step=step)
    state.record({k: v for k, v in points.items() if not (step_accuracy and k == "pruned_val_accuracy")})
    return state


def _resume(cfg: TrialConfig, base_model, saved, splits, device) -> TrialState:
    train = _train_config(cfg)
    plan = PrunePlan.from_dict(saved["plan"])
    model = apply_plan(base_model, plan)
    model.load_state_dict(saved["state_dict"])
    model = prepare_model(model, device, train)
    optimizer, scheduler = make_optimizer(model, train, len(batches(splits.train, train.batch_size, True)))
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])  # dropout draws continue as if the trial had never stopped
    return TrialState(model, plan, optimizer, scheduler, train, saved["epoch"], saved["train_time_s"],
                      [tuple(p) for p in saved["points"]])


def _accuracy(model, split, cfg: TrainConfig, splits: DataSplits, device) -> float:
    return evaluate(model, batches(split, cfg.batch_size, False, device), device, splits.num_classes)["accuracy"]


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
        step_accuracy.append(_accuracy(m, splits.val, ft, splits, device))
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
        step_accuracy.append(_accuracy(result.model, splits.val, ft, splits, device))
    result.plan.info["arch"] = arch
    if strategy == "oracle":  # its cost: (units + 1) x oracle_batches per step, the units known only to the pruner
        result.plan.info["oracle_forward_passes"] = calibration.passes
    return result.model, result.plan, prune_time, step_accuracy


class _Counted:
    """Calibration batches that count how many times a criterion runs the network on one of them."""

    def __init__(self, items: list) -> None:
        self.items, self.passes = items, 0

    def __iter__(self) -> Iterator:
        for item in self.items:
            self.passes += 1
            yield item


def _finish(state: TrialState, base_model, base_info, splits, device, run) -> dict:
    """Test once, after the last epoch; save the pruned network and its per-layer channel table."""
    test = evaluate(state.model, batches(splits.test, state.train.batch_size, False, device), device,
                    splits.num_classes)
    final = {"test_accuracy": test["accuracy"], "test_accuracy_drop": base_info["base_test_accuracy"] -
             test["accuracy"], "train_time_s": state.train_time_s}
    if state.train.epochs == 0:  # no training: the final network is the pruned one, and so is its val accuracy
        final["val_accuracy"] = next(v for name, _, v in reversed(state.points) if name == "pruned_val_accuracy")
        # and its val loss, which a spec may select on too
        final["val_loss"] = evaluate(state.model, batches(splits.val, state.train.batch_size, False, device), device,
                                     splits.num_classes)["loss"]
    if "top5" in test:
        final["test_top5"] = test["top5"]
    state.record(final)
    with tempfile.TemporaryDirectory(prefix="sweep-art-") as tmp:
        out = Path(tmp)
        save_pruned(out / "pruned.pt", state.model.cpu(), state.plan)
        run.log_artifact(out / "pruned.pt", "checkpoint")
        (out / "channels.csv").write_text(_channel_table(state.plan, base_model), encoding="utf-8")
        run.log_artifact(out / "channels.csv")
        (out / REMOVED_FILE).write_text(json.dumps(removed_channels(state.plan, base_model)), encoding="utf-8")
        run.log_artifact(out / REMOVED_FILE)  # what `sweep report` compares criteria on, without the checkpoint
    _log_new(run, state)
    return {name: value for name, _, value in state.points}  # each metric's latest value


def removed_channels(plan: PrunePlan, base_model: nn.Module) -> dict:
    """Per conv and Linear of the base: its width and the output channels the plan removed (sweep.report.agreement)."""
    return {name: {"width": before, "removed": plan.removed.get(name, [])}
            for name, _, before, _ in plan.channel_counts(base_model)}


def _channel_table(plan: PrunePlan, base_model: nn.Module) -> str:
    rows = ["layer,type,channels_before,channels_after"]
    rows += [",".join(map(str, row)) for row in plan.channel_counts(base_model)]
    return "\n".join(rows) + "\n"
