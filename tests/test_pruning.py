"""The pruner: pruned models compute exactly what the original computes with the removed channels zeroed."""

import io
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sweep.pruning import (
    STRATEGIES,
    PrunePlan,
    PruningError,
    apply_plan,
    load_pruned,
    prune,
    relative_error,
    save_pruned,
    zeroed_reference,
)

RATIOS = (0.3, 0.5, 0.7)
SCOPES = ("local", "global")


# --- small hand-made graphs, one per pattern ------------------------------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a1, self.b1 = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.a2, self.b2 = nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = self.b2(self.a2(F.relu(self.b1(self.a1(x)))))
        x = F.relu(x + y)
        x = F.relu(self.c1(x)) + x
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(20)
        self.c = nn.Conv2d(20, 6, 3, padding=1)
        self.d = nn.Conv2d(26, 10, 1)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        z = torch.cat((y, F.relu(self.c(y))), 1)
        return self.d(z).mean((2, 3))


class Depthwise(nn.Module):
    """Inverted residual with a channel multiplier of 2 and squeeze-excitation."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn0 = nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12)
        self.dw, self.bn1 = nn.Conv2d(12, 24, 3, padding=1, groups=12), nn.BatchNorm2d(24)
        self.se_reduce, self.se_expand = nn.Conv2d(24, 6, 1), nn.Conv2d(6, 24, 1)
        self.project, self.bn2 = nn.Conv2d(24, 12, 1), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu6(self.bn0(self.expand(x)))
        y = F.hardswish(self.bn1(self.dw(x)))
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        y = self.bn2(self.project(y * s))
        return self.head((x + y).mean(dim=(2, 3)))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.fc1, self.fc2 = nn.Linear(12 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.features(x).view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class PadShortcut(nn.Module):
    """Option-A shortcut (CIFAR ResNets): stride-2 subsampling plus zero channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.a(x))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(self.b(x) + short)
        x = F.relu(self.c(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Grouped(nn.Module):
    """ResNeXt's grouped conv, with unequal in and out group widths."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.g, self.bn_g = nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.c = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(x)))
        y = self.c(F.relu(self.bn_g(self.g(x))))
        return self.head((x + y).mean((2, 3)))


class Shuffle(nn.Module):
    """ShuffleNet V2's stride-1 unit: chunk, one branch, cat, then view-transpose-view channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.b1, self.bn1 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.b2 = nn.Conv2d(8, 8, 1)
        self.head_conv, self.head = nn.Conv2d(16, 12, 1), nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x1, x2 = x.chunk(2, dim=1)
        x2 = F.relu(self.b2(self.bn2(self.dw(F.relu(self.bn1(self.b1(x2)))))))
        x = torch.cat((x1, x2), dim=1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(F.relu(self.head_conv(x)).mean((2, 3)))


class GroupNormSplit(nn.Module):
    """GroupNorm (whole groups go), and a split with literal sizes (those channels stay)."""

    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.b, self.gn_b = nn.Conv2d(16, 12, 3, padding=1), nn.GroupNorm(3, 12)
        self.c = nn.Conv2d(10, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.gn(self.a(x)))
        p, q = torch.split(F.relu(self.gn_b(self.b(x))), [4, 8], dim=1)
        y = self.c(torch.cat([p[:, :2], q], dim=1))
        return self.head(y.mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's: LayerNorm over channels of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: LayerNorm2d stem, depthwise conv, channels-last LayerNorm and MLP, layer scale, residual."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 16, 2, stride=2), LayerNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.ln = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.layer_scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.head_norm, self.head = LayerNorm2d(16), nn.Linear(16, 5)

    def forward(self, x):
        x = self.norm(self.stem(x))
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        return self.head(torch.flatten(self.head_norm(F.adaptive_avg_pool2d(x, 1)), 1))


class Audio1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv1d(3, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.c2, self.bn2 = nn.Conv1d(16, 24, 3, padding=1), nn.BatchNorm1d(24)
        self.fc = nn.Linear(24 * 4, 5)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.bn1(self.c1(x))), 2)
        x = F.relu(self.bn2(self.c2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool1d(x, 4), 1))


class Video3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(8, 12, 3, padding=1), nn.BatchNorm3d(12), nn.ReLU(), nn.AdaptiveAvgPool3d(1))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class UNet(nn.Module):
    """Encoder, ConvTranspose2d decoder (one grouped), skip concatenation, per-pixel output."""

    def __init__(self):
        super().__init__()
        self.enc1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.enc2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up, self.bn3 = nn.ConvTranspose2d(16, 12, 2, stride=2), nn.BatchNorm2d(12)
        self.up_g = nn.ConvTranspose2d(12, 8, 3, padding=1, groups=4)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        skip = F.relu(self.bn1(self.enc1(x)))
        y = F.relu(self.bn2(self.enc2(F.max_pool2d(skip, 2))))
        y = F.relu(self.up_g(F.relu(self.bn3(self.up(y)))))
        return self.out(torch.cat([skip, y], 1))


class UNet2(nn.Module):
    """Two levels of ConvTranspose2d upsampling, a skip concatenation at each, and a transposed conv whose input is
    a concatenation: its input channels go at the offsets of both parts."""

    def __init__(self):
        super().__init__()
        self.enc1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.enc2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.mid, self.bn3 = nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up2, self.bn4 = nn.ConvTranspose2d(16, 12, 2, stride=2), nn.BatchNorm2d(12)
        self.up1, self.bn5 = nn.ConvTranspose2d(24, 8, 2, stride=2), nn.BatchNorm2d(8)
        self.dec, self.bn6 = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s1 = F.relu(self.bn1(self.enc1(x)))
        s2 = F.relu(self.bn2(self.enc2(F.max_pool2d(s1, 2))))
        y = F.relu(self.bn3(self.mid(F.max_pool2d(s2, 2))))
        y = F.relu(self.bn4(self.up2(y)))
        y = F.relu(self.bn5(self.up1(torch.cat([y, s2], 1))))
        y = F.relu(self.bn6(self.dec(torch.cat([y, s1], 1))))
        return self.out(y)


PATTERNS = {"residual": Residual, "concat": Concat, "depthwise": Depthwise,
            "flatten_linear": FlattenLinear, "pad_shortcut": PadShortcut, "grouped": Grouped,
            "shuffle": Shuffle, "groupnorm_split": GroupNormSplit, "convnext": ConvNeXtBlock,
            "conv1d": Audio1d, "conv3d": Video3d, "unet": UNet, "unet2": UNet2}
SHAPES = {"conv1d": (4, 3, 32), "conv3d": (4, 3, 4, 8, 8)}


def _input(name, batch=4):
    return torch.randn(batch, *SHAPES.get(name, (4, 3, 8, 8))[1:])


# --- the equivalence property ---------------------------------------------------------------------

def _randomise_bn(model):
    """Non-trivial BN statistics and biases, so no channel is an identity or dead by construction."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.any():  # ViT's zero-initialised head: outputs all 0
            m.weight.data.normal_(0, 0.02, generator=g)
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is not None:
            m.bias.data.copy_(0.1 * torch.rand(m.bias.shape, generator=g))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def assert_equivalent(model, x, **kw):
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        out = model(x)  # per-pixel outputs (the UNet) take per-pixel targets
    calibration = [(x, torch.randint(0, out.shape[1], out.shape[:1] + out.shape[2:]))]
    result = prune(model, x, calibration=calibration, **kw)
    assert result.plan.removed, "nothing was pruned"
    with torch.no_grad():
        expected = zeroed_reference(model, result.plan).eval()(x)
        got = result.model.eval()(x)
    assert got.shape == expected.shape
    assert expected.abs().sum() > 0, "degenerate test: the reference output is all zeros"
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-6, f"relative error {rel}"
    return result


def _pattern(name):
    torch.manual_seed(0)
    model = PATTERNS[name]()
    with torch.no_grad():
        _randomise_bn(model)
    return model


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("ratio,scope", list(itertools.product(RATIOS, SCOPES)))
def test_hand_made_graphs_equivalent(pattern, strategy, ratio, scope):
    assert_equivalent(_pattern(pattern), _input(pattern), strategy=strategy, ratio=ratio, scope=scope)


def _torchvision(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    with torch.no_grad():
        _randomise_bn(model)
    return model


# Every strategy on every model; ratio and scope rotate so each model also sees all three ratios
# and both scopes. The whole cross product runs with `-m slow`.
TORCHVISION = ["alexnet", "vgg16_bn", "resnet18", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0"]
# The newer families run every strategy under `-m slow`; the default run proves them equivalent with l1 (and their
# FLOPs removed) in test_families_beyond_resnet_prune_equivalent_and_remove_their_flops, for 5 s instead of 25 s.
MORE_FAMILIES = ["shufflenet_v2_x0_5", "convnext_tiny", "resnext50_32x4d", "regnet_y_400mf"]
# oracle runs the network (units + 1) times, a minute or more on each of these and on the CIFAR ResNets: the
# hand-made graphs prove it equivalent (residual, grouped, depthwise, transposed), and scores change no surgery
ESTIMATED = [s for s in STRATEGIES if s != "oracle"]
DIAGONAL = [(s, RATIOS[i % 3], SCOPES[i % 2]) for i, s in enumerate(ESTIMATED)]
CACHE = {}


def _cached(name, build):
    if name not in CACHE:
        CACHE.clear()  # keep one large model in memory at a time
        CACHE[name] = build(name)
    return CACHE[name]


# name varies slowest (the decorator nearest the function): each model is built once and its strategies run
# one after another on the cached copy, instead of rebuilding it (seconds for vgg16_bn) for every strategy.
@pytest.mark.parametrize("strategy,ratio,scope", DIAGONAL)
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_equivalent(name, strategy, ratio, scope):
    assert_equivalent(_cached(name, _torchvision), torch.randn(2, 3, 64, 64),
                      strategy=strategy, ratio=ratio, scope=scope)


# FLOPs that l1 at ratio 0.5 (local) must remove. Halving both the inputs and the outputs of a conv leaves a quarter
# of its FLOPs: 0.75 is the ceiling where every layer loses half. ResNet-50 is the reference family (74 %); the
# grouped (ResNeXt, RegNet) and depthwise (ConvNeXt) ones must come near it, as they do (74 % each): ResNeXt-50 with
# its grouped convs left whole (ignore=["layer*.*.conv2"]) loses 63 %, under the bound. ShuffleNet V2 removes 61 %:
# its channel shuffle ties the pass-through half of each unit to the other branch across a whole stage, and some of
# those channels stay. The hand-built nets are small enough that their fixed input and output layers weigh more
# (Conv1d 67 %, UNet 65 %, UNet2 72 %).
FLOPS_AT_HALF = {"resnet50": 0.70, "resnext50_32x4d": 0.70, "regnet_y_400mf": 0.70, "convnext_tiny": 0.70,
                 "shufflenet_v2_x0_5": 0.58, "conv1d": 0.60, "unet": 0.60, "unet2": 0.65}


@pytest.mark.parametrize("name", list(FLOPS_AT_HALF))
def test_families_beyond_resnet_prune_equivalent_and_remove_their_flops(name):
    """Full-size torchvision models (weights=None, BN statistics and affines randomised, float64, 2x3x64x64 input):
    ShuffleNet V2 x0.5, ConvNeXt-T, ResNeXt-50 32x4d, RegNetY-400MF, with ResNet-50 for reference; and the
    hand-built Conv1d net (`Audio1d`) and ConvTranspose2d UNets (`UNet`, `UNet2`) of PATTERNS. Each is pruned
    (l1, ratio 0.5, local) to a model equal to the zeroed original, with fewer conv channels and at least
    FLOPS_AT_HALF[name] of its FLOPs gone; in ResNeXt and RegNet every grouped conv loses channels and keeps its
    number of groups (each group gets narrower)."""
    if name in PATTERNS:
        model, x = _pattern(name), _input(name, 2)
    else:
        model, x = _cached(name, _torchvision), torch.randn(2, 3, 64, 64)
    result = assert_equivalent(model, x, strategy="l1", ratio=0.5, scope="local")
    x = x.double()
    convs = lambda m: {n: c for n, c in m.named_modules() if isinstance(c, nn.modules.conv._ConvNd)}  # noqa: E731
    before, after = convs(model), convs(result.model)
    assert sum(c.out_channels for c in after.values()) < sum(c.out_channels for c in before.values())
    reduction = 1 - count_flops(result.model, x) / count_flops(model, x)
    assert FLOPS_AT_HALF[name] < reduction <= 0.75 + 1e-9, reduction
    if name in ("resnext50_32x4d", "regnet_y_400mf"):
        grouped = [n for n, c in before.items() if 1 < c.groups < c.in_channels]
        assert len(grouped) == 16
        assert all(after[n].out_channels < before[n].out_channels and after[n].groups == before[n].groups
                   for n in grouped)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,ratio,scope", list(itertools.product(ESTIMATED, RATIOS, SCOPES)))
@pytest.mark.parametrize("name", TORCHVISION + MORE_FAMILIES)
def test_torchvision_models_equivalent_full(name, strategy, ratio, scope):
    assert_equivalent(_cached(name, _torchvision), torch.randn(2, 3, 64, 64),
                      strategy=strategy, ratio=ratio, scope=scope)


def _input_size(name):
    if name.startswith(("vit", "maxvit", "swin")):
        return 224  # fixed image or window sizes
    return 96 if name == "inception_v3" else 64


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_model_is_pruned_equivalent_or_refused_cleanly(name, one_thread):
    CACHE.clear()
    model = _torchvision(name).eval()
    big = sum(p.numel() for p in model.parameters()) > 300_000_000  # float64 copies would not fit
    dtype = torch.float32 if big else torch.float64
    model = model.to(dtype)
    x = torch.randn(1, 3, _input_size(name), _input_size(name), dtype=dtype)
    try:
        result = prune(model, x, strategy="l1", ratio=0.5)
    except PruningError as exc:
        assert "\n" not in str(exc) and "ignore=" in str(exc), str(exc)
        pytest.skip(f"refused: {exc}")
    assert result.plan.removed
    assert relative_error(model, result.model, result.plan, x) < (1e-4 if big else 1e-6)


def _cifar(name):
    from sweep.zoo.models import build_model
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    with torch.no_grad():
        _randomise_bn(model)
    return model


@pytest.mark.parametrize("strategy", ESTIMATED)
@pytest.mark.parametrize("ratio,scope", list(itertools.product(RATIOS, SCOPES)))
@pytest.mark.parametrize("name", ["resnet20", "resnet56"])  # nearest the function: varies slowest, one build each
def test_cifar_resnets_equivalent(name, strategy, ratio, scope):
    assert_equivalent(_cached(name, _cifar), torch.randn(2, 3, 32, 32), strategy=strategy, ratio=ratio, scope=scope)


# --- what gets removed ----------------------------------------------------------------------------

def test_input_model_is_left_unchanged():
    model = _pattern("residual")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("strategy", ["taylor", "apoz", "oracle", "l1"])
def test_each_module_keeps_its_own_train_or_eval_mode(strategy):
    # transfer learning freezes a BatchNorm (eval) inside a training model: scoring on calibration data must hand
    # it back frozen, not set every module to the model's mode
    model = _pattern("residual").train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    modes = [m.training for m in model.modules()]
    x = torch.randn(4, 3, 8, 8)
    calibration = [(x, torch.randint(0, model(x).shape[1], (4,)))]
    result = prune(model, x, strategy=strategy, ratio=0.25, calibration=calibration)
    assert not frozen.training and [m.training for m in model.modules()] == modes
    kept = dict(model.named_modules())
    assert all(m.training == kept[name].training for name, m in result.model.named_modules() if name in kept)


def test_residual_channels_are_removed_together():
    plan = prune(_pattern("residual"), torch.randn(1, 3, 8, 8), ratio=0.5).plan
    # stem, a2 and c1 all write into the residual stream: same channels, or none
    assert plan.removed["stem"] == plan.removed["a2"] == plan.removed["c1"] == plan.removed["bn"]
    assert len(plan.removed["stem"]) == 8
    assert plan.removed_in["head"] == plan.removed["stem"]
    assert len(plan.removed["a1"]) == 12


def test_concat_offsets_and_depthwise_multiplier():
    plan = prune(_pattern("concat"), torch.randn(1, 3, 8, 8), ratio=0.5).plan
    a, b = plan.removed["a"], plan.removed["b"]
    assert plan.removed["bn"] == a + [8 + i for i in b]
    assert plan.removed_in["d"] == a + [8 + i for i in b] + [20 + i for i in plan.removed["c"]]

    plan = prune(_pattern("depthwise"), torch.randn(1, 3, 8, 8), ratio=0.5).plan
    dw_out = plan.removed["dw"]
    assert dw_out == sorted(2 * i + j for i in plan.removed["expand"] for j in (0, 1))
    assert plan.removed["se_expand"] == dw_out  # squeeze-excitation scale is tied by the mul
    assert "expand" in plan.removed_in["dw"] or plan.removed_in["dw"] == plan.removed["expand"]


def test_flatten_removes_consecutive_linear_inputs():
    plan = prune(_pattern("flatten_linear"), torch.randn(1, 3, 8, 8), ratio=0.5).plan
    removed = plan.removed["features.4"]
    assert plan.removed_in["fc1"] == [c * 16 + i for c in removed for i in range(16)]


def test_zero_padded_shortcut_channels_stay():
    plan = prune(_pattern("pad_shortcut"), torch.randn(1, 3, 8, 8), ratio=0.5).plan
    # channels 0-3 and 12-15 of b are added to zeros: they can go only if the pad shrinks, which it cannot
    assert all(4 <= i < 12 for i in plan.removed["b"])
    assert [i - 4 for i in plan.removed["b"]] == plan.removed["a"]


def test_output_layer_is_never_pruned():
    for name in PATTERNS:
        model = _pattern(name)
        result = prune(model, _input(name, 2), strategy="random", ratio=0.7, scope="global")
        last = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))][-1]
        assert last not in result.plan.removed
        assert result.model(_input(name, 2)).shape == model(_input(name, 2)).shape


def widths(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_min_channels_and_fraction_and_round_to():
    model = _torchvision("resnet18")
    x = torch.randn(1, 3, 64, 64)
    before = widths(model)
    after = widths(prune(model, x, ratio=0.95, min_channels=6).model)
    assert min(after.values()) >= 6
    after = widths(prune(model, x, ratio=0.95, min_channels=0.25).model)
    assert all(after[n] >= 0.25 * before[n] for n in before)
    after = widths(prune(model, x, ratio=0.3, round_to=8, scope="global").model)
    assert all(w % 8 == 0 for w in after.values())
    # global ranking never empties a layer either
    after = widths(prune(model, x, strategy="random", ratio=0.99, scope="global").model)
    assert min(after.values()) >= 1


def test_clamping_is_logged(caplog):
    with caplog.at_level("WARNING", logger="sweep.pruning"):
        prune(_pattern("residual"), torch.randn(1, 3, 8, 8), ratio=0.5)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="sweep.pruning"):
        prune(_pattern("residual"), torch.randn(1, 3, 8, 8), ratio=0.99, min_channels=4)
    assert any("min_channels=4" in r.getMessage() for r in caplog.records)


def test_ignore_keeps_a_module():
    model = _torchvision("resnet18")
    plan = prune(model, torch.randn(1, 3, 64, 64), ratio=0.5, ignore=["layer2.0.conv1", "layer3"]).plan
    assert "layer2.0.conv1" not in plan.removed
    assert not any(n.startswith("layer3.") for n in plan.removed)
    assert "layer2.1.conv1" in plan.removed
    # shell patterns: prune only the first conv of each block (Li et al.'s ResNet recipe)
    ignore = ["conv1", "layer*.conv2", "layer*.downsample.*"]
    plan = prune(model, torch.randn(1, 3, 64, 64), ratio=0.5, ignore=ignore).plan
    assert {n for n in plan.removed if "conv" in n} == {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in (0, 1)}


def test_local_ratio_removes_that_fraction_of_each_layer():
    model = _torchvision("vgg16_bn")
    result = prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)
    before, after = widths(model), widths(result.model)
    assert all(after[n] == before[n] - before[n] // 2 for n in before)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(result.model) < 0.3 * params(model)


def count_flops(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])  # varies slowest: one build each
def test_flops_target_lands_within_5_percent(name, scope):
    model = _cached(name, _torchvision).float()  # an equivalence test may have left the cached copy in float64
    x = torch.randn(1, 3, 64, 64)
    base = count_flops(model, x)
    for ratio in RATIOS:
        pruned = prune(model, x, strategy="l1", ratio=ratio, target="flops", scope=scope).model
        reduction = 1 - count_flops(pruned, x) / base
        assert abs(reduction - ratio) <= 0.05 * ratio, (ratio, reduction)


def test_per_layer_ratios_remove_exactly_what_is_asked():
    model = _cached("resnet56", _cifar).double()
    x = torch.randn(2, 3, 32, 32).double()
    # Li et al.'s ResNet-56-B: the first conv of each block by stage, some blocks skipped, the rest kept
    ratios = {"layer1.3.conv1": 0.0, "layer1.*.conv1": 0.6, "layer2.*.conv1": 0.3, "layer3.*.conv1": 0.1}
    result = assert_equivalent(model, x, ratio=0.0, ratios=ratios)
    removed = {n: len(v) for n, v in result.plan.removed.items() if n.endswith("conv1") and n != "conv1"}
    expected = {f"layer{s}.{b}.conv1": n for s, n in ((1, 9), (2, 9), (3, 6)) for b in range(9)}
    del expected["layer1.3.conv1"]
    assert removed == expected  # 60 % of 16, 30 % of 32, 10 % of 64, rounded down; layer1.3 kept whole
    assert all(n.endswith(("conv1", "bn1")) for n in result.plan.removed)
    assert result.plan.info["ratios"] == ratios
    from_json = PrunePlan.from_dict(json.loads(json.dumps(result.plan.to_dict())))
    assert widths(apply_plan(model, from_json)) == widths(result.model)
    # the rest take `ratio`; the residual stream reaches layer3 through zero padding, so it stays whole
    plan = prune(model, x, ratio=0.5, ratios={"layer3.*": 0.0}).plan
    assert not any(n.startswith("layer3.") for n in plan.removed) and len(plan.removed["layer2.0.conv1"]) == 16
    assert "conv1" not in plan.removed
    # a coupled group with several matching producers takes its narrowest one's pattern (16 wide: 0.5 of 16)
    plan = prune(model, x, ratio=0.0, ratios={"layer3.*.conv2": 0.1, "conv1": 0.5}).plan
    assert len(plan.removed["conv1"]) == 8 and len(plan.removed["layer3.0.conv2"]) == 8


def test_per_layer_ratios_refuse_what_they_cannot_do():
    model = _pattern("residual")
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"ratios: \['nope\*'\] match no module"):
        prune(model, x, ratios={"a1": 0.5, "nope*": 0.3})
    for kwargs in ({"scope": "global"}, {"target": "flops"}):
        with pytest.raises(PruningError, match="^ratios: per-layer ratios need scope='local' and target='channels'"):
            prune(model, x, ratios={"a1": 0.5}, **kwargs)
    with pytest.raises(PruningError, match="^ratios: 'a1': 1.0"):
        prune(model, x, ratios={"a1": 1.0})
    with pytest.raises(PruningError, match="^ratio:"):
        prune(model, x, ratio=0.0)


# --- the criteria rank what they should -----------------------------------------------------------

def _two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _removed_from_first(model, strategy, calibration=None):
    plan = prune(model, torch.randn(2, 3, 6, 6), strategy=strategy, ratio=0.25, calibration=calibration).plan
    return plan.removed["0"]


def test_magnitude_criteria_remove_smallest_filters():
    model = _two_layer()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].weight[[2, 5]] *= 1000  # the two large filters: the rest are small
        scale = torch.arange(1, 9, dtype=torch.float).view(8, 1, 1, 1)
        model[0].weight.mul_(scale)
    assert _removed_from_first(model, "l1") == [0, 1]
    assert _removed_from_first(model, "l2") == [0, 1]


def test_bn_scale_removes_smallest_gamma():
    model = _two_layer()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.1, 1, 1, 0.05, 1, 1, 1]))
    assert _removed_from_first(model, "bn_scale") == [1, 4]


def test_activation_criteria_remove_dead_channels():
    model = _two_layer()
    with torch.no_grad():  # channels 3 and 6 are always zero after the ReLU
        model[0].weight[[3, 6]] = 0
        model[0].bias[[3, 6]] = 0
        model[1].bias[[3, 6]] = -5
    data = [(torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    assert _removed_from_first(model, "apoz", data) == [3, 6]
    assert _removed_from_first(model, "taylor", data) == [3, 6]


def test_fpgm_removes_filters_nearest_the_median():
    model = _two_layer()
    with torch.no_grad():
        w = model[0].weight
        w.normal_()
        centre = w.mean(0)
        w[4] = centre  # filters at the geometric median carry the least unique information
        w[7] = centre + 1e-3
    assert _removed_from_first(model, "fpgm") == [4, 7]


def _spearman(a, b):
    ra, rb = (t.argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def test_fpgm_sketch_on_wide_layers_ranks_like_exact_distances():
    from sweep.pruning.criteria import _SKETCH_DIM, _distance_sums, _sketch_dim

    # which layers are sketched: none of the usual convs, VGG's classifier Linears
    assert _sketch_dim(512, 512 * 9) is None and _sketch_dim(2048, 1024) is None and _sketch_dim(1024, 1024 * 9) is None
    assert _sketch_dim(4096, 25088) == _sketch_dim(4096, 4096) == _SKETCH_DIM
    assert _sketch_dim(512, 200_000) is None  # too few rows for a sketch to save much
    # nn.Linear's default init: rows of nearly equal norm, so the distance sums differ little (the hard case; with
    # sketched norms instead of exact ones the Spearman correlation here is 0.08)
    torch.manual_seed(0)
    w = nn.Linear(20_000, 1024).weight.detach()
    w[:8] = w.mean(0) + 1e-4 * torch.randn(8, w.shape[1])  # filters at the median: FPGM's first to go
    assert _sketch_dim(*w.shape) == _SKETCH_DIM
    auto, exact = _distance_sums(w), _distance_sums(w, None)
    assert torch.equal(auto, _distance_sums(w, _SKETCH_DIM))  # the sketch is what "auto" took ...
    assert not torch.equal(auto, exact)  # ... and it is not the exact path
    assert torch.equal(auto, _distance_sums(w.clone()))  # fixed seed: same weights, same scores
    assert set(auto.argsort()[:8].tolist()) == set(range(8)) == set(exact.argsort()[:8].tolist())
    # measured: Spearman 0.996, kept half shared 97 % (sketched norms: 0.08 and 54 %; chance: 0 and 50 %)
    assert _spearman(auto, exact) > 0.99
    keep = len(w) // 2
    shared = set(auto.topk(keep).indices.tolist()) & set(exact.topk(keep).indices.tolist())
    assert len(shared) / keep > 0.95


def test_random_depends_on_seed_only():
    model = _torchvision("resnet18")
    x = torch.randn(1, 3, 32, 32)
    a = prune(model, x, strategy="random", ratio=0.5, seed=1).plan.removed
    assert a == prune(model, x, strategy="random", ratio=0.5, seed=1).plan.removed
    assert a != prune(model, x, strategy="random", ratio=0.5, seed=2).plan.removed


# --- schedules, training, saving ------------------------------------------------------------------

def test_iterative_schedule_calls_back_between_steps_and_composes_plans():
    model = _torchvision("resnet18")
    x = torch.randn(2, 3, 32, 32)
    calls = []

    def fine_tune(m, step):
        calls.append((step, sum(p.numel() for p in m.parameters())))
        with torch.no_grad():  # stands in for training: the weights change between steps
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))

    result = prune(model, x, strategy="l2", ratio=0.6, steps=3, callback=fine_tune)
    assert [s for s, _ in calls] == [1, 2]
    assert calls[0][1] > calls[1][1] > sum(p.numel() for p in result.model.parameters())
    rebuilt = apply_plan(model, result.plan)
    assert widths(rebuilt) == widths(result.model)
    before, after = widths(model), widths(result.model)
    layer1 = [n for n in before if n.endswith("conv1") and n.startswith("layer")]
    assert all(abs(after[n] / before[n] - 0.4) < 0.1 for n in layer1)


def test_iterative_flops_target():
    model = _torchvision("mobilenet_v2")
    x = torch.randn(1, 3, 64, 64)
    pruned = prune(model, x, ratio=0.5, target="flops", steps=2, callback=lambda m, s: None).model
    assert abs(1 - count_flops(pruned, x) / count_flops(model, x) - 0.5) <= 0.025


def test_pruned_model_trains():
    torch.manual_seed(0)
    model = _pattern("residual")
    x = torch.randn(32, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # learnable labels
    pruned = prune(model, x[:2], ratio=0.5).model.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(pruned(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_and_reload_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = _torchvision("mobilenet_v2").eval()
    result = prune(model, torch.randn(1, 3, 64, 64), strategy="l1", ratio=0.5, scope="global")
    path = tmp_path / "pruned.pt"
    save_pruned(path, result.model, result.plan)
    fresh = torchvision.models.get_model("mobilenet_v2", num_classes=10)  # other random weights
    reloaded, plan = load_pruned(path, fresh)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), result.model.eval()(x))
    assert plan.removed == result.plan.removed
    # the plan is plain JSON
    assert PrunePlan.from_dict(json.loads(json.dumps(result.plan.to_dict()))).removed_in == result.plan.removed_in


def test_foreign_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        load_pruned(bad, _pattern("residual"))
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(1)}, buf)
    with pytest.raises(ValueError, match="checkpoint: not a pruned checkpoint"):
        load_pruned(buf.getvalue(), _pattern("residual"))
    result = prune(_pattern("residual"), torch.randn(1, 3, 8, 8), ratio=0.5)
    other = tmp_path / "other.pt"
    save_pruned(other, result.model, result.plan)
    with pytest.raises(ValueError, match="plan|checkpoint"):
        load_pruned(other, _pattern("concat"))


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"strategy": "l3"}, "strategy"), ({"ratio": 0}, "ratio"), ({"ratio": 1.0}, "ratio"),
    ({"ratio": 1.5}, "ratio"), ({"scope": "layer"}, "scope"), ({"target": "params"}, "target"),
    ({"strategy": "taylor"}, "calibration"), ({"min_channels": 0}, "min_channels"),
    ({"round_to": 0}, "round_to"), ({"steps": 0}, "steps"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(PruningError, match=f"^{field}:"):
        prune(_pattern("residual"), torch.randn(1, 3, 8, 8), **kwargs)


class ChannelRoll(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, dims=1))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else -self.a(x)


def test_unknown_channel_mixing_op_is_refused_with_its_name():
    with pytest.raises(PruningError, match=r"cannot prune through op 'roll'.*ignore=\['a'\]") as err:
        prune(ChannelRoll(), torch.randn(1, 3, 4, 4))
    assert "\n" not in str(err.value)
    # ignoring the producer makes the same graph prunable (nothing reaches the op)
    assert prune(ChannelRoll(), torch.randn(1, 3, 4, 4), ignore=["a"]).plan.removed == {}


def test_untraceable_model_is_refused():
    with pytest.raises(PruningError, match="torch.fx"):
        prune(Untraceable(), torch.randn(1, 3, 4, 4))


def test_literal_view_width_is_kept_and_grouped_conv_loses_the_same_positions_per_group():
    class LiteralView(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.c, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6 * 16, 2)

        def forward(self, x):
            return self.fc(self.c(self.b(self.a(x))).view(-1, 6 * 16))

    result = prune(LiteralView(), torch.randn(1, 3, 4, 4), ratio=0.5)
    assert "c" not in result.plan.removed  # c feeds a hard-coded view
    # a feeds b's two groups of 4: 2 of 4 positions go, the same ones from each group, on each side of b
    a, b = result.plan.removed["a"], result.plan.removed["b"]
    assert len(a) == len(b) == 4 and a[2:] == [i + 4 for i in a[:2]] and b[2:] == [i + 4 for i in b[:2]]
    assert result.model.b.groups == 2 and result.model.b.weight.shape == (4, 2, 3, 3)
    assert result.model(torch.randn(1, 3, 4, 4)).shape == (1, 2)


class WidthFromInput(nn.Module):
    """MaxViT's attention: heads of a fixed width, the result reshaped to the *input's* width read at run time
    (`B, P, D = x.shape; ...reshape(B, P, D)`), then projected back into a residual stream."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.qkv, self.merge = nn.Linear(8, 2 * 4 * 3), nn.Linear(8, 8)
        self.branch = nn.Conv2d(8, 6, 1)  # prunable, beside the stream the attention reads
        self.head = nn.Linear(8 + 6, 3)

    def forward(self, x):
        x = self.stem(x)
        tokens = x.flatten(2).transpose(1, 2)  # B, P, D
        B, P, D = tokens.shape
        q, k, v = self.qkv(tokens).reshape(B, P, 3, 2, 4).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v  # B, heads, P, 4
        tokens = tokens + self.merge(attn.transpose(1, 2).reshape(B, P, D))
        pooled = torch.cat((tokens.mean(1), self.branch(x).mean((2, 3))), dim=1)
        return self.head(pooled)


def test_a_width_read_at_run_time_for_another_tensor_keeps_both_whole():
    """Pruning the stream would make `reshape(B, P, D)` ask for fewer channels than the heads give: it crashed
    (maxvit_t). The stream stays whole, the rest still prunes and stays equivalent."""
    torch.manual_seed(0)
    result = assert_equivalent(WidthFromInput(), torch.randn(2, 3, 4, 4), strategy="l1", ratio=0.5)
    assert "stem" not in result.plan.removed and "merge" not in result.plan.removed
    assert result.plan.removed["branch"]
    # ShuffleNet's shuffle reads its own width: it still prunes (test_patterns covers its equivalence)
    assert prune(_pattern("shuffle"), torch.randn(1, 3, 8, 8), ratio=0.5).plan.removed.get("stem")
