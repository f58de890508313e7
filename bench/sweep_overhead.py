"""Sweep overhead: `sweep.driver.launch.run_sweep` against a plain Ray Tune loop running the same trial compute.

Both arms run in the same process, on the same local Ray (started once, not timed), the same grid, the same
`tune.TuneConfig` (reused workers, 1 CPU a trial) and the same cached base network (trained before timing):

  plain   tune.Tuner over a function trainable: load data, load the base, prune (sweep.worker.trial._start: prune, the
          pruned accuracy, FLOPs), fine-tune E epochs reporting val_accuracy each epoch, test once. No MLflow, no
          claims, no checkpoint, no artifacts, no latency phase, no report.
  sweep   run_sweep on the same grid: all of the above plus claims, the MLflow child run and params, checkpoints
          and metric logging on the spec's schedule (`checkpoint_every_s`, default 10 s), the pruned network
          and channel table as artifacts; then the latency phase and the report (timed and shown separately).
          `--checkpoint-every-s 0` checkpoints and logs every epoch (the old rule).

Inside the trial workers, the sweep arm's pieces are timed with wrappers installed by this script (claim, run
creation, tune.report with its checkpoint, metric logging, artifacts), so the table says where the time goes.

    python bench/sweep_overhead.py                       # short (2 epochs) and long (10 epochs) trials, 8 each
    python bench/sweep_overhead.py --short 2 --long 0    # short only
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SPACE = """
name: {name}
dataset: {{name: digits}}
model: {{name: small_cnn}}
base: {{epochs: 1}}
finetune: {{epochs: {epochs}, batch_size: 64}}
measure: {{batch_size: 1, warmup: 2, runs: 10}}
space:
  strategy: {{grid: [l1, l2, fpgm, random]}}
  ratio: {{grid: [0.3, 0.6]}}
resources: {{cpu: 1}}
checkpoint_every_s: {every}
"""


# --- the plain arm --------------------------------------------------------------------------------------------


class _NoRun:
    """sweep.worker.trial._start tags the run with pruning warnings; the plain arm has no run."""

    run_id = "none"

    def set_tags(self, tags: dict) -> None:
        pass


def plain_trial(config: dict, cache_dir: str, log: str) -> None:
    """The same compute as a sweep trial, reporting val_accuracy each epoch to Tune: nothing else."""
    from ray import tune

    from sweep.config.schema import trial_config
    from sweep.worker import trial as T
    from sweep.worker.train import pick_device, seed_everything
    from sweep.zoo.data import batches

    sink: dict[str, float] = {}
    _install_timers(sink)
    ensure_base, load_base, train_epoch, evaluate = T.ensure_base, T.load_base, T.train_epoch, T.evaluate
    start = time.perf_counter()
    t = config["trial"]
    cfg = trial_config(t)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    splits = T.load_splits(cfg)
    base_path, _ = ensure_base(t, cache_dir, splits, device)
    base_model, base_info = load_base(t, base_path, splits)
    state = T._start(t, cfg, base_model, base_info, splits, device, _NoRun())
    train_batches = batches(splits.train, state.train.batch_size, True, device, seed=cfg.seed)
    val_batches = batches(splits.val, state.train.batch_size, False, device)
    report_s = 0.0
    for epoch in range(1, state.train.epochs + 1):
        train_batches.set_epoch(epoch)
        train_epoch(state.model, train_batches, state.optimizer, state.scheduler, state.train, device)
        val = evaluate(state.model, val_batches, device, splits.num_classes)
        r0 = time.perf_counter()
        tune.report({"val_accuracy": val["accuracy"], "epoch": epoch})
        report_s += time.perf_counter() - r0
    test = evaluate(state.model, batches(splits.test, state.train.batch_size, False, device), device,
                    splits.num_classes)
    r0 = time.perf_counter()
    tune.report({"val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"], "epoch": state.train.epochs})
    report_s += time.perf_counter() - r0
    with open(log, "a") as f:
        f.write(json.dumps({"arm": "plain", **sink, "trial_s": time.perf_counter() - start,
                            "tune.report (plain)": report_s}) + "\n")


# --- timing the sweep arm's pieces inside the workers ---------------------------------------------------------

_PATCHED: dict = {}


def _install_timers(sink: dict) -> None:
    """Wrap the sweep functions a trial calls so each adds its wall time to sink[name] (once per process)."""
    from sweep.store import claims, tracking
    from sweep.worker import trial

    _PATCHED["sink"] = sink
    if _PATCHED.get("done"):
        return
    _PATCHED["done"] = True

    _PATCHED["depth"] = 0

    def timed(name, fn):  # outermost calls only (evaluate inside _start counts as _start), but "  of which" rows
        def wrapped(*args, **kwargs):
            if _PATCHED["depth"] and not name.startswith("  "):
                return fn(*args, **kwargs)
            _PATCHED["depth"] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _PATCHED["depth"] -= 1
                s = _PATCHED["sink"]
                s[name] = s.get(name, 0.0) + time.perf_counter() - t0
        return wrapped

    # what trial.py calls through module attributes
    claims.claim_trial = timed("claim (incl. run create)", claims.claim_trial)
    create = tracking.TrialRun.create.__func__
    tracking.TrialRun.create = classmethod(timed("  of which run create + params", create))
    tracking.TrialRun.log_points = timed("log metrics", tracking.TrialRun.log_points)
    tracking.TrialRun.set_tags = timed("set tags", tracking.TrialRun.set_tags)
    tracking.TrialRun.log_artifact = timed("log artifacts", tracking.TrialRun.log_artifact)
    trial.TrialState.save = timed("checkpoint save (torch.save)", trial.TrialState.save)
    claims.Lease.release = timed("lease release + end run", claims.Lease.release)
    trial.save_pruned = timed("save pruned.pt", trial.save_pruned)
    tracking.find_trial_run = timed("find_trial_run (claim's search)", tracking.find_trial_run)
    tracking.get_or_create_experiment = timed("get_or_create_experiment", tracking.get_or_create_experiment)
    # the compute both arms do (the same functions, called through sweep.worker.trial's names)
    for name in ("load_splits", "ensure_base", "load_base", "_start", "train_epoch", "evaluate"):
        setattr(trial, name, timed("compute: " + name, getattr(trial, name)))
    tune_reporter = trial._tune_reporter

    def reporter():
        report, local = tune_reporter()

        def timed_report(metrics, checkpoint_dir):
            name = "tune.report with checkpoint" if checkpoint_dir else "tune.report (final, no checkpoint)"
            return timed(name, report)(metrics, checkpoint_dir)
        return timed_report, local
    trial._tune_reporter = reporter


def timed_sweep_trial(log: str):
    """sweep.worker.trial.sweep_trial with the pieces timed; one JSON line per trial in `log`."""

    def sweep_trial(config: dict, context) -> None:
        from sweep.worker.trial import run_trial

        sink: dict[str, float] = {}
        _install_timers(sink)
        start = time.perf_counter()
        try:
            run_trial(config["trial"], context)
        finally:
            sink["trial_s"] = time.perf_counter() - start
            with open(log, "a") as f:
                f.write(json.dumps({"arm": "sweep", **sink}) + "\n")
    return sweep_trial


# --- the driver -------------------------------------------------------------------------------------------------


def run_plain(spec, cache: str, work: Path, log: str) -> float:
    from ray import tune

    from sweep.driver.launch import _trial_dirname

    trainable = tune.with_resources(tune.with_parameters(plain_trial, cache_dir=cache, log=log), {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(spec.grid_configs())},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", reuse_actors=True,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="plain", storage_path=str(work / "plain"), verbose=0))
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    assert not grid.errors, grid.errors
    return wall


def run_swept(spec, uri: str, storage: str, log: str) -> dict[str, float]:
    from ray import tune

    from sweep.driver import launch as orchestrate

    phases: dict[str, float] = {}

    def timing(name, fn):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapped

    saved = {n: getattr(orchestrate, n) for n in ("_measure_latency", "_write_report", "sweep_trial")}
    saved_fit = tune.Tuner.fit
    orchestrate._measure_latency = timing("latency phase", saved["_measure_latency"])
    orchestrate._write_report = timing("report", saved["_write_report"])
    orchestrate.sweep_trial = timed_sweep_trial(log)
    tune.Tuner.fit = timing("tuner.fit", saved_fit)
    try:
        start = time.perf_counter()
        outcome = orchestrate.run_sweep(spec, tracking_uri=uri, storage=storage, verbose=0)
        phases["total"] = time.perf_counter() - start
    finally:
        for n, fn in saved.items():
            setattr(orchestrate, n, fn)
        tune.Tuner.fit = saved_fit
    assert outcome.ran == len(spec.grid_configs()) and outcome.failed == 0, outcome
    return phases


def _read_log(log: str) -> list[dict]:
    return [json.loads(line) for line in Path(log).read_text().splitlines()] if Path(log).exists() else []


def one_length(epochs: int, work: Path, every: float) -> None:
    from sweep.config.spec import parse_spec
    from sweep.driver import session
    from sweep.store import tracking
    from sweep.worker.trial import SweepContext, run_trial

    name = f"overhead_e{epochs}"
    spec = parse_spec(SPACE.format(name=name, epochs=epochs, every=every))
    storage = str(work / "store")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{work}/mlflow.db")
    tracking.init_store(uri)
    cache = session.cache_dir(storage, name)
    # the shared base, trained once before timing (both arms read it from the same cache)
    run_trial(spec.grid_configs()[0], SweepContext(uri, f"{name}_warm", None, cache), report=lambda m, c: None)

    load0 = os.getloadavg()[0]
    plain_log, sweep_log = str(work / f"{name}_plain.jsonl"), str(work / f"{name}_sweep.jsonl")
    plain = run_plain(spec, cache, work, plain_log)
    phases = run_swept(spec, uri, storage, sweep_log)
    load1 = os.getloadavg()[0]

    plain_rows, sweep_rows = _read_log(plain_log), _read_log(sweep_log)
    n = len(spec.grid_configs())
    core = phases["total"] - phases.get("latency phase", 0.0) - phases.get("report", 0.0)
    print(f"\n{n} trials of {epochs} fine-tune epochs (digits, small_cnn) on 2 slots, reused workers; "
          f"load {load0:.1f} -> {load1:.1f} (measured under load)")
    print(f"{'arm / phase':<36} {'wall s':>8} {'/ plain':>8}")
    print(f"{'plain Tuner.fit':<36} {plain:>8.1f} {1:>8.2f}")
    for label, value in (("sweep Tuner.fit", phases["tuner.fit"]),
                         ("sweep before+after fit (excl. below)", core - phases["tuner.fit"]),
                         ("sweep total excl. latency + report", core),
                         ("latency phase (separate)", phases.get("latency phase", 0.0)),
                         ("report (separate)", phases.get("report", 0.0)),
                         ("sweep total", phases["total"])):
        print(f"{label:<36} {value:>8.1f} {value / plain:>8.2f}")
    means = {}
    for arm, rows in (("plain", plain_rows), ("sweep", sweep_rows)):
        totals = collections.Counter()
        for row in rows:
            totals.update({k: v for k, v in row.items() if k != "arm"})
        means[arm] = {k: v / max(1, len(rows)) for k, v in totals.items()}
        timed_sum = sum(v for k, v in means[arm].items() if k != "trial_s" and not k.startswith("  "))
        means[arm]["untimed rest of run_trial"] = means[arm].get("trial_s", 0.0) - timed_sum
    print(f"per trial, inside the worker (mean of {len(plain_rows)} plain, {len(sweep_rows)} sweep trials)")
    print(f"  {'piece':<38} {'plain s':>8} {'sweep s':>8}")
    keys = sorted(set(means["plain"]) | set(means["sweep"]), key=lambda k: (k != "trial_s", not k.startswith("compute"),
                                                                           -means["sweep"].get(k, 0.0)))
    for key in keys:
        print(f"  {key:<38} {means['plain'].get(key, 0.0):>8.3f} {means['sweep'].get(key, 0.0):>8.3f}")
    print(f"overhead ratio, {epochs}-epoch trials: sweep (excl. latency phase and report) / plain = "
          f"{core / plain:.2f}; with them {phases['total'] / plain:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=2, help="fine-tune epochs of the short trials (0: skip)")
    parser.add_argument("--long", type=int, default=10, help="fine-tune epochs of the long trials (0: skip)")
    parser.add_argument("--checkpoint-every-s", type=float, default=10.0, help="the sweep arm's checkpoint_every_s")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    import ray

    from sweep.driver import session

    session.start_ray(None)
    try:
        for epochs in (args.short, args.long):
            if epochs:
                one_length(epochs, work, args.checkpoint_every_s)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
