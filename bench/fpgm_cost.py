"""FPGM cost on VGG-16: fpgm against l1, and the sketched distances of wide layers against exact ones.

Times `prune(vgg16(weights=None), 1x3x64x64, ratio=0.5)` for l1 and fpgm (alternating, `--runs` each). Then, on
VGG-16's two wide Linears (random init), compares the scores FPGM gives their rows (sweep.pruning's own criterion,
which sketches a layer over its exact limit) with exact distance sums computed here: Spearman rank correlation, the
share of the kept half (ratio 0.5) that both keep, the share of the channels fpgm's prune removed that the exact
scores would remove too, and the time of the exact sums. "plain JL" sketches the norms too, for comparison.

    python bench/fpgm_cost.py --threads 1
    python bench/fpgm_cost.py --smoke       # a small VGG-shaped network with one Linear over the limit: code path
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch
import torchvision
from scipy.stats import spearmanr
from torch import nn

from sweep.pruning import STRATEGIES, analyse, prune

SKETCH_DIM = 256  # the width of plain JL's projection: sweep.pruning.criteria's for FPGM's sketch
WIDE = ("classifier.0", "classifier.3")


def exact_distance_sums(w: torch.Tensor) -> torch.Tensor:
    """Sum of Euclidean distances from each row to all rows, every inner product exact (centred, float32)."""
    w = w.float() - w.float().mean(0)
    sq = (w * w).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * (w @ w.T)).clamp_min_(0).sqrt_().sum(1)


def plain_jl(w: torch.Tensor, k: int) -> torch.Tensor:
    """Distance sums between sketched rows, norms sketched too (what sweep.pruning's FPGM does not do)."""
    w = w.float() - w.float().mean(0)
    g = torch.Generator().manual_seed(0)
    p = w @ (torch.randn(w.shape[1], k, generator=g) / k**0.5)
    sq = (p * p).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * (p @ p.T)).clamp_min_(0).sqrt_().sum(1)


def kept_overlap(a: torch.Tensor, b: torch.Tensor, ratio: float = 0.5) -> float:
    keep = len(a) - int(len(a) * ratio)
    return len(set(a.topk(keep).indices.tolist()) & set(b.topk(keep).indices.tolist())) / keep


def vgg16() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


class SmallVGG(nn.Module):
    """VGG's layout at a fraction of its size; classifier.0 (1024 rows of 10,240) is over FPGM's exact limit."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 40, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(40 * 16 * 16, 1024), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(1024, 1024), nn.ReLU(), nn.Dropout(), nn.Linear(1024, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def small_vgg() -> nn.Module:
    torch.manual_seed(0)
    return SmallVGG().eval()


def library_scores(model: nn.Module, x: torch.Tensor, strategy: str) -> tuple[float, dict[str, torch.Tensor]]:
    """(seconds to score the whole network, each wide layer's per-row scores) from the pruner's own criterion."""
    graph = analyse(model, (x,))
    start = time.perf_counter()
    scores = STRATEGIES[strategy](model, graph, None, torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    rows = {m.module: scores[m.units] for m in graph.members if m.role == "out" and m.module in WIDE}
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2, help="timed prunes per strategy")
    parser.add_argument("--smoke", action="store_true", help="a small VGG-shaped network, 1 run: the code path only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build, side, runs, label = (small_vgg, 32, 1, "small VGG") if args.smoke else (vgg16, 64, args.runs, "vgg16")
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    x = torch.randn(1, 3, side, side)
    prune(build(), x, strategy="fpgm", ratio=0.5)  # one-off costs (imports, fx)

    times: dict[str, list[float]] = {"l1": [], "fpgm": []}
    plans = {}
    for _ in range(runs):
        for strategy in times:
            model = build()
            start = time.perf_counter()
            plans[strategy] = prune(model, x, strategy=strategy, ratio=0.5).plan
            times[strategy].append(time.perf_counter() - start)
    print(f"prune({label}, 1x3x{side}x{side}, ratio=0.5), seconds:")
    for name, ts in times.items():
        print(f"  {name:<5} {'  '.join(f'{t:.2f}' for t in ts)}   (x{min(ts) / min(times['l1']):.1f} l1, best runs)")

    model = build()
    t_fpgm, sketched = library_scores(model, x, "fpgm")
    t_l1, _ = library_scores(model, x, "l1")
    print(f"scoring every layer: fpgm {t_fpgm:.2f} s, l1 {t_l1:.2f} s")
    for name in WIDE:
        w = model.get_submodule(name).weight.detach()
        start = time.perf_counter()
        exact = exact_distance_sums(w)
        t_exact = time.perf_counter() - start
        removed = plans["fpgm"].removed.get(name, [])
        by_exact = set(exact.topk(len(removed), largest=False).indices.tolist())
        jl = plain_jl(w, SKETCH_DIM)
        print(f"{name} {tuple(w.shape)}: exact sums {t_exact:.2f} s; fpgm against exact: Spearman "
              f"{spearmanr(sketched[name], exact).statistic:.4f}, kept half shared "
              f"{kept_overlap(sketched[name], exact):.1%}, removed by prune and by exact "
              f"{len(by_exact & set(removed)) / max(1, len(removed)):.1%}; plain JL (k={SKETCH_DIM}): Spearman "
              f"{spearmanr(jl, exact).statistic:.4f}, kept half shared {kept_overlap(jl, exact):.1%}")
    print("uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
