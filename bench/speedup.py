"""Latency speed-up of pruned models against their FLOPs reduction factor.

Each model is pruned (l1, local) to remove 25, 50 and 75 % of its FLOPs, with and without
``round_to=8``; latency is the median of timed forward passes after warm-up (sweep.measure),
at batch 1 and 32, on the CPU, and on the GPU when there is one. Speed-up / FLOPs factor is 1.0
when latency falls exactly as fast as FLOPs.

    python bench/speedup.py            # 224x224, batch 1 and 32
    python bench/speedup.py --quick    # 112x112, batch 1 and 8, fewer runs
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision

from sweep.measure import count_flops, latency_ms
from sweep.pruning import prune

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg16_bn"]
TARGETS = [0.25, 0.5, 0.75]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    side, batches, runs = (112, (1, 8), 10) if args.quick else (224, (1, 32), 30)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    torch.manual_seed(0)
    example = torch.randn(1, 3, side, side)
    print(f"input {side}x{side}, {torch.get_num_threads()} CPU threads, median of {runs} runs; "
          f"devices: {', '.join(map(str, devices))}")
    print(f"{'model':<13} {'target':>6} {'round':>5} {'FLOPs x':>8} | " + " | ".join(
        f"{d.type} b{b} {'ms':>7} {'speedup':>7} {'/FLOPs':>6}" for d in devices for b in batches))
    at_half = []
    for name in MODELS:
        base = torchvision.models.get_model(name).eval()
        base_flops = count_flops(base, example)
        base_ms = {(d, b): latency_ms(base.to(d), torch.randn(b, 3, side, side, device=d), d, runs=runs)
                   for d in devices for b in batches}
        for target in TARGETS:
            for round_to in (1, 8):
                pruned = prune(base.cpu(), example, strategy="l1", ratio=target, target="flops",
                               round_to=round_to).model.eval()
                factor = base_flops / count_flops(pruned, example)
                cells = []
                for d in devices:
                    for b in batches:
                        ms = latency_ms(pruned.to(d), torch.randn(b, 3, side, side, device=d), d, runs=runs)
                        speedup = base_ms[(d, b)] / ms
                        cells.append(f"{d.type} b{b} {ms:>7.2f} {speedup:>7.2f} {speedup / factor:>6.2f}")
                        if target == 0.5 and d.type == "cpu":
                            at_half.append(speedup / factor)
                print(f"{name:<13} {target:>6.2f} {round_to:>5} {factor:>8.2f} | " + " | ".join(cells))
    print(f"CPU latency speed-up / FLOPs factor at 50 % FLOPs reduction (median over models, batches, "
          f"rounding) = {statistics.median(at_half):.2f}")


if __name__ == "__main__":
    main()
