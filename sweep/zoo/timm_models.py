"""timm's networks as a model factory, `sweep.zoo.timm_models:create`, with kwargs `name` and, for weights, a local
`checkpoint` or `pretrained: true` (timm's cache): docs/own-model.md. timm is optional: `pip install -e ".[timm]"`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sweep.zoo.models import ModelError


def create(num_classes: int, in_channels: int, name: str, checkpoint: str | None = None,
           pretrained: bool = False, **timm_kwargs) -> nn.Module:
    """timm.create_model(name) for the sweep's classes and channels, from a local checkpoint, timm's cache or none."""
    try:
        import timm  # optional: only specs that name this factory need it
    except ImportError:
        raise ModelError("model.factory", "sweep.zoo.timm_models:create needs timm; install it with "
                         "pip install -e \".[timm]\"") from None
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        raise ModelError("model.kwargs.name", f"unknown timm model {name!r}; "
                         f"{'did you mean ' + ', '.join(close) + '? ' if close else ''}see timm.list_models()")
    overlay = None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ModelError("model.kwargs.checkpoint", f"no file at '{checkpoint}'; give the path of {name}'s weights "
                             f"(.pth, .bin or .safetensors)")
        overlay = {"file": str(path)}
    try:
        return timm.create_model(name, pretrained=pretrained or overlay is not None, pretrained_cfg_overlay=overlay,
                                 num_classes=num_classes, in_chans=in_channels, **timm_kwargs)
    except (RuntimeError, OSError) as e:  # a checkpoint of another model, or no cache and no network
        first = " ".join(str(e).split())[:200]
        raise ModelError("model.kwargs", f"timm could not load {name}'s weights ({first}); give a checkpoint of "
                         f"this model, or leave checkpoint and pretrained out for random weights") from None


create.trained_on = ["imagenet"]  # what timm's pretrained weights were trained on (random init: nothing to leak)
