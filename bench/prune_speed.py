"""Pruning speed: sweep.pruning against Torch-Pruning, same models, same ratio, same run.

Both sides analyse the graph and remove 50 % of the channels of every prunable layer (L1 filter
norm, local/uniform per layer, classifier kept) from a fresh copy of the model; the time covers
analysis and surgery. Each side's resulting FLOPs and parameters are printed so that the amounts
pruned can be compared.

    pip install -e ".[bench]"
    python bench/prune_speed.py            # 224x224, 3 repeats
    python bench/prune_speed.py --quick    # 112x112, 1 repeat
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

from sweep.measure import count_flops, count_params
from sweep.pruning import prune

MODELS = ["resnet50", "mobilenet_v2", "densenet121", "vgg16_bn"]


def ours(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    return prune(model, x, strategy="l1", ratio=0.5, scope="local").model


def torch_pruning(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)  # ours leaves the input untouched; give theirs the same work
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[head], global_pruning=False)
    pruner.step()
    return model


def timed(fn, model, x, repeats: int) -> tuple[float, torch.nn.Module]:
    fn(model, x)  # warm-up: first calls pay one-off costs (lazy imports, allocator growth) on either side
    times, pruned = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        pruned = fn(model, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times), pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    side, repeats = (112, 1) if args.quick else (224, 3)
    torch.manual_seed(0)
    x = torch.randn(1, 3, side, side)
    print(f"input 1x3x{side}x{side}, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'model':<14} {'ours s':>8} {'TP s':>8} {'ratio':>6} | {'GFLOPs base':>11} {'ours':>7} {'TP':>7} "
          f"| {'Mparams base':>12} {'ours':>7} {'TP':>7}")
    ratios = []
    for name in MODELS:
        model = torchvision.models.get_model(name).eval()
        t_ours, m_ours = timed(ours, model, x, repeats)
        t_tp, m_tp = timed(torch_pruning, model, x, repeats)
        ratios.append(t_ours / t_tp)
        gf = [count_flops(m, x) / 1e9 for m in (model, m_ours, m_tp)]
        mp = [count_params(m) / 1e6 for m in (model, m_ours, m_tp)]
        print(f"{name:<14} {t_ours:>8.2f} {t_tp:>8.2f} {t_ours / t_tp:>6.2f} | {gf[0]:>11.2f} {gf[1]:>7.2f} "
              f"{gf[2]:>7.2f} | {mp[0]:>12.2f} {mp[1]:>7.2f} {mp[2]:>7.2f}")
    print(f"our time / Torch-Pruning's (geometric mean over {len(ratios)} models) = "
          f"{statistics.geometric_mean(ratios):.2f}")


if __name__ == "__main__":
    main()
