"""Check a finished sweep's store: exactly N FINISHED trial runs, N distinct config hashes, every one of the spec's
configs recorded, and no duplicate (metric, step) point in the history of a sample of runs.

    python bench/verify_sweep.py bench/spaces/k1.yaml --tracking-uri sqlite:////tmp/scale/k1/mlflow.db --sample 50
"""

from __future__ import annotations

import argparse
import collections
import random
import sys

from mlflow.tracking import MlflowClient

from sweep.config.spec import load_spec
from sweep.store import tracking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("space")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--sample", type=int, default=50, help="runs whose full metric history is checked")
    args = parser.parse_args()
    spec = load_spec(args.space)
    expected = {tracking.config_hash(c) for c in spec.grid_configs()}
    client = MlflowClient(args.tracking_uri)
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
    sample = random.Random(0).sample(finished, min(args.sample, len(finished)))
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
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
