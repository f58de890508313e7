"""Data and fixtures for the analysis tests (test_sensitivity.py, test_criteria_rank.py): a digits spec, and a
small real CIFAR-10 subset for the pretrained ResNet-20 where ../shared/data holds it."""

import os
import tarfile
from pathlib import Path

import pytest

# ../shared/data beside the checkout (as the other tests read it); SWEEP_SHARED_DATA points elsewhere (a worktree).
DATA = Path(os.environ.get("SWEEP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
RESNET20 = DATA / "weights" / "resnet20-12fca82f.th"
CIFAR_JPG = DATA / "cifar10" / "cifar10_jpg.tar.gz"

DIGITS_SPEC = """
name: t_layers_digits
dataset: {name: digits, val_fraction: 0.2}
model: {name: small_cnn, weights: null}
base: {epochs: 3, lr: 0.05}
finetune: {batch_size: 64}
prune: {strategy: l1}
resources: {cpu: 1, gpu: 0}
"""


def needs(*paths):
    for path in paths:
        if not path.exists():
            pytest.skip(f"real data absent: {path} (see ../shared/data/README.md; or set SWEEP_SHARED_DATA)")


def cifar_subset(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """The first images of each class of the JPEG CIFAR-10, in ImageFolder layout under root."""
    with tarfile.open(CIFAR_JPG) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3:
                continue
            limit = train_per_class if parts[0] == "train" else test_per_class
            if int(Path(parts[2]).stem) < limit:
                out = root / parts[0] / parts[1] / parts[2]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
    return root


def write_resnet20_spec(tmp: Path) -> Path:
    """ResNet-20 with the published CIFAR-10 weights (base epochs 0: the base is the pretrained network), on 200
    real training images (half held out for validation) and 50 test images."""
    needs(RESNET20, CIFAR_JPG)
    root = cifar_subset(tmp / "cifar10", train_per_class=20, test_per_class=5)
    path = tmp / "resnet20.yaml"
    path.write_text(f"""
name: t_layers_resnet20
model: {{name: resnet20, weights: {RESNET20}}}
dataset: {{name: imagefolder, root: {root}, image_size: 32, val_fraction: 0.5}}
base: {{epochs: 0}}
finetune: {{batch_size: 50}}
prune: {{strategy: l1, calibration_batches: 2}}
resources: {{cpu: 1, gpu: 0}}
""")
    return path


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One base-model cache per module: each spec's base is trained once, as in a sweep."""
    return str(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def digits_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "layers.yaml"
    path.write_text(DIGITS_SPEC)
    return path


@pytest.fixture(scope="module")
def resnet20_spec(tmp_path_factory):
    return write_resnet20_spec(tmp_path_factory.mktemp("cifar"))
