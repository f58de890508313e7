"""A torch/torchvision mismatch is one line naming both versions and the pip command that fixes it, exit code 2,
before anything runs (sweep.zoo.torch_pair; issue 28: it used to end the first sweep with `RuntimeError: operator
torchvision::nms does not exist`)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sweep.zoo.torch_pair import fix_command, matching_torchvision, pair_problem, torch_pair_problem

NMS = "RuntimeError: operator torchvision::nms does not exist"


@pytest.mark.parametrize("torch_version, vision_version", [  # pairs released together (pytorch/vision's table)
    ("2.0.1", "0.15.2"), ("2.4.1", "0.19.1"), ("2.5.1+cpu", "0.20.1+cpu"), ("2.5.1+cu124", "0.20.1+cu124"),
    ("2.7.0+cu128", "0.22.0+cu126"),  # CUDA 12.x both: torchvision itself accepts the same major
    ("2.14.1+cu130", "0.29.1+cu130"),
])
def test_a_matching_pair_is_no_problem(torch_version, vision_version):
    assert pair_problem(torch_version, vision_version) is None
    assert matching_torchvision(torch_version) == vision_version.partition("+")[0]


def test_a_cpu_torch_beside_a_cuda_torchvision():
    line = pair_problem("2.5.1+cpu", "0.20.1+cu124", None, NMS)
    assert "\n" not in line
    assert line.startswith("torch 2.5.1+cpu and torchvision 0.20.1+cu124 do not match (torch is a CPU build, "
                           "torchvision a CUDA 12.4 build; importing torchvision failed: " + NMS + ")")
    assert line.endswith("install the matching pair: pip install --force-reinstall --no-deps torch==2.5.1 "
                         "torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cpu")


def test_versions_not_released_together():
    line = pair_problem("2.5.1+cu124", "0.19.0+cu124", "12.4")
    assert "(torchvision 0.20.1 goes with torch 2.5.1)" in line
    assert line.endswith("torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu124")
    # a PyPI torch (no build tag in its version): the default index; CUDA majors compared through torch.version.cuda
    assert pair_problem("2.5.1", "0.20.1+cu118", "12.4").startswith("torch 2.5.1 and torchvision 0.20.1+cu118 do not "
                                                                  "match (torch is a CUDA 12.4 build, torchvision a "
                                                                  "CUDA 11.8 build)")
    assert fix_command("2.5.1") == "pip install --force-reinstall --no-deps torch==2.5.1 torchvision==0.20.1"


def test_the_installed_pair_matches():
    assert torch_pair_problem() is None


def test_a_torchvision_whose_operators_do_not_load_stops_sweep_prune_with_the_fix(tmp_path):
    """The real failure, provoked: this torchvision without its compiled operators (what a build for another torch
    amounts to), first on the path of the installed `sweep` command."""
    import torchvision

    source = Path(torchvision.__file__).parent
    shutil.copytree(source, tmp_path / "torchvision", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "sweep.cli", "prune", "--model", "small_cnn"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    vision = torchvision.__version__
    assert line.startswith(f"error: torch {torch.__version__} and torchvision {vision} do not match (importing "
                           "torchvision failed: RuntimeError: operator torchvision::nms does not exist"), line
    assert line.endswith(f"torchvision=={vision.partition('+')[0]}" + (
        f" --index-url https://download.pytorch.org/whl/{vision.partition('+')[2]}" if "+" in vision else "")), line
