"""The powered criteria study at full scale, for a GPU: every CIFAR-10 training image, ten fine-tune epochs, and the
training throughput of each arm, pruned against unpruned, measured in the same sweep.

It runs search_spaces/cifar10_resnet20_criteria_gpu.yaml (ResNet-20, seven criteria + oracle + the unpruned control,
ratios 0.3 / 0.5, ten seeds, validation carved from the test split, eight trials per GPU); `sweep run` writes the
report. Then it prints per strategy and ratio the median fine-tune images/s (training images x epochs /
train_time_s) and its ratio to the control's: how much faster a pruned network trains on this device. The data and
weights are the ones the CPU study reads (data/cifar10_jpg, data/weights/resnet20-12fca82f.th; see RESULTS.md).

    python bench/criteria_study_gpu.py                       # the full study (hours of GPU time; resumable)
    python bench/criteria_study_gpu.py --tracking-uri URI    # elsewhere than ./mlflow.db
    python bench/criteria_study_gpu.py --smoke               # digits, small_cnn, two strategies + control, CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from sweep.config.schema import trial_config
from sweep.config.spec import load_spec
from sweep.driver.launch import run_sweep
from sweep.store import tracking
from sweep.worker.trial import load_splits

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "cifar10_resnet20_criteria_gpu.yaml"
SMOKE_SPACE = """
name: criteria_gpu_smoke
dataset: {name: digits, limit: 200}
model: {name: small_cnn}
base: {epochs: 1}
finetune: {epochs: 1}
measure: {runs: 2, warmup: 1}
space:
  strategy: {grid: [l1, oracle]}
  ratio: 0.5
  arm: {grid: [finetune, control]}
prune: {oracle_batches: 1}
"""


def throughput(uri: str, name: str, train_images: int) -> dict[tuple[str, str], list[float]]:
    """Fine-tune images/s of every finished trial, by (strategy, ratio); the control is ('none', '0.0')."""
    rows: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in tracking.child_runs(MlflowClient(uri), name, "attributes.status = 'FINISHED'"):
        params, seconds = run.data.params, run.data.metrics.get("train_time_s")
        if seconds:
            rows[params["strategy"], params["ratio"]].append(train_images * int(params["finetune.epochs"]) / seconds)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--storage", default="sweep_results")
    parser.add_argument("--smoke", action="store_true", help="a 3-trial sweep on digits, on the CPU: the code path")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="criteria-gpu-") if args.smoke else None
    if work:
        Path(work, "space.yaml").write_text(SMOKE_SPACE)
        args.tracking_uri, args.storage = f"sqlite:///{work}/mlflow.db", f"{work}/store"
    spec = load_spec(str(Path(work, "space.yaml")) if work else str(SPACE))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device {device}; load average {os.getloadavg()[0]:.1f} at the start")
    outcome = run_sweep(spec, tracking_uri=args.tracking_uri, storage=args.storage, verbose=0)
    print(f"{outcome.ran} trials ran, {outcome.skipped} already finished, {outcome.failed} failed; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    # every trial of the spec trains on the same split sizes: count them once, as a trial loads them
    train_images = len(load_splits(trial_config(spec.grid_configs()[0])).train)
    rows = throughput(args.tracking_uri, spec.name, train_images)
    control = statistics.median(rows.pop(("none", "0.0"), [float("nan")]))
    print(f"{'strategy':<10} {'ratio':>5} {'trials':>6} {'images/s':>9} {'/ control':>9}")
    print(f"{'control':<10} {'0.0':>5} {'':>6} {control:>9.0f} {1:>9.2f}")
    for (strategy, ratio), values in sorted(rows.items()):
        median = statistics.median(values)
        print(f"{strategy:<10} {ratio:>5} {len(values):>6} {median:>9.0f} {median / control:>9.2f}")
    pruned = [statistics.median(v) for v in rows.values()]
    print(f"pruned / unpruned fine-tune images/s (median over {len(pruned)} settings) = "
          f"{statistics.median(pruned) / control:.2f}")
    sys.exit(1 if outcome.failed else 0)


if __name__ == "__main__":
    main()
