"""Pruning speed: sweep.pruning against Torch-Pruning, same models, same ratio, same run.

Both sides analyse the graph and remove 50 % of the channels of every prunable layer (L1 filter
norm, local/uniform per layer, classifier kept) from a fresh copy of the model; the time covers
analysis and surgery. Each side's resulting FLOPs and parameters are printed so that the amounts
pruned can be compared. Ratio < 1 means we are faster.

    pip install -e ".[bench]"
    python bench/prune_speed.py --threads 1            # 224x224, median of 5
    python bench/prune_speed.py --threads 1 --quick    # 224x224, 1 timed run each
    python bench/prune_speed.py --smoke                # resnet18 at 64x64, 1 timed run each: the code path only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from sweep.pruning import prune
from sweep.worker.measure import count_flops, count_params

MODELS = ["resnet50", "mobilenet_v2", "densenet121", "vgg16_bn"]
Pruner = Callable[[torch.nn.Module, torch.Tensor], torch.nn.Module]


def ours(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    return prune(model, x, strategy="l1", ratio=0.5, scope="local").model


def torch_pruning(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)  # ours leaves the input untouched and pays for a copy; so does theirs
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[head], global_pruning=False)
    pruner.step()
    return model


def timed(fn: Pruner, model: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, torch.nn.Module]:
    times, pruned = [], model
    for _ in range(repeats):
        start = time.perf_counter()
        pruned = fn(model, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times), pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed run per side and model instead of five")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--smoke", action="store_true", help="resnet18 at 64x64, one timed run: the code path only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick or args.smoke else 5
    side, models = (64, ["resnet18"]) if args.smoke else (224, args.models)
    torch.manual_seed(0)
    x = torch.randn(1, 3, side, side)
    # One untimed run per side on a small model pays the one-off costs (lazy imports, fx and
    # allocator warm-up) so that neither side's first timed model carries them.
    small = torchvision.models.resnet18().eval()
    ours(small, x), torch_pruning(small, x)
    print(f"input 1x3x{side}x{side}, {torch.get_num_threads()} threads, median of {repeats}, torch {torch.__version__}")
    print(f"{'model':<13} {'ours s':>7} {'TP s':>7} {'ratio':>6} | {'GFLOPs base':>11} {'ours':>6} {'TP':>6} "
          f"| {'Mparams base':>12} {'ours':>6} {'TP':>6}")
    ratios = []
    for name in models:
        model = torchvision.models.get_model(name).eval()
        t_ours, m_ours = timed(ours, model, x, repeats)
        t_tp, m_tp = timed(torch_pruning, model, x, repeats)
        ratios.append(t_ours / t_tp)
        gf = [count_flops(m, x) / 1e9 for m in (model, m_ours, m_tp)]
        mp = [count_params(m) / 1e6 for m in (model, m_ours, m_tp)]
        print(f"{name:<13} {t_ours:>7.2f} {t_tp:>7.2f} {t_ours / t_tp:>6.2f} | {gf[0]:>11.2f} {gf[1]:>6.2f} "
              f"{gf[2]:>6.2f} | {mp[0]:>12.2f} {mp[1]:>6.2f} {mp[2]:>6.2f}", flush=True)
    print(f"our time / Torch-Pruning's = {statistics.geometric_mean(ratios):.2f} "
          f"(geometric mean over {len(ratios)} models; < 1 means faster)")


if __name__ == "__main__":
    main()
