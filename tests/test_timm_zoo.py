"""timm's networks through the model factory sweep.zoo.timm_models:create: built for the sweep's classes and
channels, pretrained weights read from a local file (never a download), and pruned by `sweep prune` exactly as a
registry model. Skips where timm is not installed (`pip install -e ".[test]"` brings it)."""

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[timm]'")

from sweep.cli import main  # noqa: E402
from sweep.zoo.models import ModelError, build_model  # noqa: E402

FACTORY = "sweep.zoo.timm_models:create"


def test_a_timm_network_for_the_sweeps_classes_and_channels():
    model = build_model(None, 10, in_channels=1, factory=FACTORY, kwargs={"name": "resnet10t"}).eval()
    assert type(model).__module__.startswith("timm.")
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_pretrained_weights_from_a_local_checkpoint_keep_the_backbone_and_replace_the_head(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=1000)  # stands in for timm's ImageNet weights
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    model = build_model(None, 7, factory=FACTORY, kwargs={"name": "resnet10t", "checkpoint": str(path)})
    state, saved = model.state_dict(), source.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)
    assert model.fc.out_features == 7


@pytest.mark.parametrize("kwargs, field, hint", [
    ({"name": "resnet10"}, "model.kwargs.name", "did you mean"),
    ({"name": "resnet10t", "checkpoint": "no/such.pth"}, "model.kwargs.checkpoint", "no file"),
])
def test_bad_timm_settings_name_the_field(kwargs, field, hint):
    with pytest.raises(ModelError, match=f"{field}.*{hint}"):
        build_model(None, 10, factory=FACTORY, kwargs=kwargs)


def test_a_checkpoint_of_another_network_is_refused_in_one_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("lcnet_050", num_classes=1000).state_dict(), path)
    with pytest.raises(ModelError, match="timm could not load resnet10t's weights"):
        build_model(None, 10, factory=FACTORY, kwargs={"name": "resnet10t", "checkpoint": str(path)})


def test_sweep_prune_takes_a_timm_network_in_one_line(capsys):
    assert main(["prune", "--factory", FACTORY, "--kwargs", '{"name": "resnet10t"}', "--num-classes", "10",
                 "--input-size", "64", "--strategy", "l1", "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "conv1.0" in out and "layer1.0.conv1" in out
    removed = float(out.split("FLOPs: ")[1].split("(-")[1].split("%")[0])
    assert removed > 30  # half the channels of every prunable layer: most of the FLOPs
