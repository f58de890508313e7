"""Latency speed-up of pruned models against their FLOPs reduction factor.

Each model is pruned (l1, local) to remove 25, 50 and 75 % of its FLOPs, with and without
``round_to=8``; latency is the median of timed forward passes after warm-up (sweep.worker.measure),
at batch 1 and 32 on the CPU, and on the GPU when there is one. "speed/F" is the latency
speed-up divided by the FLOPs factor (base / pruned): 1.0 when latency falls exactly as fast
as FLOPs. "odd" is the share of convs whose width is not a multiple of 8.

    python bench/speedup.py --threads 1            # 224x224, batch 1 and 32, 30 runs
    python bench/speedup.py --threads 1 --quick    # 112x112, batch 1, 10 runs
    python bench/speedup.py --smoke                # resnet18 at 32x32, 50 % only, batch 1, 2 runs: code path
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision
from torch import nn

from sweep.pruning import prune
from sweep.worker.measure import count_flops, latency_ms

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg16_bn"]
TARGETS = [0.25, 0.5, 0.75]
ROUNDINGS = [1, 8]


def odd_widths(model: nn.Module) -> float:
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(w % 8 != 0 for w in widths) / len(widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="112x112, batch 1 only, 10 runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--smoke", action="store_true", help="resnet18 at 32x32, 50 %% only, batch 1, 2 runs: "
                        "the code path only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    side, batches, runs, warmup = (32, (1,), 2, 1) if args.smoke else (112, (1,), 10, 3) if args.quick else \
        (224, (1, 32), 30, 5)
    models, targets = (MODELS[:1], [0.5]) if args.smoke else (args.models, TARGETS)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    torch.manual_seed(0)
    example = torch.randn(1, 3, side, side)

    def ms(model: nn.Module, device: torch.device, batch: int) -> float:
        x = torch.randn(batch, 3, side, side, device=device)
        return latency_ms(model.to(device), x, device, warmup=warmup, runs=runs)

    print(f"input {side}x{side}, {torch.get_num_threads()} CPU threads, median of {runs} runs after {warmup} "
          f"warm-up, torch {torch.__version__}; devices: {', '.join(map(str, devices))}")
    print(f"{'model':<13} {'target':>6} {'round':>5} {'odd':>4} {'FLOPs x':>7} | " + " | ".join(
        f"{d.type} b{b:<3} {'ms':>7} {'speedup':>7} {'speed/F':>7}" for d in devices for b in batches))
    at_half: dict[tuple[str, int], list[float]] = {}
    for name in models:
        base = torchvision.models.get_model(name).eval()
        base_flops = count_flops(base, example)
        base_ms = {(d, b): ms(base, d, b) for d in devices for b in batches}
        print(f"{name:<13} {'base':>6} {'':>5} {odd_widths(base):>4.0%} {1:>7.2f} | " + " | ".join(
            f"{d.type} b{b:<3} {base_ms[(d, b)]:>7.2f} {'':>7} {'':>7}" for d in devices for b in batches))
        for target in targets:
            for round_to in ROUNDINGS:
                pruned = prune(base.cpu(), example, strategy="l1", ratio=target, target="flops",
                               round_to=round_to).model.eval()
                factor = base_flops / count_flops(pruned, example)
                cells = []
                for d in devices:
                    for b in batches:
                        speedup = base_ms[(d, b)] / ms(pruned, d, b)
                        cells.append(f"{d.type} b{b:<3} {base_ms[(d, b)] / speedup:>7.2f} {speedup:>7.2f} "
                                     f"{speedup / factor:>7.2f}")
                        if target == 0.5:
                            at_half.setdefault((d.type, round_to), []).append(speedup / factor)
                print(f"{name:<13} {target:>6.2f} {round_to:>5} {odd_widths(pruned):>4.0%} {factor:>7.2f} | "
                      + " | ".join(cells), flush=True)
    print("speed-up / FLOPs factor at 50 % FLOPs reduction (median over models and batches; goal >= 0.8): "
          + ", ".join(f"{dev} round_to={r}: {statistics.median(v):.2f}" for (dev, r), v in at_half.items()))


if __name__ == "__main__":
    main()
