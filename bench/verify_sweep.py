"""Check a finished sweep's store: exactly N FINISHED trial runs, N distinct config hashes, every one of the spec's
configs recorded, and no duplicate (metric, step) point in the history of a sample of runs.

    python bench/verify_sweep.py bench/spaces/k1.yaml --tracking-uri sqlite:////tmp/scale/k1/mlflow.db --sample 50
    python bench/verify_sweep.py --smoke     # records a 2-trial sweep of tiny trials (no Ray), then checks it
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from sweep.config.spec import load_spec
from sweep.driver.launch import run_one
from sweep.store import tracking

SMOKE_SPACE = """
name: verify_smoke
dataset: {name: digits, limit: 100}
model: {name: small_cnn}
base: {epochs: 1}
finetune: {epochs: 1}
measure: {runs: 2, warmup: 1}
space:
  ratio: {grid: [0.3, 0.6]}
"""


def smoke_store(work: Path) -> tuple[str, str]:
    """(spec file, tracking URI) of a 2-trial sweep recorded trial by trial with `run_one`, as `sweep trial` does."""
    space, uri = work / "verify_smoke.yaml", f"sqlite:///{work}/mlflow.db"
    for ratio in (0.3, 0.6):
        space.write_text(SMOKE_SPACE.replace("{grid: [0.3, 0.6]}", str(ratio)))
        run_one(load_spec(str(space)), tracking_uri=uri, storage=str(work / "store"))
    space.write_text(SMOKE_SPACE)
    return str(space), uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("space", nargs="?")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--sample", type=int, default=50, help="runs whose full metric history is checked")
    parser.add_argument("--smoke", action="store_true", help="check a 2-trial sweep of tiny trials it records first")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="verify-sweep-") as work:
            sys.exit(check(*smoke_store(Path(work)), args.sample))
    if not (args.space and args.tracking_uri):
        parser.error("give a space and --tracking-uri, or --smoke")
    sys.exit(check(args.space, args.tracking_uri, args.sample))


def check(space: str, uri: str, sample_size: int) -> int:
    """Prints what the store holds of the sweep and OK or its problems; 1 if there are problems, else 0."""
    spec = load_spec(space)
    expected = {tracking.config_hash(c) for c in spec.grid_configs()}
    client = MlflowClient(uri)
    runs = tracking.child_runs(client, spec.name)  # every active trial run, whatever its status
    finished = [r for r in runs if r.info.status == "FINISHED"]
    by_status = collections.Counter(r.info.status for r in runs)
    hashes = collections.Counter(r.data.tags["config_hash"] for r in finished)
    problems = []
    if len(finished) != len(expected):
        problems.append(f"{len(finished)} FINISHED runs, expected {len(expected)}")
    if len(hashes) != len(finished):
        problems.append(f"{sum(n > 1 for n in hashes.values())} configs have more than one FINISHED run")
    if set(hashes) != expected:
        problems.append(f"{len(expected - set(hashes))} configs of the spec have no FINISHED run, "
                        f"{len(set(hashes) - expected)} FINISHED runs are not of the spec")
    no_latency = sum("latency_ms" not in r.data.metrics for r in finished)
    duplicates = 0
    sample = random.Random(0).sample(finished, min(sample_size, len(finished)))
    for run in sample:
        for key in run.data.metrics:
            steps = [m.step for m in tracking.with_retry(client.get_metric_history, run.info.run_id, key)]
            duplicates += len(steps) - len(set(steps))
    if duplicates:
        problems.append(f"{duplicates} duplicate (metric, step) points in {len(sample)} sampled runs")
    print(f"sweep {spec.name}: {len(runs)} active trial runs by status {dict(by_status)}; {len(finished)} FINISHED, "
          f"{len(hashes)} distinct config hashes, {len(expected)} configs in the spec; {no_latency} FINISHED runs "
          f"without latency_ms; {duplicates} duplicate metric steps in {len(sample)} sampled runs "
          f"({sum(len(r.data.metrics) for r in sample)} metric histories)")
    print("OK" if not problems else "PROBLEMS: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    main()
