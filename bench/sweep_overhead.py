"""Sweep overhead: a Ray Tune sweep of N trials against the ideal wall clock (trial compute / slots).

The ideal is measured in the same run: the same N trial configs executed back to back in this
process, one CPU thread each (as a 1-CPU Ray worker runs them), with the shared base already
trained. Per-trial overhead = (sweep wall - ideal) x slots / N: worker start, imports, MLflow
logging, checkpointing, scheduling.

    python bench/sweep_overhead.py            # 16 trials of ~30 s
    python bench/sweep_overhead.py --quick    # 16 trials of ~8 s
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from sweep import tracking  # noqa: E402
from sweep.orchestrate import run_sweep  # noqa: E402
from sweep.spec import parse_spec  # noqa: E402
from sweep.trial import SweepContext, run_trial  # noqa: E402

SPACE = """
name: {name}
model: {{name: resnet20}}
dataset: {{name: digits, image_size: 32}}
base: {{epochs: 1, lr: 0.05}}
finetune: {{epochs: {epochs}, lr: 0.01, batch_size: 64}}
measure: {{batch_size: 1, warmup: 2, runs: 10}}
space:
  strategy: {{grid: [l1, l2, fpgm, random]}}
  ratio: {{grid: [0.2, 0.4, 0.6, 0.8]}}
resources: {{cpu: 1}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter trials")
    args = parser.parse_args()
    epochs = 1 if args.quick else 4
    slots = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    uri = tracking.resolve_tracking_uri(f"sqlite:///{work}/mlflow.db")
    tracking.init_store(uri)

    # Ideal: the same trials back to back, one thread, base already cached (the sweep shares it too).
    seq_spec = parse_spec(SPACE.format(name="overhead_ideal", epochs=epochs))
    context = SweepContext(uri, "overhead_ideal", None, str(work / "bases"))
    configs = seq_spec.grid_configs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_trial(configs[0], context, report=lambda m, c: None)  # trains and caches the base: not timed
    start = time.perf_counter()
    for config in configs[1:]:
        run_trial(config, context, report=lambda m, c: None)
    per_trial = (time.perf_counter() - start) / (len(configs) - 1)
    torch.set_num_threads(threads)
    compute = per_trial * len(configs)
    ideal = compute / slots

    # The sweep: same trials under Ray Tune, with fresh workers per trial (before) and reused ones (now).
    rows = []
    for label, reuse in (("new worker per trial", False), ("reused workers", True)):
        name = "overhead_reuse" if reuse else "overhead_fresh"
        spec = parse_spec(SPACE.format(name=name, epochs=epochs))
        storage = work / "store"
        base_cache = storage / name / "bases"
        base_cache.mkdir(parents=True)
        torch.set_num_threads(1)  # its base is trained first, outside the timing, as for the ideal
        run_trial(spec.grid_configs()[0], SweepContext(uri, f"{name}_warm", None, str(base_cache)),
                  report=lambda m, c: None)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        outcome = run_sweep(spec, tracking_uri=uri, storage=str(storage), verbose=0, reuse_workers=reuse)
        wall = time.perf_counter() - start
        assert outcome.ran == len(configs) and outcome.failed == 0, outcome
        rows.append((label, wall, (wall - ideal) * slots / len(configs)))

    print(f"\n{len(configs)} trials on {slots} slots; trial compute {per_trial:.2f} s each "
          f"(measured back to back in one process); ideal wall = {ideal:.1f} s")
    print(f"{'sweep':<22} {'wall s':>8} {'wall / ideal':>13} {'overhead per trial s':>21}")
    for label, wall, overhead in rows:
        print(f"{label:<22} {wall:>8.1f} {wall / ideal:>13.3f} {overhead:>21.2f}")
    print(f"sweep wall / ideal = {rows[-1][1] / ideal:.3f} (was {rows[0][1] / ideal:.3f} with a new worker per trial)")


if __name__ == "__main__":
    main()
