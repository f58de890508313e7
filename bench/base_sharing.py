"""Base sharing: N trials with one shared base network against the same N trials with caching off.

Both arms run the same trials back to back in this process (no Ray, so the comparison is compute
only). "Caching off" gives every trial a fresh, empty base cache, so each trains its own base.
The ideal ratio is (base + N*trial) / (N*(base + trial)), from the times the trials record.

    python bench/base_sharing.py            # N=4, base 8 epochs, fine-tune 2 epochs
    python bench/base_sharing.py --quick    # N=4, base 4 epochs, fine-tune 1 epoch
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.tracking import MlflowClient  # noqa: E402

from sweep import tracking  # noqa: E402
from sweep.spec import parse_spec  # noqa: E402
from sweep.trial import SweepContext, run_trial  # noqa: E402

SPACE = """
name: {name}
model: {{name: resnet20}}
dataset: {{name: digits, image_size: 32}}
base: {{epochs: {base}, lr: 0.05}}
finetune: {{epochs: {finetune}, lr: 0.01}}
measure: {{batch_size: 1, warmup: 2, runs: 10}}
space:
  strategy: {{grid: [l1, l2, fpgm, random]}}
  ratio: 0.5
"""


def arm(name: str, configs: list[dict], uri: str, work: Path, shared: bool) -> float:
    start = time.perf_counter()
    for i, config in enumerate(configs):
        cache = work / name / ("bases" if shared else f"bases{i}")
        run_trial(config, SweepContext(uri, name, None, str(cache)), report=lambda m, c: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    base_epochs, finetune_epochs = (4, 1) if args.quick else (8, 2)
    work = Path(tempfile.mkdtemp(prefix="base-sharing-"))
    uri = tracking.resolve_tracking_uri(f"sqlite:///{work}/mlflow.db")
    tracking.init_store(uri)
    walls = {}
    for name, shared in (("shared", True), ("unshared", False)):
        text = SPACE.format(name=f"sharing_{name}", base=base_epochs, finetune=finetune_epochs)
        walls[name] = arm(f"sharing_{name}", parse_spec(text).grid_configs(), uri, work, shared)
    runs = tracking.child_runs(MlflowClient(uri), "sharing_unshared")
    n = len(runs)
    base = sum(r.data.metrics["base_train_time_s"] for r in runs) / n
    trial = sum(r.data.metrics["train_time_s"] + r.data.metrics["prune_time_s"] for r in runs) / n
    ideal = (base + n * trial) / (n * (base + trial))
    bases_trained = len(list((work / "sharing_shared").glob("bases/*/base.pt")))
    print(f"{'arm':<10} {'trials':>6} {'bases trained':>14} {'wall s':>8}")
    print(f"{'shared':<10} {n:>6} {bases_trained:>14} {walls['shared']:>8.1f}")
    print(f"{'unshared':<10} {n:>6} {n:>14} {walls['unshared']:>8.1f}")
    print(f"base training {base:.1f} s, prune + fine-tune {trial:.1f} s per trial")
    print(f"shared / unshared wall = {walls['shared'] / walls['unshared']:.3f} "
          f"(ideal (base + N*trial) / (N*(base + trial)) = {ideal:.3f})")


if __name__ == "__main__":
    main()
