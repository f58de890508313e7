"""Li et al. 2017's ResNet-56-pruned-A and -B, built from search_spaces/cifar10_resnet56.yaml, remove the paper's
fractions of FLOPs (multiply-adds) and parameters (Table 1), within 0.5 points."""

from pathlib import Path

import pytest
import torch
import yaml

from sweep.analysis.groups import prune_per_layer
from sweep.worker.measure import count_flops, count_params
from sweep.zoo.models import build_model

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "cifar10_resnet56.yaml"
PAPER = {"A": (0.104, 0.094), "B": (0.276, 0.137)}  # FLOPs and parameters removed, Li et al. 2017, Table 1
SKIPPED = {"A": {16, 20, 38, 54}, "B": {16, 18, 20, 34, 38, 54}}  # the paper's layer numbers


def _paper_layer(name: str) -> int:
    """Li et al.'s numbering: conv 1 is the stem, block k (0..26) holds convs 2+2k and 3+2k."""
    stage, block = int(name[5]), int(name.split(".")[1])
    return 2 + 2 * (9 * (stage - 1) + block)


def _recipes():
    space = yaml.safe_load(SPACE.read_text())
    assert space["model"]["name"] == "resnet56" and space["prune"]["ratio"] == 0
    assert space["prune"]["scope"] == "local" and space["prune"]["target"] == "channels"
    grid = space["space"]["prune.ratios"]["grid"]
    return dict(zip("AB", grid, strict=True))


@pytest.mark.parametrize("recipe", ["A", "B"])
def test_li_resnet56_recipes_remove_the_papers_flops_and_params(recipe, one_thread):
    ratios = _recipes()[recipe]
    torch.manual_seed(0)
    model = build_model("resnet56", 10).eval()  # how many filters go does not depend on the weights
    x = torch.zeros(1, 3, 32, 32)
    pruned, plan = prune_per_layer(model, x, ratios, "l1")
    conv1s = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)]
    skipped = {_paper_layer(n) for n in conv1s if n not in plan.removed}
    assert skipped == SKIPPED[recipe]  # only the sensitive layers are kept whole ...
    assert set(plan.removed) <= set(conv1s) | {n.replace("conv1", "bn1") for n in conv1s}  # ... only conv1s pruned
    flops = 1 - count_flops(pruned, x) / count_flops(model, x)  # 2 per multiply-add: the same fraction as MACs
    params = 1 - count_params(pruned) / count_params(model)
    want_flops, want_params = PAPER[recipe]
    assert flops == pytest.approx(want_flops, abs=0.005), f"FLOPs -{100 * flops:.2f} %"
    assert params == pytest.approx(want_params, abs=0.005), f"params -{100 * params:.2f} %"
