"""Memory of N concurrent trials on one node: the dataset shared through Ray's object store, against a copy per trial.

Each measurement is one `run_sweep` of N CIFAR-10 ResNet-20 trials (pretrained, pruned by 50 %, one short
fine-tune epoch, latency phase) with `resources.cpu` = 2 / N so that all N run at once on this 2-core machine, on a
fresh local Ray each time. The dataset is the CIFAR-10 JPEG copy (all 60,000 images, decoded once into one uint8
tensor of 184 MB; a trial's `limit` only narrows what it trains on, never what it holds). Two arms, same run:

  shared             the default: the driver puts the decoded splits in the object store, every trial maps them
                     read-only; each trial runs in its own Ray worker process, which imports torch and sweep
  per-trial copy     SWEEP_SHARE_DATA=0: every trial decodes and holds its own copy (what sweep did before)

(A third arm, trials forked from one process per node, went when `resources.process: fork` was retired; its
figures stay in the benchmark history.)

Memory is sampled every 0.2 s while the sweep runs, over this sweep's processes only (the driver and every process
it started: Ray's raylet, which maps the object store, and the workers the raylet started; other sessions on the
machine are not counted): summed PSS (proportional set size: a shared page counts once in total, split among the
processes that map it), and summed RSS (a shared page counts once per process: what per-process monitors add up),
each above its level just before the sweep. The table gives the peaks and the ratio of N trials to one trial per
arm; the issue's goal is 4 trials <= 1.6x one.

    python bench/data_sharing.py                           # CIFAR-10 from ../shared/data, extracted to a temp dir
    python bench/data_sharing.py --root data/cifar10_jpg --counts 1 2 4
    python bench/data_sharing.py --smoke                   # 1 small_cnn trial per arm on 120 random images
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STRATEGIES = ["l1", "l2", "fpgm", "random", "bn_scale", "taylor", "apoz"]

SPACE = """
name: {name}
model: {model}
dataset: {{name: imagefolder, root: {root}, image_size: 32, val_fraction: {val_fraction}, limit: {limit},
           test_limit: {test_limit}}}
base: {{epochs: {base_epochs}, batch_size: 250}}
finetune: {{epochs: 1, batch_size: {batch}}}
measure: {{batch_size: 1, warmup: 2, runs: {runs}, threads: 1}}
space:
  strategy: {{grid: {strategies}}}
  ratio: 0.5
resources: {{cpu: {cpu}}}
"""
FULL = {"val_fraction": 0.02, "limit": 1500, "test_limit": 1000, "base_epochs": 0, "runs": 5}
SMOKE = {"model": "{name: small_cnn}", "val_fraction": 0.1, "limit": 80, "test_limit": 40, "base_epochs": 1,
         "runs": 2}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def _kind(pid: int) -> str:
    """What a process is to the sweep, by its command line: what each part of the peak is spent on."""
    def cmd(p: int) -> str:
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            return ""

    line = cmd(pid)
    if "ImplicitFunc" in line:
        return "Tune workers"
    return "driver, Ray and the rest"


def pss_rss(roots: list[int]) -> tuple[int, int, dict[str, int]]:
    """(summed PSS, summed RSS, PSS by kind of process) of the given processes and all their descendants: this
    sweep's driver and its Ray (the raylet, which maps the object store, and every worker it started), not other
    sessions on the machine."""
    tree, todo, seen = _children(), list(roots), set()
    pss = rss = 0
    kinds: dict[str, int] = {}
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += tree.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    value = int(line.split()[1]) * 1024
                    pss += value
                    kind = _kind(pid)
                    kinds[kind] = kinds.get(kind, 0) + value
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:  # the process ended while we read it
            continue
    return pss, rss, kinds


class Sampler(threading.Thread):
    def __init__(self, roots: list[int], every_s: float):
        super().__init__(daemon=True)
        self.roots, self.every_s, self.stop = roots, every_s, threading.Event()
        self.peaks = {"pss": 0, "rss": 0, "kinds": {}}
        self.base = pss_rss(roots)

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            pss, rss, kinds = pss_rss(self.roots)
            if pss - self.base[0] > self.peaks["pss"]:  # what the PSS peak is made of
                self.peaks["kinds"] = {k: v - self.base[2].get(k, 0) for k, v in kinds.items()}
            self.peaks["pss"] = max(self.peaks["pss"], pss - self.base[0])
            self.peaks["rss"] = max(self.peaks["rss"], rss - self.base[1])


ARMS = {"shared": True, "per-trial copy": False}


def random_imagefolder(root: Path, per_class: int, classes: int = 10) -> str:
    """An ImageFolder (train/, test/) of random 32x32 RGB PNGs: what the smoke form loads instead of CIFAR-10."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", max(1, per_class // 2))):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)


def measure(n: int, shared: bool, root: str, work: Path, batch: int, sizes: dict, smoke: bool) -> dict:
    import ray

    from sweep.config.spec import load_spec
    from sweep.driver.launch import run_sweep
    from sweep.driver.session import start_ray

    os.environ["SWEEP_SHARE_DATA"] = "1" if shared else "0"
    name = f"share_{'on' if shared else 'off'}_{n}"
    path = work / f"{name}.yaml"
    path.write_text(SPACE.format(name=name, root=root, strategies=STRATEGIES[:n], cpu=2 / n, batch=batch, **sizes))
    start_ray(None)
    if not smoke:
        time.sleep(2)  # let Ray's own processes settle before the baseline
    # Ray's processes are this driver's descendants. The walk over /proc runs in the driver, beside its Tune loop:
    # the smoke form, which checks the code path and not the peak, walks once a second
    sampler = Sampler([os.getpid()], 1.0 if smoke else 0.2)
    sampler.start()
    start = time.perf_counter()
    outcome = run_sweep(load_spec(path), tracking_uri=f"sqlite:///{work / name}.db", storage=str(work / name),
                        verbose=0)
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    ray.shutdown()
    assert outcome.ran == n and outcome.failed == 0, outcome
    return {**sampler.peaks, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="CIFAR-10 as an ImageFolder (train/, test/); default: extract the shared copy")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "resnet20-12fca82f.th"))
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--batch-size", type=int, default=128, help="fine-tune batch: what a trial's activations "
                        "take grows with it")
    parser.add_argument("--smoke", action="store_true", help="1 small_cnn trial per arm on 120 random images")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else {**FULL, "model": f"{{name: resnet20, weights: {args.weights}}}"}
    if args.smoke:
        args.counts, args.batch_size = [1], 16
    with tempfile.TemporaryDirectory(prefix="data-sharing-") as tmp:
        work = Path(tmp)
        root = args.root
        if args.smoke:
            root = random_imagefolder(work / "images", per_class=8)
        elif root is None:
            with tarfile.open(SHARED / "cifar10" / "cifar10_jpg.tar.gz") as tar:
                tar.extractall(work / "cifar10", filter="data")
            root = str(next(p.parent for p in (work / "cifar10").rglob("train") if (p.parent / "test").is_dir()))
        load = os.getloadavg()[0]
        rows = {}
        for arm in args.arms:
            for n in args.counts:
                rows[arm, n] = measure(n, ARMS[arm], root, work, args.batch_size, sizes, args.smoke)
                print(f"  {arm} x{n}: {rows[arm, n]}", flush=True)
    gib = 2**30
    print(f"\nload average before: {load:.2f}; {os.cpu_count()} CPUs; fine-tune batch {args.batch_size}; peaks while "
          "the sweep ran\n")
    print("| data | trials | PSS (GiB) | x one trial | RSS (GiB) | x one trial | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arm in args.arms:
        one = rows[arm, args.counts[0]]
        for n in args.counts:
            r = rows[arm, n]
            print(f"| {arm} | {n} | {r['pss'] / gib:.2f} | {r['pss'] / one['pss']:.2f}x | {r['rss'] / gib:.2f} | "
                  f"{r['rss'] / one['rss']:.2f}x | {r['wall']:.0f} |")
    print("\nthe PSS peak by kind of process (GiB; above the level before the sweep)\n")
    kinds = sorted({k for r in rows.values() for k in r["kinds"]})
    print("| data | trials | " + " | ".join(kinds) + " |")
    print("|---|---:|" + "---:|" * len(kinds))
    for arm in args.arms:
        for n in args.counts:
            got = rows[arm, n]["kinds"]
            print(f"| {arm} | {n} | " + " | ".join(f"{got.get(k, 0) / gib:.2f}" for k in kinds) + " |")
    last, baseline = args.counts[-1], args.arms[-1]
    for arm in args.arms[:-1]:
        print(f"\n{last} trials, {arm} against {baseline}: {rows[arm, last]['pss'] / rows[baseline, last]['pss']:.2f}x "
              "the PSS")


if __name__ == "__main__":
    main()
