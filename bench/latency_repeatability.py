"""Latency repeatability: identical pruned networks, measured as the sweep's measurement phase does (one model at a
time, threads pinned, warm-up, median) against measured while another process trains on the same cores (what an
in-trial measurement used to see). Goal: identical networks within 10 % of each other on a quiet machine.

    python bench/latency_repeatability.py             # ResNet-20 and small_cnn at 50 %, 8 repetitions each
    python bench/latency_repeatability.py --smoke     # 2 repetitions of 3 timed runs: the code path only
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from sweep.pruning import prune
from sweep.worker.latency import latency_stats
from sweep.zoo.models import build_model


def _train_forever(stop) -> None:  # a neighbouring trial: training steps on the same cores
    torch.set_num_threads(1)
    model = build_model("resnet20", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(10, (64,))
    while not stop.is_set():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def spread(model, shape, repeats: int, warmup: int, runs: int) -> list[float]:
    return [latency_stats(model, shape, torch.device("cpu"), threads=1, batch_size=1, warmup=warmup,
                          runs=runs)["latency_ms"] for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="2 repetitions of 3 timed runs: the code path only")
    args = parser.parse_args()
    repeats, warmup, runs = (2, 1, 3) if args.smoke else (args.repeats, 5, 30)
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch {torch.__version__}; {os.cpu_count()} CPUs")
    rows = []
    for name, shape, classes in (("resnet20", (3, 32, 32), 10), ("small_cnn", (1, 8, 8), 10)):
        base = build_model(name, classes, in_channels=shape[0]).eval()
        pruned = prune(base, torch.randn(1, *shape), strategy="l1", ratio=0.5).model.eval()
        quiet = spread(pruned, shape, repeats, warmup, runs)
        stop = mp.Event()
        neighbours = [mp.Process(target=_train_forever, args=(stop,)) for _ in range(2)]
        for process in neighbours:
            process.start()
        time.sleep(0.5 if args.smoke else 2)  # the neighbours get going
        loaded = spread(pruned, shape, repeats, warmup, runs)
        stop.set()
        for process in neighbours:
            process.join(timeout=30)
        for label, values in (("measurement phase", quiet), ("beside 2 training processes", loaded)):
            rows.append((name, label, statistics.median(values), min(values), max(values), max(values) / min(values)))
    print("\n| model (l1, 50 %) | measured | median ms | min | max | max/min |\n|---|---|---|---|---|---|")
    for name, label, median, low, high, ratio in rows:
        print(f"| {name} | {label} | {median:.3f} | {low:.3f} | {high:.3f} | {ratio:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
