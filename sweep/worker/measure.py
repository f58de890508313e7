"""What a pruned model costs: FLOPs, parameters, size on disk, measured latency."""

from __future__ import annotations

import io
import statistics
import time

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def _param_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (None, torch.get_default_dtype()) if p is None else (p.device, p.dtype)


def count_flops(model: nn.Module, example_input: Tensor) -> int:
    """Total FLOPs of one forward pass on example_input (its batch included), 2 per multiply-add."""
    was_training = model.training
    model.eval()
    device, dtype = _param_device_dtype(model)
    x = example_input.to(device=device or example_input.device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module) -> float:
    """Megabytes (1e6 bytes) of the saved state_dict, as it would land on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def latency_samples(model: nn.Module, example_input: Tensor, device: torch.device | str, warmup: int = 5,
                    runs: int = 30) -> list[float]:
    """Wall-clock milliseconds of `runs` forward passes on `device`, after `warmup` untimed passes."""
    if warmup < 0 or runs < 1:
        raise ValueError(f"latency needs warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")
    device = torch.device(device)
    model_device, dtype = _param_device_dtype(model)
    if model_device is not None and model_device.type != device.type:
        raise ValueError(f"model is on {model_device} but latency was asked on {device}: call model.to(device) first")
    x = example_input.to(device=device, dtype=dtype)
    kernel = next((p for p in model.parameters() if p.ndim == 4), None)
    if x.ndim == 4 and kernel is not None and not kernel.is_contiguous() and \
            kernel.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)  # time the layout the model runs in, not a conversion
    # CUDA launches are asynchronous: without a sync the clock would only measure the launch.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(runs):
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return times


def latency_ms(model: nn.Module, example_input: Tensor, device: torch.device | str, warmup: int = 5,
               runs: int = 30) -> float:
    """Median wall-clock milliseconds of one forward pass on `device`, after `warmup` untimed passes."""
    return statistics.median(latency_samples(model, example_input, device, warmup, runs))
