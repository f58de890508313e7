"""FPGM cost on VGG-16: fpgm against l1, and the sketched distances of wide layers against exact ones.

Times `prune(vgg16(weights=None), 1x3x64x64, ratio=0.5)` for l1 and fpgm (alternating, `--runs` each), and fpgm
with every layer exact (the sketch switched off, as before it existed). Then, on VGG-16's two wide Linears
(random init), compares FPGM's sketched scores with the exact ones: Spearman rank correlation, and the share of
the kept half (ratio 0.5) that both keep. "plain JL" sketches the norms too, for comparison.

    python bench/fpgm_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch
import torchvision

from sweep.pruning import criteria, prune


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def kept_overlap(a: torch.Tensor, b: torch.Tensor, ratio: float = 0.5) -> float:
    keep = len(a) - int(len(a) * ratio)
    return len(set(a.topk(keep).indices.tolist()) & set(b.topk(keep).indices.tolist())) / keep


def plain_jl(w: torch.Tensor, k: int) -> torch.Tensor:
    """Distance sums between sketched rows, norms sketched too (what criteria.py does not do)."""
    w = w.float() - w.float().mean(0)
    g = torch.Generator().manual_seed(criteria._SKETCH_SEED)
    p = w @ (torch.randn(w.shape[1], k, generator=g) / k**0.5)
    sq = (p * p).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * (p @ p.T)).clamp_min_(0).sqrt_().sum(1)


def vgg16() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


def timed_prune(strategy: str, x: torch.Tensor, exact: bool = False):
    limit = criteria._EXACT_LIMIT
    if exact:
        criteria._EXACT_LIMIT = float("inf")
    try:
        model = vgg16()
        start = time.perf_counter()
        result = prune(model, x, strategy=strategy, ratio=0.5)
        return time.perf_counter() - start, result.plan
    finally:
        criteria._EXACT_LIMIT = limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2, help="timed prunes per strategy")
    parser.add_argument("--exact-runs", type=int, default=1, help="timed fpgm prunes with the sketch off (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); exact limit {criteria._EXACT_LIMIT:.0e} "
          f"multiply-adds, sketch k={criteria._SKETCH_DIM}")
    x = torch.randn(1, 3, 64, 64)
    prune(torchvision.models.resnet18().eval(), x, strategy="fpgm", ratio=0.5)  # one-off costs (imports, fx)

    times: dict[str, list[float]] = {"l1": [], "fpgm": [], "fpgm exact": []}
    plans = {}
    for _ in range(args.runs):
        for strategy in ("l1", "fpgm"):
            t, plans[strategy] = timed_prune(strategy, x)
            times[strategy].append(t)
    for _ in range(args.exact_runs):
        t, plans["fpgm exact"] = timed_prune("fpgm", x, exact=True)
        times["fpgm exact"].append(t)
    print("prune(vgg16, 1x3x64x64, ratio=0.5), seconds:")
    for name, ts in times.items():
        if ts:
            runs = "  ".join(f"{t:.2f}" for t in ts)
            print(f"  {name:<11} {runs}   (x{min(ts) / min(times['l1']):.1f} l1, best runs)")
    if "fpgm exact" in plans:
        sketched, exact = plans["fpgm"].removed, plans["fpgm exact"].removed
        same = {n: len(set(sketched[n]) & set(exact[n])) / len(sketched[n]) for n in ("classifier.0", "classifier.3")}
        others = all(sketched[n] == exact[n] for n in sketched if not n.startswith("classifier"))
        print(f"  removed channels shared by fpgm and fpgm exact: classifier.0 {same['classifier.0']:.1%}, "
              f"classifier.3 {same['classifier.3']:.1%}; every other layer identical: {others}")

    model = vgg16()
    for name in ("classifier.0", "classifier.3"):
        w = model.get_submodule(name).weight.detach()
        start = time.perf_counter()
        exact = criteria._distance_sums(w, None)
        t_exact = time.perf_counter() - start
        start = time.perf_counter()
        sketched = criteria._distance_sums(w)
        t_sketch = time.perf_counter() - start
        jl = plain_jl(w, criteria._SKETCH_DIM)
        print(f"{name} {tuple(w.shape)}: exact {t_exact:.2f} s, sketch (k={criteria._sketch_dim(*w.shape)}) "
              f"{t_sketch:.2f} s; Spearman {spearman(sketched, exact):.4f}, kept half shared "
              f"{kept_overlap(sketched, exact):.1%}; plain JL: Spearman {spearman(jl, exact):.4f}, "
              f"kept half shared {kept_overlap(jl, exact):.1%}")
    print("uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
