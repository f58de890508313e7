"""Base sharing: N trials with one shared base network against the same N trials with caching off.

Both arms run the same N trial configs (ResNet-20 on digits at 32x32, L1 pruning at N ratios) back to back
in this process through sweep.worker.trial.run_trial, with no Ray, so the comparison is compute only; the arms
take turns trial by trial (shared 1, off 1, shared 2, ...) so drifting machine load hits both. "Shared"
gives every trial one cache directory, so the first trial trains the base and the rest load it; "caching
off" gives every trial a fresh, empty cache directory, so each trains its own. One untimed warm-up trial
first pays the one-off costs (imports, MLflow store, first kernels) that would otherwise land on one arm.

The ideal ratio (base + N*trial) / (N*(base + trial)) uses base = the base training time the trials record
(metric base_train_time_s) and trial = the rest of an unshared trial (its wall time minus base).

    python bench/base_sharing.py                 # N=4, base 4 epochs, fine-tune 1 epoch
    python bench/base_sharing.py --quick         # N=4, base 2 epochs, fine-tune 1 epoch
    python bench/base_sharing.py --trials 6 --threads 2
    python bench/base_sharing.py --smoke         # N=2, small_cnn on 200 digits, 1 epoch each: the code path only
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from sweep.config.spec import parse_spec  # noqa: E402
from sweep.store import tracking  # noqa: E402
from sweep.worker.trial import SweepContext, run_trial  # noqa: E402

SPACE = """
name: {name}
model: {{name: {model}}}
dataset: {{name: digits, {data}}}
base: {{epochs: {base}, lr: 0.05}}
finetune: {{epochs: {finetune}, lr: 0.01}}
measure: {{batch_size: 1, warmup: 2, runs: {runs}}}
space:
  strategy: l1
  ratio: {{grid: {ratios}}}
"""
FULL = {"model": "resnet20", "data": "image_size: 32", "runs": 10}
SMOKE = {"model": "small_cnn", "data": "limit: 200", "runs": 2}


def configs(name: str, n: int, base_epochs: int, finetune_epochs: int, sizes: dict) -> list[dict]:
    ratios = [round(0.2 + 0.6 * i / max(1, n - 1), 3) for i in range(n)]
    return parse_spec(SPACE.format(name=name, base=base_epochs, finetune=finetune_epochs, ratios=ratios,
                                   **sizes)).grid_configs()


def timed_trial(config: dict, uri: str, cache: Path) -> float:
    start = time.perf_counter()
    run_trial(config, SweepContext(uri, config["name"], None, str(cache)), report=lambda metrics, checkpoint: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="base 2 epochs instead of 4")
    parser.add_argument("--trials", type=int, default=4, help="N, trials per arm")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="N=2, small_cnn on 200 digits, 1 epoch: code path only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, sizes = (2, SMOKE) if args.smoke else (args.trials, FULL)
    base_epochs, finetune_epochs = (1, 1) if args.smoke else (2, 1) if args.quick else (4, 1)
    work = Path(tempfile.mkdtemp(prefix="base-sharing-"))
    try:
        uri = tracking.resolve_tracking_uri(f"sqlite:///{work}/mlflow.db")
        tracking.init_store(uri)
        if not args.smoke:  # one-off costs; the smoke form checks the code path, not the timing
            timed_trial(configs("sharing_warmup", 1, 1, 1, sizes)[0], uri, work / "warmup")
        shared_configs = configs("sharing_shared", n, base_epochs, finetune_epochs, sizes)
        off_configs = configs("sharing_off", n, base_epochs, finetune_epochs, sizes)
        shared_trials, unshared_trials = [], []
        for i in range(n):  # the arms take turns, so a change in machine load hits both alike
            shared_trials.append(timed_trial(shared_configs[i], uri, work / "shared"))
            unshared_trials.append(timed_trial(off_configs[i], uri, work / f"off{i}"))
        shared_wall, unshared_wall = sum(shared_trials), sum(unshared_trials)
        client = MlflowClient(uri)
        misses = {name: sum(r.data.tags.get("base_cache") == "miss" for r in tracking.child_runs(client, name))
                  for name in ("sharing_shared", "sharing_off")}
        base = sum(r.data.metrics["base_train_time_s"] for r in tracking.child_runs(client, "sharing_off")) / n
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trial = unshared_wall / n - base
    ideal = (base + n * trial) / (n * (base + trial))

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the trials' device: "auto"
    model = "small_cnn, 200 digits at 8x8" if args.smoke else "ResNet-20, digits at 32x32"
    print(f"{model}, N={n} trials (L1 pruning), base {base_epochs} epochs, fine-tune "
          f"{finetune_epochs} epoch(s), {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'arm':<12} {'trials':>6} {'bases trained':>14} {'wall s':>8}   per-trial wall s")
    for name, wall, per_trial, key in (("shared", shared_wall, shared_trials, "sharing_shared"),
                                       ("caching off", unshared_wall, unshared_trials, "sharing_off")):
        print(f"{name:<12} {n:>6} {misses[key]:>14} {wall:>8.1f}   " + " ".join(f"{t:.1f}" for t in per_trial))
    print(f"base training {base:.1f} s per base; rest of a trial (prune, fine-tune, evaluate, measure, log) "
          f"{trial:.1f} s")
    print(f"shared / caching-off wall = {shared_wall / unshared_wall:.3f} "
          f"(ideal (base + N*trial) / (N*(base + trial)) = {ideal:.3f})")


if __name__ == "__main__":
    main()
