"""timm coverage: one untrained model per convolutional timm family, sweep.pruning against Torch-Pruning.

Each side prunes 50 % of the channels of every layer it can (L1 filter norm, local, classifier
kept) from a randomly initialised model (pretrained=False: nothing is downloaded) whose norm
statistics and affines are randomised too, in float64. Its result is:

- equivalent: the pruned model computes what the original computes with the removed channels
  zeroed (and LayerNorms over the kept channels), relative error < 1e-6;
- refused: a one-line PruningError before touching the model; wrong: the outputs differ;
  crashed: any other exception, or a pruned model that does not run; killed: out of memory (SIGKILL);
  timeout: over --timeout.

FLOPs removed count conv and Linear FLOPs (torch.utils.flop_counter) of one image. Prune time is
the wall time of the prune call alone (analysis, scoring and surgery), one run, in float64.
Torch-Pruning's removed channels are read from its groups (interactive step). Each model and side
runs in its own process (memory, crashes, a time limit).

    pip install -e ".[bench,timm]"
    python bench/timm_coverage.py --threads 1 [--models resnet26d dm_nfnet_f0] [--sides ours tp]
    python bench/timm_coverage.py --smoke      # lcnet_050 only, both sides: the code path only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch
from _pruners import child, in_own_process, installed_sides, ours, print_counts, torch_pruning

# One model per family whose models are convolutional (timm 1.0.31), the smallest that stands for it.
FAMILIES = {
    "ResNet": "resnet26d", "SENet": "legacy_seresnet18", "ResNet-ts (ByobNet)": "resnet33ts",
    "GCResNet": "gcresnet33ts", "GENet": "gernet_s", "RegNetZ": "regnetz_b16", "RepVGG": "repvgg_a0",
    "MobileOne": "mobileone_s0", "ResNetV2 (BiT)": "resnetv2_50x1_bit", "RegNet": "regnety_002",
    "EfficientNet": "efficientnet_b0", "MixNet": "mixnet_s", "MnasNet": "mnasnet_100",
    "MobileNetV3": "mobilenetv3_small_100", "LCNet": "lcnet_050", "FBNetV3": "fbnetv3_b",
    "HardCoReNAS": "hardcorenas_a", "GhostNet": "ghostnet_100", "RepGhostNet": "repghostnet_050",
    "ReXNet": "rexnet_100", "DenseNet": "densenet121", "DLA": "dla34", "DPN": "dpn48b",
    "CSPResNet": "cspresnet50", "CSPDarknet": "cspdarknet53", "CS3Darknet": "cs3darknet_s", "Darknet": "darknet17",
    "CSPNeXt": "cspnext_tiny", "VoVNet": "ese_vovnet19b_dw", "Xception": "xception41", "Inception-v3": "inception_v3",
    "Inception-v4": "inception_v4", "Inception-ResNet-v2": "inception_resnet_v2", "TResNet": "tresnet_m",
    "Res2Net": "res2net50_26w_4s", "ResNeSt": "resnest14d", "SKNet": "skresnet18", "SelecSLS": "selecsls42b",
    "HRNet": "hrnet_w18_small", "VGG": "vgg11_bn", "NFNet": "dm_nfnet_f0",
    "ConvNeXt": "convnext_atto", "ConvMixer": "convmixer_768_32", "PoolFormer": "poolformer_s12",
    "MobileViT": "mobilevit_xxs", "EfficientViT (MIT)": "efficientvit_b0", "FastViT": "fastvit_t8",
    "RepViT": "repvit_m0_9", "HGNetV2": "hgnetv2_b0", "InceptionNeXt": "inception_next_atto",
    "StarNet": "starnet_s1", "FasterNet": "fasternet_t0", "RDNet": "rdnet_tiny", "MambaOut": "mambaout_femto",
    "LCNetV2": "lcnetv2_small", "EdgeNeXt": "edgenext_xx_small",
}


def input_size(name: str) -> int:
    return 96 if name.startswith("inception_") else 64  # the Inceptions' stems need more than 64 pixels


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():  # a zero-initialised head: outputs all 0
                m.weight.normal_(0, 0.02, generator=g)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)) \
                    and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    size = input_size(name)
    return model.double(), torch.randn(2, 3, size, size, dtype=torch.float64)


def conv_linear_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(x)
    return counter.get_total_flops()


def run_one(name: str, side: str) -> dict:
    from sweep.pruning import PruningError, relative_error

    model, x = build(name)
    start = time.perf_counter()
    try:
        pruned, plan = (ours if side == "ours" else torch_pruning)(model, x)
    except PruningError as exc:
        return {"status": "refused", "note": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        return {"status": "crashed", "note": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
    seconds = time.perf_counter() - start
    try:
        err = relative_error(model, pruned, plan, x)
        flops = 1 - conv_linear_flops(pruned, x[:1]) / conv_linear_flops(model, x[:1])
    except Exception as exc:  # noqa: BLE001
        return {"status": "crashed", "note": f"pruned model fails: {type(exc).__name__}: "
                                             f"{str(exc).strip().splitlines()[0][:200]}"}
    if not plan.removed:
        return {"status": "no-op", "flops_removed": flops, "prune_s": seconds}
    status = "equivalent" if err < 1e-6 else "wrong"
    return {"status": status, "error": err, "flops_removed": flops, "prune_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(FAMILIES.values()))
    parser.add_argument("--sides", nargs="+", default=["ours", "tp"], choices=["ours", "tp"])
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model and side")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="lcnet_050 only: the code path only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if importlib.util.find_spec("timm") is None:
        sys.exit("timm is not installed: pip install -e '.[timm]'")
    if args.smoke:
        args.models = ["lcnet_050"]
    args.sides = installed_sides(args.sides)
    if args.one:
        child(run_one, *args.one)
        return

    family = {model: fam for fam, model in FAMILIES.items()}
    results: dict[str, dict[str, dict]] = {}
    header = "".join(f" | {s:<10} {'FLOPs-':>6} {'prune s':>7}" for s in args.sides)
    print(f"{'family':<20} {'model':<22}{header} | note", flush=True)
    for name in args.models:
        results[name] = {}
        for side in args.sides:
            results[name][side] = in_own_process(__file__, args.threads, name, side, args.timeout)
        row = results[name]
        cells = ""
        for s in args.sides:
            r = row[s]
            flops = f"{100 * r['flops_removed']:>5.1f}%" if "flops_removed" in r else ""
            secs = f"{r['prune_s']:>7.2f}" if "prune_s" in r else ""
            cells += f" | {r['status']:<10} {flops:>6} {secs:>7}"
        notes = "; ".join(f"{s}: {row[s]['note'][:160]}" for s in args.sides if "note" in row[s])
        print(f"{family.get(name, ''):<20} {name:<22}{cells} | {notes}", flush=True)
    print()
    print_counts(results, args.sides)
    if "ours" in args.sides and "tp" in args.sides:
        both = [r for r in results.values() if "prune_s" in r["ours"] and "prune_s" in r["tp"]]
        if both:
            ratio = torch.tensor([r["ours"]["prune_s"] / r["tp"]["prune_s"] for r in both]).log().mean().exp()
            print(f"prune time ours / Torch-Pruning's: {ratio:.2f} (geometric mean over the {len(both)} models both "
                  "pruned; < 1 means faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
