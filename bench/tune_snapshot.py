"""Tune's experiment snapshot at thousands of trials: CheckpointConfig(num_to_keep=1) against num_to_keep=2.

Ray forces a snapshot of the whole experiment state (every trial's config and last result, one JSON file: 24 MB at
850 trials of our configs) whenever a trial has checkpointed num_to_keep times since the last one. With
num_to_keep=1 that is every checkpoint, so the driver's work grows with trials x checkpoints x state size
(quadratic in the number of trials). This isolates it: N trivial trials (no torch, no MLflow) with the real trial
configs of bench/spaces/k1.yaml, each reporting `--reports` results with a tiny checkpoint, run once per setting
in the same run, on the same local Ray.

    python bench/tune_snapshot.py --trials 300 --reports 1
    python bench/tune_snapshot.py --smoke      # 4 trials: the code path only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def trivial(config: dict, reports: int) -> None:
    from ray import tune

    for step in range(1, reports + 1):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "state.txt").write_text(str(step))
            tune.report({"val_accuracy": 0.5, "epoch": step}, checkpoint=tune.Checkpoint.from_directory(tmp))


def one(configs: list[dict], reports: int, keep: int, storage: Path) -> float:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trivial, reports=reports), {"cpu": 1}),
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", reuse_actors=True,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(name=f"keep{keep}", storage_path=str(storage), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=keep)))
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    assert not grid.errors and len(grid) == len(configs)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--reports", type=int, default=1, help="checkpointed reports per trial (epochs)")
    parser.add_argument("--smoke", action="store_true", help="4 trials of 1 report: the code path only")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.reports = 4, 1
    import ray

    from sweep.config.spec import load_spec
    from sweep.driver import session

    configs = load_spec(str(Path(__file__).parent / "spaces" / "k1.yaml")).grid_configs()[: args.trials]
    storage = Path(tempfile.mkdtemp(prefix="tune-snapshot-"))
    session.start_ray(None)
    rows = []
    try:
        for keep in (1, 2):
            load = os.getloadavg()[0]
            wall = one(configs, args.reports, keep, storage)
            state = max(Path(storage, f"keep{keep}").glob("experiment_state-*.json"), key=lambda p: p.stat().st_size)
            rows.append((keep, wall, state.stat().st_size / 2**20, load))
    finally:
        ray.shutdown()
    print(f"\n{args.trials} trivial trials x {args.reports} checkpointed report(s), k1 trial configs, 2 slots; "
          f"measured under load")
    print(f"{'num_to_keep':>11} {'wall s':>8} {'per trial s':>12} {'state MB':>9} {'load':>6}")
    for keep, wall, mb, load in rows:
        print(f"{keep:>11} {wall:>8.1f} {wall / args.trials:>12.3f} {mb:>9.1f} {load:>6.1f}")
    print(f"num_to_keep=2 / num_to_keep=1 wall = {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
