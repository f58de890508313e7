"""Coverage: every torchvision classification model, L1 at 0.5, sweep.pruning against Torch-Pruning.

Each side prunes 50 % of the channels of every layer it can (L1 filter norm, local, classifier
kept) from a randomly initialised model whose norm statistics are randomised too. Its result is:

- equivalent: the pruned model computes what the original computes with the removed channels
  zeroed (and LayerNorms over the kept channels), relative error < 1e-6 in float64 (< 1e-4 in
  float32 for the models over 300 M parameters);
- refused: a clear error before touching the model; wrong: the outputs differ; crashed: any
  other exception, or a pruned model that does not run; killed: SIGKILL, on this machine the kernel's
  OOM killer (check `dmesg`).

Torch-Pruning's removed channels are read from its groups (interactive step) and checked against
the same reference. Each model and side runs in its own process (memory, crashes, a time limit).

    pip install -e ".[bench]"
    python bench/coverage.py --threads 1 [--models resnet18 convnext_tiny] [--sides ours tp]
    python bench/coverage.py --smoke      # resnet18 only, both sides: the code path only

Without torch_pruning installed, the tp side is left out with a note.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from _pruners import child, in_own_process, installed_sides, ours, print_counts, torch_pruning

BIG = 300_000_000  # parameters; above this, float64 copies do not fit next to other jobs


def input_size(name: str) -> int:
    if name.startswith(("vit", "maxvit", "swin")):
        return 224  # fixed image or window sizes
    return 96 if name == "inception_v3" else 64


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, float]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():  # ViT's zero head: outputs all 0
                m.weight.normal_(0, 0.02, generator=g)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)) \
                    and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    big = sum(p.numel() for p in model.parameters()) > BIG
    if not big:
        model = model.double()
    size = input_size(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float32 if big else torch.float64)
    return model, x, 1e-4 if big else 1e-6


def run_one(name: str, side: str) -> dict:
    from sweep.pruning import PruningError, relative_error
    from sweep.worker.measure import count_flops

    model, x, tol = build(name)
    try:
        pruned, plan = (ours if side == "ours" else torch_pruning)(model, x)
    except PruningError as exc:
        return {"status": "refused", "note": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        return {"status": "crashed", "note": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
    try:
        err = relative_error(model, pruned, plan, x)
    except Exception as exc:  # noqa: BLE001
        return {"status": "crashed", "note": f"pruned model fails: {type(exc).__name__}: "
                                             f"{str(exc).strip().splitlines()[0][:200]}"}
    flops = 1 - count_flops(pruned, x[:1]) / count_flops(model, x[:1])
    if not plan.removed:
        return {"status": "no-op", "flops_removed": flops}
    status = "equivalent" if err < tol else "wrong"
    return {"status": status, "error": err, "flops_removed": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=torchvision.models.list_models(module=torchvision.models))
    parser.add_argument("--sides", nargs="+", default=["ours", "tp"], choices=["ours", "tp"])
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model and side")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="resnet18 only: the code path only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.models = ["resnet18"]
    args.sides = installed_sides(args.sides)
    if args.one:
        child(run_one, *args.one)
        return

    results: dict[str, dict[str, dict]] = {}
    print(f"{'model':<22}" + "".join(f"  {s:<11} {'FLOPs-':>6}" for s in args.sides) + "  note", flush=True)
    for name in args.models:
        results[name] = {}
        for side in args.sides:
            start = time.perf_counter()
            results[name][side] = in_own_process(__file__, args.threads, name, side, args.timeout)
            results[name][side]["seconds"] = time.perf_counter() - start
        row = results[name]
        cells = "".join(f"  {row[s]['status']:<11} {100 * row[s]['flops_removed']:>5.1f}%" if "flops_removed" in row[s]
                        else f"  {row[s]['status']:<11} {'':>6}" for s in args.sides)
        notes = "; ".join(f"{s}: {row[s]['note'][:110]}" for s in args.sides if "note" in row[s])
        print(f"{name:<22}{cells}  {notes}", flush=True)
    print()
    print_counts(results, args.sides)


if __name__ == "__main__":
    main()
