"""`sweep models` says which models the pruner handles: traced at a default input size, one per family."""

from sweep.cli import main
from sweep.zoo.model_check import family, pruner_support


def test_families():
    assert [family(n) for n in ("resnet18", "resnet152", "resnet56", "efficientnet_v2_s", "regnet_y_8gf", "vit_b_16",
                                "shufflenet_v2_x0_5", "small_cnn")] == [
        "resnet", "resnet", "cifar_resnet", "efficientnet_v2", "regnet_y", "vit", "shufflenet_v2", "small_cnn"]


def test_support_is_checked_per_family():
    rows = {name: (ok, note) for name, ok, note in pruner_support(
        ["small_cnn", "resnet34", "resnet18", "swin_t", "swin_v2_t", "shufflenet_v2_x0_5", "vit_b_16"])}
    assert rows["small_cnn"] == (True, "") and rows["resnet18"] == (True, "")
    assert rows["resnet34"] == (True, "as resnet18")
    ok, note = rows["swin_t"]  # window attention mixes channels the pruner does not follow: refused, and said why
    assert not ok and "cannot prune through op 'shifted_window_attention'" in note
    assert rows["swin_v2_t"][0] is False and "cannot prune" in rows["swin_v2_t"][1]
    assert rows["shufflenet_v2_x0_5"] == (True, "") and rows["vit_b_16"] == (True, "")  # shuffle and MLPs followed


def test_sweep_models_marks_the_refused(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and not line[0].isdigit()}
    assert lines["resnet18"].split()[1] == "yes" and lines["shufflenet_v2_x0_5"].split()[1] == "yes"
    assert lines["swin_t"].split()[1] == "no" and "shifted_window_attention" in lines["swin_t"]
    assert "models can be pruned" in out
