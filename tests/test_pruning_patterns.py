"""The patterns of timm's CNN families, each on a small hand-built torch network: norm layers that apply their own
activation, functional norms, networks torch.fx cannot trace, weight-standardised convs, split attention. Each is
pruned to a model equal to the original with the removed channels zeroed, or refused in one line naming the module."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sweep.pruning import STRATEGIES, PruningError, analyse, prune, zeroed_reference


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's: a BatchNorm2d subclass whose forward calls F.batch_norm itself, then its activation."""

    def __init__(self, n, act=nn.SiLU):
        super().__init__(n)
        self.act = act()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class GroupNormAct(nn.GroupNorm):
    def forward(self, x):
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class ChannelAffine(nn.Module):
    """Not a torch norm layer: its own per-channel statistics and affine, used through F.batch_norm and
    F.instance_norm (the input-statistics form)."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.rand(n) - 0.5)
        self.register_buffer("mean", torch.rand(n) - 0.5)
        self.register_buffer("var", torch.rand(n) + 0.5)

    def forward(self, x):
        y = F.batch_norm(x, self.mean, self.var, self.weight * 2, self.bias.view(-1), False, 0.0, 1e-5)
        return y + F.instance_norm(x, weight=self.weight, bias=self.bias)


class Linear(nn.Linear):
    """timm's: calls F.linear from its own forward."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class NormAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), BatchNormAct2d(16)
        self.a, self.gn = nn.Conv2d(16, 16, 3, padding=1), GroupNormAct(4, 16)
        self.b, self.aff = nn.Conv2d(16, 12, 1), ChannelAffine(12)
        self.c, self.bn_c = nn.Conv2d(12, 16, 1), BatchNormAct2d(16, nn.Hardswish)
        self.fc, self.head = Linear(16, 10), nn.Linear(10, 5)

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = x + self.bn_c(self.c(self.aff(self.b(self.gn(self.a(x))))))
        return self.head(F.relu(self.fc(x.mean((2, 3)))))


class ScaledStdConv2d(nn.Conv2d):
    """timm's weight standardisation: each filter normalised over its own inputs (F.batch_norm on the weight),
    times a gain per filter."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0., eps=1e-6)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class StdConv2d(nn.Conv2d):
    """BiT's: mean and variance over each filter."""

    def forward(self, x):
        w = self.weight
        m, v = w.mean(dim=(1, 2, 3), keepdim=True), w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - m) / torch.sqrt(v + 1e-5), self.bias, self.stride, self.padding)


class SamePadConv2d(nn.Conv2d):
    """A conv that pads first and calls F.conv2d with its own weight (timm's Conv2dSame)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class WeightStandardised(nn.Module):
    """NFNet-like: weight-standardised convs (grouped too) around a plain squeeze-excitation, and a padded conv."""

    def __init__(self):
        super().__init__()
        self.stem = ScaledStdConv2d(3, 16, 3, padding=1)
        self.a = ScaledStdConv2d(16, 16, 3, padding=1, groups=2)
        self.b = StdConv2d(16, 12, 1)
        self.se1, self.se2 = nn.Conv2d(12, 6, 1), nn.Conv2d(6, 12, 1)
        self.pad, self.c = nn.ConstantPad2d(1, 0.0), SamePadConv2d(12, 10, 2)
        self.d = nn.Conv2d(10, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.gelu(self.b(F.gelu(self.a(F.gelu(self.stem(x))))))
        x = x * torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        return self.head(self.d(F.relu(self.c(self.pad(x)))).mean((2, 3)))


class FilterMixingConv(nn.Conv2d):
    """Normalises by the norm of the whole weight: a filter's weight depends on every other filter."""

    def forward(self, x):
        return F.conv2d(x, self.weight / self.weight.norm(), self.bias)


class SplitAttention(nn.Module):
    """ResNeSt's split attention: a grouped conv makes `radix` splits, softmax over the radix picks among them."""

    def __init__(self, channels=8, radix=2):
        super().__init__()
        self.radix = radix
        self.stem, self.bn = nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels * radix, 3, padding=1, groups=radix)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.fc1, self.bn1 = nn.Conv2d(channels, 6, 1), nn.BatchNorm2d(6)
        self.fc2 = nn.Conv2d(6, channels * radix, 1)
        self.out = nn.Conv2d(channels, 10, 1)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.bn0(self.conv(x)))
        B, RC, H, W = x.shape
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(F.relu(self.bn1(self.fc1(gap))))
        attn = attn.view(B, 1, self.radix, -1).transpose(1, 2)
        attn = F.softmax(attn, dim=1).reshape(B, -1).view(B, -1, 1, 1)
        out = (x * attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)
        return self.head(F.relu(self.out(out)).mean((2, 3)))


class SelectiveKernel(nn.Module):
    """SKNet: paths of different kernels stacked, softmax over the paths, summed."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.paths = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 12, k, padding=k // 2), nn.BatchNorm2d(12), nn.ReLU())
                                    for k in (1, 3)])
        self.fc_reduce, self.fc_select = nn.Conv2d(12, 6, 1), nn.Conv2d(6, 24, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.stack([p(x) for p in self.paths], dim=1)
        a = self.fc_select(F.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        B, C, H, W = a.shape
        a = torch.softmax(a.view(B, 2, C // 2, H, W), dim=1)
        return self.head(torch.sum(x * a, dim=1).mean((2, 3)))


class GlobalContext(nn.Module):
    """GCNet's attention pooling: each channel pooled over a softmax map with a matmul."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv_attn = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 1, 1)
        self.fc1, self.fc2 = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        B, C, H, W = x.shape
        attn = F.softmax(self.conv_attn(x).reshape(B, 1, H * W), dim=-1).unsqueeze(3)
        context = (x.reshape(B, C, H * W).unsqueeze(1) @ attn).view(B, C, 1, 1)
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(context))))
        return self.head(x.mean((2, 3)))


class ShapeBranches(nn.Module):
    """torch.fx cannot trace it: branches on a spatial size and on the device (MobileViT, EfficientViT), len() of
    a shape. One forward pass shows the branches taken, which pruning cannot change."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.a(x)))
        H, W = x.shape[-2:]
        if H % 4 != 0 or W % 4 != 0:
            x = F.interpolate(x, size=(8, 8))
        if x.device.type != "meta":
            x = F.relu(self.b(x))
        for _ in range(len(x.shape) - 3):
            x = F.max_pool2d(x, 2)
        return self.head(self.c(x).mean((2, 3)))


class WidthBranch(nn.Module):
    """A branch on a channel count: those channels must stay, or the pruned model would take the other branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 16, 1), nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.a(x))
        y = F.relu(self.b(x))
        if y.shape[1] == 16:
            y = y * 2
        return self.head(self.c(y).mean((2, 3)))


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 8, 1))
        self.gate = Gate()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.gate(self.inner(x)).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.mean() > 0 else -x


PATTERNS = {"norm_act": NormAct, "weight_standardised": WeightStandardised, "split_attention": SplitAttention,
            "selective_kernel": SelectiveKernel, "global_context": GlobalContext, "shape_branches": ShapeBranches,
            "width_branch": WidthBranch}


def _randomise(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.rand(m.bias.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def _build(name):
    torch.manual_seed(0)
    return _randomise(PATTERNS[name]()).double().eval()


def assert_equivalent(model, x, **kw):
    with torch.no_grad():
        out = model(x)
    calibration = [(x, torch.randint(0, out.shape[1], out.shape[:1]))]
    result = prune(model, x, calibration=calibration, **kw)
    assert result.plan.removed, "nothing was pruned"
    with torch.no_grad():
        expected = zeroed_reference(model, result.plan).eval()(x)
        got = result.model.eval()(x)
    assert expected.abs().sum() > 0, "degenerate test: the reference output is all zeros"
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-6, f"relative error {rel}"
    return result


@pytest.mark.parametrize("strategy,ratio,scope", [(s, (0.3, 0.5, 0.7)[i % 3], ("local", "global")[i % 2])
                                                  for i, s in enumerate(STRATEGIES)])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_timm_patterns_prune_equivalent(name, strategy, ratio, scope, one_thread):
    assert_equivalent(_build(name), torch.randn(4, 3, 8, 8, dtype=torch.float64),
                      strategy=strategy, ratio=ratio, scope=scope)


@pytest.mark.parametrize("ratio,scope", list(itertools.product((0.3, 0.5, 0.7), ("local", "global"))))
def test_norm_layers_are_sliced_as_norm_layers_whatever_their_class(ratio, scope):
    """BatchNormAct2d, a GroupNorm subclass and a module with its own statistics, all called functionally (and a
    Linear subclass calling F.linear): every conv and Linear loses channels, and each norm's parameters and
    statistics lose the same ones (whole groups for GN)."""
    model = _build("norm_act")
    result = assert_equivalent(model, torch.randn(4, 3, 8, 8, dtype=torch.float64), ratio=ratio, scope=scope)
    removed = result.plan.removed
    # a's channels go 4 at a time (whole groups): scored globally, the group may rank above every cut at 0.3
    assert {"stem", "b", "c", "fc"} | ({"a"} if scope == "local" else set()) <= set(removed)
    assert removed["bn"] == removed["stem"] == removed["bn_c"] and removed.get("gn") == removed.get("a")
    assert removed["aff.weight"] == removed["aff.mean"] == removed["aff.var"] == removed["b"]
    pruned = result.model
    assert pruned.gn.num_groups * 4 == pruned.gn.num_channels  # whole groups of 4 went, if any
    assert pruned.aff.weight.shape == pruned.aff.mean.shape == (12 - len(removed["b"]),)
    assert isinstance(pruned.bn, BatchNormAct2d) and pruned.bn.num_features == 16 - len(removed["stem"])


def test_weight_standardised_convs_lose_filters_but_keep_their_inputs():
    """Removing an input of a weight-standardised conv would change every filter's mean and variance, so the
    channels that reach one stay; its own filters (and their gains) go. The plain SE and padded convs prune."""
    model = _build("weight_standardised")
    result = assert_equivalent(model, torch.randn(4, 3, 8, 8, dtype=torch.float64), ratio=0.5)
    removed, removed_in = result.plan.removed, result.plan.removed_in
    assert "stem" not in removed and "a" not in removed  # they feed a and b
    assert {"b", "se1", "c", "d"} <= set(removed)
    assert removed["b"] == removed_in["se1"] == removed_in["c"]
    assert not any(name in removed_in for name in ("stem", "a", "b"))
    assert result.model.b.weight.shape[:2] == (12 - len(removed["b"]), 16)
    assert len(result.model.se1.weight) == 3


def test_conv_whose_weight_mixes_filters_is_refused_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), FilterMixingConv(8, 6, 1), nn.Flatten(), nn.Linear(96, 2))
    with pytest.raises(PruningError, match=r"weight computed from '2' that mixes filters") as err:
        prune(model, torch.randn(1, 3, 4, 4))
    assert "\n" not in str(err.value)
    # its inputs can still go when it is kept whole: nothing of its own is removed
    assert prune(model, torch.randn(1, 3, 4, 4), ignore=["0", "2"]).plan.removed == {}


def test_split_attention_removes_the_same_channels_from_every_radix_group():
    result = assert_equivalent(_build("split_attention"), torch.randn(4, 3, 8, 8, dtype=torch.float64), ratio=0.5)
    conv, fc2 = result.plan.removed["conv"], result.plan.removed["fc2"]
    assert len(conv) == 8 and conv[4:] == [i + 8 for i in conv[:4]]  # channel k of split 0 with channel k of split 1
    assert fc2 == conv  # the attention logits of the channels that went
    assert result.model.conv.groups == 2


def test_untraceable_network_is_traced_along_one_forward_pass():
    model = _build("shape_branches")
    with pytest.raises(Exception, match="control flow"):
        torch.fx.symbolic_trace(model)
    result = assert_equivalent(model, torch.randn(2, 3, 12, 12, dtype=torch.float64), ratio=0.5)
    assert {"a", "b", "c"} <= set(result.plan.removed)


def test_a_branch_on_a_channel_count_keeps_those_channels():
    model = _build("width_branch")
    result = assert_equivalent(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), ratio=0.5)
    assert "b" not in result.plan.removed and result.plan.removed["a"]
    graph = analyse(model, (torch.randn(2, 3, 4, 4, dtype=torch.float64),))
    assert "b" not in {m for layer in graph.layer_producers for m in layer}


def test_a_branch_on_tensor_values_is_refused_naming_the_module():
    with pytest.raises(PruningError, match=r"^model: forward\(\) of module 'gate' branches on tensor values") as err:
        prune(ValueBranch(), torch.randn(1, 3, 4, 4))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["norm_act", "shape_branches"])  # traced by torch.fx, and along a forward pass
def test_pruning_leaves_the_model_as_it_was(name):
    """Analysed in eval mode: a norm layer traced through in training mode would bake in training=True and move the
    running statistics, and the copy being pruned starts out sharing the original's tensors."""
    model = _build(name).train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    frozen.eval()
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, torch.randn(4, 3, 12, 12, dtype=torch.float64), ratio=0.5)
    assert result.plan.removed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes and model.training and not frozen.training
    ours = {id(t) for t in result.model.state_dict(keep_vars=True).values()}
    assert not ours & {id(t) for t in model.state_dict(keep_vars=True).values()}  # nothing shared after pruning


def test_a_network_with_nothing_removable_is_refused_in_one_line():
    """BiT's pattern: every channel ends at a weight-standardised conv's input or at the output, so nothing can go;
    that is a refusal naming why (as for any model the pruner cannot handle), not a silent no-op."""
    model = nn.Sequential(StdConv2d(3, 8, 3), nn.ReLU(), StdConv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for call in (lambda: analyse(model, (torch.randn(1, 3, 8, 8),)), lambda: prune(model, torch.randn(1, 3, 8, 8))):
        with pytest.raises(PruningError, match="no channel of Sequential can be removed") as err:
            call()
        assert "\n" not in str(err.value) and "weight-standardised" in str(err.value)
