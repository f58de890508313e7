"""Store scale: do a launch's lookups and `sweep report` stay fast when the experiment holds 10,000 runs?

Seeds an MLflow sqlite store with N FINISHED child runs shaped like real trial runs (the params, tags and metrics
`tracking.TrialRun.create`, the trial and the latency phase write; real config hashes of a 7-strategy x 10-ratio x
seed grid), through MlflowClient (create_run with the tags in the request, one log_batch, set_terminated), from
several processes. Then measures the same experiment name in an empty store and in the full one:

  driver pre-Tune work   tracking.finished_trials (which grid configs are still to run), claims.close_dead_runs
  trial lookups          tracking.find_trial_run, claims.claim_trial (creates the claim run), recorded_result
  end of launch          latency.runs_to_measure (the latency phase's query)
  sweep run              wall of `run_sweep` of a new 2-trial spec (tiny trials, base cached), and its phases as
                         the launch records them (bench/_records.py)
  sweep report           report.write_report over every run of the experiment

    python bench/store_scale.py --seed-db /tmp/scale/full.db --runs 10000 --procs 3   # seed only (minutes)
    python bench/store_scale.py --full-db /tmp/scale/full.db                           # measure (copies the db)
    python bench/store_scale.py --smoke       # 40 runs seeded, lookups and report, no run_sweep: in seconds
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _records import launch_phases  # noqa: E402 - after the variables Ray reads when it is imported

EXPERIMENT = "scale"
STRATEGIES = ["random", "l1", "l2", "bn_scale", "taylor", "apoz", "fpgm"]
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9]
# The seeded grid and the launched 2-trial spec share everything but the swept values (as an extended sweep does).
SPACE = """
name: {name}
dataset: {{name: digits, limit: 100}}
model: {{name: small_cnn}}
base: {{epochs: 1}}
finetune: {{epochs: 1}}
measure: {{runs: 2, warmup: 1}}
max_trials: 100000
space:
  strategy: {{grid: {strategies}}}
  ratio: {{grid: {ratios}}}
  seed: {{grid: {seeds}}}
"""


def seed_grid(runs: int) -> list[dict]:
    from sweep.config.spec import parse_spec

    seeds = list(range(-(-runs // (len(STRATEGIES) * len(RATIOS)))))
    spec = parse_spec(SPACE.format(name=EXPERIMENT, strategies=STRATEGIES, ratios=RATIOS, seeds=seeds))
    return spec.grid_configs()[:runs]


def launch_spec():
    """A new 2-trial spec of the same sweep: two seeds the store does not hold."""
    from sweep.config.spec import parse_spec

    return parse_spec(SPACE.format(name=EXPERIMENT, strategies=["l1"], ratios=[0.5], seeds=[900001, 900002]))


def _run_name(config: dict) -> str:
    """A run name shaped like the trial runs' (strategy-ratio-scope-target-schedule-model)."""
    prune = config["prune"]
    return "-".join(str(v) for v in (prune["strategy"], prune["ratio"], prune["scope"], prune["target"], "oneshot",
                                     config["model"]["name"]))


def _run_data(config: dict, parent: str, rng: random.Random):
    """(tags, params, metrics) as a finished trial run holds them, values drawn around a real tiny run's."""
    from mlflow.entities import Metric, Param

    from sweep.store import tracking

    now = time.time()
    ratio = config["prune"]["ratio"]
    ts = int(now * 1000)
    tags = {
        "git_commit": "d641edef5c5701e14d6a907c4d26141d15c50fab", "config_hash": tracking.config_hash(config),
        "sweep.name": EXPERIMENT, "mlflow.runName": _run_name(config), "mlflow.parentRunId": parent,
        "sweep.owner": f"launch-seed-{os.getpid()}/trial_{rng.randrange(10**8):08x}",
        "sweep.lease_until": f"{now - 3600:.3f}", "base_cache": "hit", "base_key": "1714cec18e4b3a8c",
        "ray.node_id": f"{rng.randrange(16**56):056x}",
        "ray.trial": f"{rng.randrange(16**5):05x}_{rng.randrange(99999):05d}",
        "latency.device": "cpu", "latency.threads": "1", "latency.batch_size": "1", "latency.runs": "2",
        "latency.warmup": "1", "latency.host": "vm", "latency.load_1min": f"{rng.uniform(1, 20):.2f}",
    }
    params = [Param(k, v) for k, v in tracking.flat_params(config).items()]
    acc = max(0.05, min(1.0, 0.95 - 0.5 * ratio ** 2 + rng.gauss(0, 0.02)))
    flops = 4758016.0 * (1 - ratio) ** 2
    values = {
        "base_train_time_s": 1.5, "base_val_accuracy": 0.96, "base_test_accuracy": 0.95, "base_flops": 4758016.0,
        "base_macs": 2379008.0, "base_params": 94186.0, "pruned_val_accuracy": acc - 0.2, "pruned_test_accuracy":
        acc - 0.2, "prune_time_s": rng.uniform(0.2, 0.6), "flops": flops, "macs": flops / 2,
        "flops_reduction": 1 - flops / 4758016.0, "params": 94186.0 * (1 - ratio) ** 2, "size_mb": 0.39 * (1 - ratio)
        ** 2, "channels_removed": ratio, "params_reduction": 1 - (1 - ratio) ** 2, "test_accuracy": acc,
        "test_accuracy_drop": 0.95 - acc, "train_time_s": rng.uniform(0.5, 1.0), "latency_ms": rng.uniform(0.3, 1),
        "latency_iqr_ms": rng.uniform(0, 0.1), "base_latency_ms": 0.6, "speedup": rng.uniform(0.8, 2),
    }
    metrics = [Metric(k, v, ts, 0) for k, v in values.items()]
    # per-epoch history (the finetune section has 1 epoch here; three points make the table as deep as a 3-epoch run)
    for step in (1, 2, 3):
        metrics += [Metric("val_accuracy", acc, ts, step), Metric("val_loss", 0.3, ts, step),
                    Metric("train_loss", 0.2, ts, step)]
    return tags, params, metrics


def _seed_worker(args) -> int:
    uri, experiment_id, parent, configs, worker = args
    from mlflow.tracking import MlflowClient

    from sweep.store import tracking

    client, rng = MlflowClient(uri), random.Random(worker)
    for config in configs:
        tags, params, metrics = _run_data(config, parent, rng)
        run = tracking.with_retry(client.create_run, experiment_id, tags=tags, run_name=tags["mlflow.runName"])
        tracking.with_retry(client.log_batch, run.info.run_id, params=params, metrics=metrics)
        tracking.with_retry(client.set_terminated, run.info.run_id, status="FINISHED")
    return len(configs)


def _bulk_seed(uri: str, experiment_id: str, parent: str, configs: list[dict], artifact_root: str) -> int:
    """The same rows MLflow's SqlAlchemyStore writes for create_run + log_batch + set_terminated (its own table
    definitions: runs, tags, params, metrics, latest_metrics), inserted with executemany, 1000 runs a transaction."""
    import uuid

    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag

    engine = sa.create_engine(uri)
    rng = random.Random(0)
    done = 0
    for i in range(0, len(configs), 1000):
        runs, tags, params, metrics, latest = [], [], [], [], []
        for config in configs[i : i + 1000]:
            run_tags, run_params, run_metrics = _run_data(config, parent, rng)
            run_id = uuid.uuid4().hex
            start = int(time.time() * 1000) - rng.randrange(10**7)
            runs.append(dict(run_uuid=run_id, name=run_tags["mlflow.runName"], source_type="UNKNOWN", source_name="",
                             entry_point_name="", user_id="unknown", status="FINISHED", start_time=start,
                             end_time=start + 9000, source_version="", lifecycle_stage="active",
                             artifact_uri=f"{artifact_root}/{run_id}/artifacts", experiment_id=int(experiment_id)))
            tags += [dict(key=k, value=v, run_uuid=run_id) for k, v in run_tags.items()]
            params += [dict(key=p.key, value=p.value, run_uuid=run_id) for p in run_params]
            newest: dict[str, dict] = {}
            for m in run_metrics:
                row = dict(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step, is_nan=False, run_uuid=run_id)
                metrics.append(row)
                if m.key not in newest or m.step >= newest[m.key]["step"]:
                    newest[m.key] = row
            latest += list(newest.values())
        with engine.begin() as conn:
            for model, rows in ((SqlRun, runs), (SqlTag, tags), (SqlParam, params), (SqlMetric, metrics),
                                (SqlLatestMetric, latest)):
                conn.execute(sa.insert(model.__table__), rows)
        done += len(runs)
    engine.dispose()
    return done


def seed(db: Path, runs: int, procs: int, method: str) -> None:
    from mlflow.tracking import MlflowClient

    from sweep.store import tracking

    uri = f"sqlite:///{db}"
    tracking.init_store(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(client, EXPERIMENT)
    parent = tracking.start_parent_run(uri, EXPERIMENT, "name: scale\n")
    configs = seed_grid(runs)
    start = time.perf_counter()
    if method == "api":
        chunks = [(uri, experiment_id, parent, configs[i::procs], i) for i in range(procs)]
        with mp.get_context("spawn").Pool(procs) as pool:
            done = sum(pool.map(_seed_worker, chunks))
        how = f"MlflowClient create_run + log_batch + set_terminated, {procs} processes"
    else:
        root = client.get_experiment(experiment_id).artifact_location
        done = _bulk_seed(uri, experiment_id, parent, configs, root)
        how = "bulk insert into MLflow's tables, one process"
    tracking.end_run(uri, parent, "FINISHED")
    wall = time.perf_counter() - start
    print(f"seeded {done} FINISHED child runs into {db} ({how}) in {wall:.1f} s "
          f"({1000 * wall / done:.1f} ms per run; load {os.getloadavg()[0]:.1f})")


# --- measuring ---------------------------------------------------------------------------------------------------


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def lookups(uri: str) -> dict[str, float]:
    """The store queries of one launch of the 2-trial spec, timed one by one (no Ray)."""
    from mlflow.tracking import MlflowClient

    from sweep.store import claims, tracking
    from sweep.worker import latency

    configs = launch_spec().grid_configs()
    client = MlflowClient(uri)
    out: dict[str, float] = {}
    experiment_id = tracking.get_or_create_experiment(client, EXPERIMENT)
    out["close_dead_runs"], _ = _timed(claims.close_dead_runs, client, experiment_id)
    hashes = [tracking.config_hash(c) for c in configs]
    out["finished_trials"], done = _timed(tracking.finished_trials, uri, EXPERIMENT, hashes)  # the pending grid
    assert not done, done
    config = configs[0]
    chash = tracking.config_hash(config)
    out["find_trial_run"], _ = _timed(tracking.find_trial_run, uri, EXPERIMENT, chash, "no-such-parent")
    create = lambda tags: tracking.TrialRun.create(uri, EXPERIMENT, None, config, tags).run_id  # noqa: E731
    out["claim_trial"], claim = _timed(claims.claim_trial, client, experiment_id, chash, "bench/owner", create,
                                       lease_s=60)
    assert claim.kind == "claimed", claim
    claim.lease.release("FINISHED")
    out["recorded_result"], recorded = _timed(tracking.recorded_result, uri, EXPERIMENT, chash)
    assert recorded is not None
    out["runs_to_measure"], _ = _timed(latency.runs_to_measure, uri, EXPERIMENT)
    tracking.with_retry(client.delete_run, claim.run_id)  # no trace for the launch measured next (no artifacts)
    return out


def _first_epoch_marker(path: str):
    def on_epoch(cfg, epoch: int) -> None:  # runs in the trial worker before each epoch
        with open(path, "a") as f:
            f.write(f"{time.time()}\n")
    return on_epoch


def sweep_run(uri: str, storage: str) -> dict[str, float]:
    """Wall of run_sweep of the 2-trial spec (it starts its own local Ray, as `sweep run` does; base already
    cached), its phases as the launch records them, and the time from the call to the first trial's first epoch."""
    from sweep.driver.launch import run_sweep

    marks = Path(storage) / f"first-epoch-{time.time_ns()}.txt"
    called, start = time.time(), time.perf_counter()
    outcome = run_sweep(launch_spec(), tracking_uri=uri, storage=storage, verbose=0,
                        on_epoch=_first_epoch_marker(str(marks)))
    total = time.perf_counter() - start
    assert outcome.ran == 2 and outcome.failed == 0, outcome
    return {**launch_phases(outcome, uri, called, called + total), "run_sweep total": total,
            "to first trial's 1st epoch": min(float(t) for t in marks.read_text().split()) - called}


def measure(full_db: Path, work: Path, skip_sweep: bool, full_first: bool = False) -> None:
    from mlflow.tracking import MlflowClient

    from sweep.driver import session
    from sweep.report import summary as report
    from sweep.store import tracking
    from sweep.worker.trial import SweepContext, run_trial

    empty_db, full_copy = work / "empty.db", work / "full.db"
    tracking.init_store(f"sqlite:///{empty_db}")
    shutil.copy(full_db, full_copy)
    uris = {"empty": f"sqlite:///{empty_db}", "full": f"sqlite:///{full_copy}"}
    full_client = MlflowClient(uris["full"])
    n_full = len(tracking.child_runs(full_client, EXPERIMENT, "attributes.status = 'FINISHED'"))

    rows: dict[str, dict[str, float]] = {}
    for arm, uri in uris.items():
        rows[arm] = lookups(uri)
    print(f"\nlookups of one launch (2-trial spec), store with 0 vs {n_full} FINISHED child runs; load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'query':<20} {'empty s':>9} {'full s':>9} {'full/empty':>11}")
    for name in rows["empty"]:
        e, f = rows["empty"][name], rows["full"][name]
        print(f"{name:<20} {e:>9.3f} {f:>9.3f} {f / e:>11.2f}")
    driver = ("close_dead_runs", "finished_trials")
    e, f = (sum(rows[a][n] for n in driver) for a in ("empty", "full"))
    print(f"driver pre-Tune queries: empty {e:.3f} s, full {f:.3f} s, full / empty = {f / e:.2f}")

    if not skip_sweep:
        storage = str(work / "store")
        # train the shared base once, outside the timing (both arms use the same storage, so the same cache)
        spec = launch_spec()
        context = SweepContext(uris["empty"], "warm", None, session.cache_dir(storage, EXPERIMENT))
        run_trial(spec.grid_configs()[0], context, report=lambda m, c: None)
        phases = {}
        for arm in (("full", "empty") if full_first else ("empty", "full")):  # the order: see --full-first
            phases[arm] = sweep_run(uris[arm], storage)
        print(f"\nrun_sweep of a new 2-trial spec (starting its own Ray, base cached), 0 vs {n_full} runs; load "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'phase':<20} {'empty s':>9} {'full s':>9} {'full/empty':>11}")
        for name in phases["full"]:
            e, f = phases["empty"].get(name, float("nan")), phases["full"][name]
            print(f"{name:<20} {e:>9.2f} {f:>9.2f} {f / e:>11.2f}")
        first = "to first trial's 1st epoch"
        before = phases["full"]["before Tune"] / phases["empty"]["before Tune"]
        to_first = phases["full"][first] / phases["empty"][first]
        print(f"run_sweep before Tune (preflight, Ray start, queries): full / empty = {before:.2f}; "
              f"time to the first trial's first epoch: full / empty = {to_first:.2f}")

    start = time.perf_counter()
    df = report.load_runs(EXPERIMENT, uris["full"])
    t_load = time.perf_counter() - start
    start = time.perf_counter()
    report.write_report(EXPERIMENT, uris["full"], out_dir=work / "reports")
    t_report = time.perf_counter() - start
    print(f"\nsweep report on {len(df)} runs: load_runs {t_load:.1f} s, write_report (load + tables + plots + "
          f"artifacts) {t_report:.1f} s; load {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-db", type=Path, help="seed this (new) sqlite file and stop")
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--procs", type=int, default=3)
    parser.add_argument("--method", choices=["bulk", "api"], default="bulk",
                        help="api: MlflowClient calls (about 340 ms a run under load here); bulk: executemany")
    parser.add_argument("--full-db", type=Path, help="a seeded store to measure against an empty one")
    parser.add_argument("--skip-sweep", action="store_true", help="lookups and report only, no run_sweep")
    parser.add_argument("--full-first", action="store_true",
                        help="launch into the full store first (the second launch may pay for the first's Ray exit)")
    parser.add_argument("--smoke", action="store_true", help="seed 40 runs (bulk) into a temporary store and measure "
                        "against them without run_sweep: the code path of both steps, in seconds")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="store-scale-") as work:
            seed(Path(work) / "seeded.db", 40, 1, "bulk")
            measure(Path(work) / "seeded.db", Path(work), skip_sweep=True)
        return
    if args.seed_db:
        if args.seed_db.exists():
            sys.exit(f"{args.seed_db} exists: seed a new file")
        seed(args.seed_db, args.runs, args.procs, args.method)
        return
    if not args.full_db:
        parser.error("give --seed-db or --full-db")
    measure(args.full_db, Path(tempfile.mkdtemp(prefix="store-scale-")), args.skip_sweep, args.full_first)


if __name__ == "__main__":
    main()
