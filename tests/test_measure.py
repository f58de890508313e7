"""sweep.worker.measure on real torch modules, checked against hand formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sweep.worker.latency import latency_stats
from sweep.worker.measure import count_flops, count_params, latency_ms, size_mb

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


@pytest.mark.parametrize("batch", [1, 4])
def test_conv_flops_match_2_macs_and_scale_with_batch(batch):
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    h_out = w_out = 8  # 16x16 input, stride 2, padding 1
    macs = batch * h_out * w_out * 8 * 3 * 3 * 3
    assert count_flops(conv, torch.randn(batch, 3, 16, 16)) == 2 * macs


@pytest.mark.parametrize("batch", [1, 7])
def test_linear_flops_match_2_macs_and_scale_with_batch(batch):
    assert count_flops(nn.Linear(64, 10), torch.randn(batch, 64)) == batch * 2 * 64 * 10


@pytest.mark.parametrize("training", [True, False])
def test_count_flops_restores_mode_and_leaves_bn_stats_alone(training):
    model = small_cnn().train(training)
    stats = model[1].running_mean.clone()
    flops = count_flops(model, torch.randn(2, 3, 8, 8))
    assert flops >= 2 * (2 * 8 * 8 * 8 * 3 * 9 + 2 * 8 * 5)  # at least its conv and linear
    assert model.training is training
    assert torch.equal(model[1].running_mean, stats)  # counted in eval mode


def test_count_params_is_sum_of_numel():
    model = small_cnn()
    expected = (8 * 3 * 9 + 8) + (8 + 8) + (8 * 5 + 5)
    assert count_params(model) == expected == sum(p.numel() for p in model.parameters())


def test_size_mb_is_about_four_bytes_per_float32_param():
    model = nn.Sequential(nn.Linear(500, 400), nn.Linear(400, 100))
    params = count_params(model)
    assert size_mb(model) == pytest.approx(params * 4 / 1e6, rel=0.02)
    assert size_mb(model.half()) == pytest.approx(params * 2 / 1e6, rel=0.02)


def test_latency_is_a_positive_float_and_mode_is_restored():
    model = small_cnn().train()
    ms = latency_ms(model, torch.randn(2, 3, 8, 8), CPU, warmup=1, runs=3)
    assert isinstance(ms, float) and ms > 0 and math.isfinite(ms)
    assert model.training


def test_latency_rejects_bad_run_counts():
    with pytest.raises(ValueError, match="runs"):
        latency_ms(small_cnn(), torch.randn(1, 3, 8, 8), CPU, runs=0)


def test_latency_stats_pin_threads_and_give_median_and_spread():
    model = small_cnn()
    before = torch.get_num_threads()
    out = latency_stats(model, (3, 8, 8), torch.device("cpu"), threads=1, batch_size=2, warmup=1, runs=5)
    assert set(out) == {"latency_ms", "latency_iqr_ms"} and out["latency_ms"] > 0 and out["latency_iqr_ms"] >= 0
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_latency_on_gpu_channels_last():
    model = small_cnn().cuda().to(memory_format=torch.channels_last)
    out = latency_stats(model, (3, 32, 32), torch.device("cuda"), threads=1, batch_size=8, warmup=2, runs=5)
    assert out["latency_ms"] > 0


def test_latency_refuses_a_model_on_another_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU to put the model elsewhere")
    with pytest.raises(ValueError, match="model.to"):
        latency_ms(small_cnn(), torch.randn(1, 3, 8, 8), "cuda")
