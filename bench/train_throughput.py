"""Training throughput: the trial's loop (sweep.worker.train over sweep.zoo.batching.batches) against a plain PyTorch
loop.

Data: synthetic CIFAR-shaped images (uint8, 3x32x32, random pixels, 10 labels), held exactly as the CIFAR-10
loader holds them (a TensorImages split with CIFAR-10 statistics, 4-pixel random shift and horizontal flip).
Pixel values do not change the cost of a training step, and synthetic data runs anywhere (no files to decode).

- ours:  sweep.worker.train.train_epoch over sweep.zoo.batching.batches: the split lives on the device, augmentation and
         normalisation are batched tensor ops there; on a GPU also bf16 autocast and channels_last.
- plain: the textbook loop: a Dataset of the same uint8 tensors with per-sample torchvision transforms
         (RandomCrop(32, padding=4), RandomHorizontalFlip, Normalize), DataLoader(shuffle=True, batch 128,
         workers), SGD, fp32.
Both use the same model, batch size and optimizer settings. After one warm-up epoch each, timed epochs
alternate ours/plain so a change in machine load hits both alike.

On a GPU the script also runs 1, 2, 4 and 8 copies of our loop at once on the one GPU (as a sweep with
fractional GPU resources does: `resources.gpu: 0.125` puts 8 trials on a card) and samples nvidia-smi's
utilisation while they run.

    python bench/train_throughput.py                 # 3 timed epochs of 2,048 images per model (CPU)
    python bench/train_throughput.py --quick         # 1 timed epoch of 1,024 images
    python bench/train_throughput.py --threads 2 --workers 2 --models resnet20 small_cnn
    python bench/train_throughput.py --smoke         # small_cnn, 1 timed epoch of 256 images, no DataLoader workers
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from sweep.worker.train import TrainConfig, make_optimizer, prepare_model, train_epoch
from sweep.zoo.batching import batches
from sweep.zoo.images import TensorImages
from sweep.zoo.models import build_model

BATCH = 128
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
GPU_IMAGES = 50_000  # a full CIFAR-10 training set: small enough to live on any GPU


def synthetic_cifar(n: int, seed: int = 0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return TensorImages(images, labels, CIFAR10_STATS, image_size=32, pad=4, flip=True)


class PerSample(Dataset):
    """The usual dataset: one uint8 image at a time through torchvision transforms."""

    def __init__(self, data: TensorImages):
        self.images, self.labels = data.images, data.labels
        self.transform = T.Compose([
            T.ConvertImageDtype(torch.float32),
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.Normalize(*CIFAR10_STATS),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


# An epoch runner runs one epoch and returns how many images it trained on.
Epoch = Callable[[], int]


def ours(model_name: str, data: TensorImages, device: torch.device) -> Epoch:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=100, lr=0.05, batch_size=BATCH)  # amp and channels_last default on (GPU only)
    model = prepare_model(build_model(model_name, 10), device, cfg)
    train = batches(data, BATCH, train=True, device=device)
    opt, sched = make_optimizer(model, cfg, len(train))

    def epoch() -> int:
        train_epoch(model, train, opt, sched, cfg, device)  # returns loss.item(): synchronised
        return len(train) * BATCH

    return epoch


def plain(model_name: str, data: TensorImages, device: torch.device, workers: int) -> Epoch:
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(device)
    loader = DataLoader(PerSample(data), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def epoch() -> int:
        model.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(loader) * BATCH

    return epoch


def compare(runners: dict[str, Epoch], epochs: int) -> dict[str, float]:
    """Images/s of each runner: one warm-up epoch each, then timed epochs taken in turn."""
    for run in runners.values():
        run()  # allocator, kernels, DataLoader workers
    seconds = dict.fromkeys(runners, 0.0)
    images = dict.fromkeys(runners, 0)
    for _ in range(epochs):
        for name, run in runners.items():
            start = time.perf_counter()
            images[name] += run()
            seconds[name] += time.perf_counter() - start
    return {name: images[name] / seconds[name] for name in runners}


# --- several trainings sharing one GPU ------------------------------------------------------------------

def _gpu_worker(model_name: str, epochs: int, threads: int, ready, go, out) -> None:
    torch.set_num_threads(threads)
    device = torch.device("cuda")
    run = ours(model_name, synthetic_cifar(GPU_IMAGES), device)
    run()  # warm-up, before the common start
    ready.put(os.getpid())
    go.wait()
    start = time.perf_counter()
    images = sum(run() for _ in range(epochs))
    out.put(images / (time.perf_counter() - start))


def _utilisation() -> float | None:
    text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i",
                           os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                          capture_output=True, text=True, check=False).stdout.split()
    return float(text[0]) if text else None


def shared_gpu(model_name: str, counts: tuple[int, ...], epochs: int, threads: int) -> list[tuple[int, float, float]]:
    """(trainings at once, summed images/s, mean GPU utilisation % while all were timed)."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    rows = []
    for n in counts:
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_gpu_worker, args=(model_name, epochs, threads, ready, go, out)) for _ in range(n)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get()
        go.set()
        samples: list[float] = []
        rates: list[float] = []
        # Sample only while every training is still timing, so the mean is not diluted by the stragglers' tail.
        while not rates:
            if shutil.which("nvidia-smi") and (u := _utilisation()) is not None:
                samples.append(u)
            time.sleep(0.2)
            if not out.empty():
                rates.append(out.get())
        rates += [out.get() for _ in range(n - 1)]
        for p in procs:
            p.join()
        rows.append((n, sum(rates), sum(samples) / len(samples) if samples else math.nan))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 timed epoch of 1,024 images")
    parser.add_argument("--models", nargs="+", default=["resnet20", "small_cnn"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    parser.add_argument("--gpu-counts", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="copies of our loop sharing the GPU, one row each")
    parser.add_argument("--smoke", action="store_true", help="small_cnn, 1 timed epoch of 256 images, no DataLoader "
                        "workers, one GPU count: the code path only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs, cpu_images = (1, 256) if args.smoke else (1, 1024) if args.quick else (3, 2048)
    if args.smoke:
        args.models, args.workers, args.gpu_counts = ["small_cnn"], 0, args.gpu_counts[:1]

    print(f"synthetic CIFAR-size data (uint8 3x32x32), batch {BATCH}, {epochs} timed epoch(s) after one warm-up, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"plain loop: {args.workers} DataLoader workers")
    targets = [("cpu", cpu_images)]
    if torch.cuda.is_available():
        targets.append(("cuda", GPU_IMAGES))
    ratios = []
    print(f"{'device':<6} {'model':<10} {'images':>7} {'ours img/s':>11} {'plain img/s':>12} {'ours / plain':>13}")
    for device_name, n in targets:
        data, device = synthetic_cifar(n), torch.device(device_name)
        for model_name in args.models:
            rate = compare({"ours": ours(model_name, data, device),
                            "plain": plain(model_name, data, device, args.workers)}, epochs)
            ratio = rate["ours"] / rate["plain"]
            ratios.append(f"{device_name} {model_name} {ratio:.2f}x")
            print(f"{device_name:<6} {model_name:<10} {n:>7} {rate['ours']:>11.0f} {rate['plain']:>12.0f} "
                  f"{ratio:>13.2f}")

    if torch.cuda.is_available():
        print(f"\n{torch.cuda.get_device_name()}: copies of our loop sharing the GPU ({args.models[0]}, "
              f"{GPU_IMAGES} images, {epochs} timed epoch(s) each)")
        print(f"{'trials':>6} {'total img/s':>12} {'GPU util %':>11}")
        rows = shared_gpu(args.models[0], tuple(args.gpu_counts), epochs, max(1, args.threads // 4))
        for n, rate, util in rows:
            print(f"{n:>6} {rate:>12.0f} {util:>11.0f}   {rate / rows[0][1]:.2f}x the first row")
    print("ours / plain images/s: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
