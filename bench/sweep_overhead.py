"""Sweep overhead: `sweep.driver.launch.run_sweep` against a plain Ray Tune loop running the same trial compute.

Both arms run in the same process, on the same local Ray (started once, not timed), the same grid, the same
`tune.TuneConfig` (reused workers, 1 CPU a trial) and the same cached base network (trained before timing):

  plain   tune.Tuner over a function trainable built from sweep's public pieces: load data, load the base, prune
          (sweep.pruning.prune), the pruned accuracy and FLOPs, fine-tune E epochs reporting val_accuracy each epoch,
          test once. No MLflow, no claims, no checkpoint, no artifacts, no latency phase, no report.
  sweep   run_sweep on the same grid: all of the above plus claims, the MLflow child run and params, checkpoints
          and metric logging on the spec's schedule (`checkpoint_every_s`, default 10 s), the pruned network
          and channel table as artifacts; then the latency phase and the report (timed and shown separately).
          `--checkpoint-every-s 0` checkpoints and logs every epoch (the old rule).

Nothing in sweep is patched: the plain trial times its own pieces, and the sweep arm's phases and per-trial pieces
come from what the launch records: the parent run's start and end, each trial run's start, end, train_time_s and
prune_time_s, the latency metrics' timestamps (MLflow), and the last write of Tune's experiment state
(bench/_records.py). The latency phase and the report are shown separately.

    python bench/sweep_overhead.py                       # short (2 epochs) and long (10 epochs) trials, 8 each
    python bench/sweep_overhead.py --short 2 --long 0    # short only
    python bench/sweep_overhead.py --smoke               # 1 tiny trial of 1 epoch per arm: the code path only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the plain arm's Tuner: no configuration box, as run_sweep's

# after the variables Ray reads when it is imported; at the top, so that a plain trial's worker imports them when it
# receives the trainable, before Tune's clock starts, as a sweep trial's worker imports sweep.worker.trial
from _records import launch_phases  # noqa: E402
from ray import tune  # noqa: E402

from sweep.config.schema import trial_config  # noqa: E402
from sweep.pruning import prune  # noqa: E402
from sweep.worker import train  # noqa: E402
from sweep.worker.base import ensure_base, example_input, load_base  # noqa: E402
from sweep.worker.measure import count_flops  # noqa: E402
from sweep.worker.trial import load_splits  # noqa: E402
from sweep.zoo.batching import batches  # noqa: E402

SPACE = """
name: {name}
dataset: {{name: digits{limit}}}
model: {{name: small_cnn}}
base: {{epochs: 1}}
finetune: {{epochs: {epochs}, batch_size: 64}}
measure: {{batch_size: 1, warmup: 2, runs: {runs}}}
space:
  strategy: {{grid: {strategies}}}
  ratio: {{grid: {ratios}}}
resources: {{cpu: 1}}
checkpoint_every_s: {every}
"""
FULL = {"limit": "", "runs": 10, "strategies": ["l1", "l2", "fpgm", "random"], "ratios": [0.3, 0.6]}
SMOKE = {"limit": ", limit: 200", "runs": 2, "strategies": ["l1"], "ratios": [0.5]}


# --- the plain arm --------------------------------------------------------------------------------------------


def plain_trial(config: dict, cache_dir: str, log: str) -> None:
    """The same compute as a sweep trial, reporting val_accuracy each epoch to Tune: nothing else."""
    pieces: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        pieces[name] = pieces.get(name, 0.0) + now - since
        return now

    start = t = time.perf_counter()
    trial = config["trial"]
    cfg = trial_config(trial)
    device = train.pick_device(cfg.device)
    train.seed_everything(cfg.seed)
    splits = load_splits(cfg)
    base_path, _ = ensure_base(cfg, cache_dir, splits, device)
    base_model, _ = load_base(cfg.model, base_path, splits)
    t = lap("data and base", t)
    p, ft = cfg.prune, cfg.finetune
    example = example_input(splits, device)
    model = prune(base_model.to(device), example, strategy=p.strategy, ratio=p.ratio, scope=p.scope, target=p.target,
                  min_channels=p.min_channels, round_to=p.round_to, seed=cfg.seed).model
    t = lap("prune", t)
    for split in (splits.val, splits.test):  # the pruned accuracies a trial records
        train.evaluate(model, batches(split, ft.batch_size, False, device), device, splits.num_classes)
    count_flops(model, example)
    model = train.prepare_model(model, device, ft)
    optimizer, scheduler = train.make_optimizer(model, ft, len(batches(splits.train, ft.batch_size, True)))
    train_batches = batches(splits.train, ft.batch_size, True, device, seed=cfg.seed)
    val_batches = batches(splits.val, ft.batch_size, False, device)
    t = lap("pruned accuracy, FLOPs, optimizer", t)
    for epoch in range(1, ft.epochs + 1):
        train_batches.set_epoch(epoch)
        train.train_epoch(model, train_batches, optimizer, scheduler, ft, device)
        t = lap("fine-tune (train_time_s)", t)
        val = train.evaluate(model, val_batches, device, splits.num_classes)
        t = lap("evaluate", t)
        tune.report({"val_accuracy": val["accuracy"], "epoch": epoch})
        t = lap("tune.report", t)
    test = train.evaluate(model, batches(splits.test, ft.batch_size, False, device), device, splits.num_classes)
    t = lap("evaluate", t)
    tune.report({"val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"], "epoch": ft.epochs})
    lap("tune.report", t)
    with open(log, "a") as f:
        f.write(json.dumps({**pieces, "trial wall": time.perf_counter() - start}) + "\n")


def tune_trial_seconds(folder: str | Path) -> list[float]:
    """Each trial's time_total_s as Tune recorded it (its last result in the trial folders under `folder`)."""
    return [json.loads(path.read_text().splitlines()[-1])["time_total_s"] for path in Path(folder).rglob("result.json")]


def run_plain(spec, cache: str, work: Path, log: str) -> float:
    trainable = tune.with_resources(tune.with_parameters(plain_trial, cache_dir=cache, log=log), {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(spec.grid_configs())},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", reuse_actors=True,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(name="plain", storage_path=str(work / "plain"), verbose=0))
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    assert not grid.errors, grid.errors
    return wall


# --- the sweep arm, from what it records -----------------------------------------------------------------------


def run_swept(spec, uri: str, storage: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """run_sweep's wall split into phases by its records, and each trial's pieces as its MLflow run holds them."""
    from mlflow.tracking import MlflowClient

    from sweep.driver.launch import run_sweep
    from sweep.store import tracking

    called = time.time()
    start = time.perf_counter()
    outcome = run_sweep(spec, tracking_uri=uri, storage=storage, verbose=0)
    total = time.perf_counter() - start
    assert outcome.ran == len(spec.grid_configs()) and outcome.failed == 0, outcome
    phases = {**launch_phases(outcome, uri, called, called + total), "total": total}
    trials = []
    for run in tracking.child_runs(MlflowClient(uri), spec.name):
        wall = (run.info.end_time - run.info.start_time) / 1e3
        metrics = run.data.metrics
        trials.append({"MLflow run open (start to end)": wall, "prune": metrics["prune_time_s"],
                       "fine-tune (train_time_s)": metrics["train_time_s"],
                       "rest of the run (data, base, evaluate, claims, logging, checkpoints)":
                           wall - metrics["prune_time_s"] - metrics["train_time_s"]})
    return phases, {"Tune's time_total_s": tune_trial_seconds(outcome.storage), **_columns(trials)}


def _columns(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def one_length(epochs: int, work: Path, every: float, sizes: dict) -> None:
    from sweep.config.spec import parse_spec
    from sweep.driver import session
    from sweep.store import tracking
    from sweep.worker.trial import SweepContext, run_trial

    name = f"overhead_e{epochs}"
    spec = parse_spec(SPACE.format(name=name, epochs=epochs, every=every, **sizes))
    storage = str(work / "store")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{work}/mlflow.db")
    tracking.init_store(uri)
    cache = session.cache_dir(storage, name)
    # the shared base, trained once before timing (both arms read it from the same cache)
    run_trial(spec.grid_configs()[0], SweepContext(uri, f"{name}_warm", None, cache), report=lambda m, c: None)

    load0 = os.getloadavg()[0]
    plain_log = str(work / f"{name}_plain.jsonl")
    plain = run_plain(spec, cache, work, plain_log)
    phases, sweep_rows = run_swept(spec, uri, storage)
    load1 = os.getloadavg()[0]
    plain_rows = {"Tune's time_total_s": tune_trial_seconds(work / "plain"),
                  **_columns([json.loads(line) for line in Path(plain_log).read_text().splitlines()])}

    n = len(spec.grid_configs())
    separate = phases["latency phase"] + phases["report"]
    core = phases["total"] - separate
    print(f"\n{n} trials of {epochs} fine-tune epochs (digits, small_cnn) on 2 slots, reused workers; "
          f"load {load0:.1f} -> {load1:.1f} (measured under load)")
    print(f"{'arm / phase':<40} {'wall s':>8} {'/ plain':>8}")
    print(f"{'plain Tuner.fit':<40} {plain:>8.1f} {1:>8.2f}")
    for label, value in [*phases.items(), ("total excl. latency + report", core)]:
        print(f"{'sweep ' + label:<40} {value:>8.1f} {value / plain:>8.2f}")
    print(f"per trial, mean of {n} (Tune's record of each; the plain trainable's own timings; the sweep trial's "
          f"MLflow run)")
    for arm, columns in (("plain", plain_rows), ("sweep", sweep_rows)):
        for key, values in columns.items():
            print(f"  {arm} {key:<70} {statistics.mean(values):>8.3f}")
    print(f"overhead ratio, {epochs}-epoch trials: sweep (excl. latency phase and report) / plain = "
          f"{core / plain:.2f}; with them {phases['total'] / plain:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=2, help="fine-tune epochs of the short trials (0: skip)")
    parser.add_argument("--long", type=int, default=10, help="fine-tune epochs of the long trials (0: skip)")
    parser.add_argument("--checkpoint-every-s", type=float, default=10.0, help="the sweep arm's checkpoint_every_s")
    parser.add_argument("--smoke", action="store_true", help="1 trial of 1 epoch on 200 digits: the code path only")
    args = parser.parse_args()
    lengths, sizes = ((1,), SMOKE) if args.smoke else ((args.short, args.long), FULL)
    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    import ray

    from sweep.driver import session

    session.start_ray(None)
    try:
        for epochs in lengths:
            if epochs:
                one_length(epochs, work, args.checkpoint_every_s, sizes)
    finally:
        ray.shutdown()
        if args.smoke:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
