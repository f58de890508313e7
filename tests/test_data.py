"""sweep.zoo.data, images and batching: every loader on local files (real data where shared/data has it, tiny fakes
in the real formats otherwise), the splits, and `batches` (on-device tensor path and DataLoader path). Nothing is
downloaded."""

import gzip
import math
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torchvision.datasets import ImageFolder

from sweep.zoo.batching import batches
from sweep.zoo.data import DATASETS, DataError, DataSplits, dataset_names, load_dataset, load_official
from sweep.zoo.images import FileImages, TensorImages

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST = DATA / "mnist"
CIFAR_JPG = DATA / "cifar10" / "cifar10_jpg.tar.gz"
HYMENOPTERA = DATA / "hymenoptera" / "hymenoptera.tar.gz"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real data absent: {path} (see shared/data/README.md)")


def _pixels(x: torch.Tensor, data) -> torch.Tensor:
    """Undo a split's normalisation: back to [0, 1]."""
    return x * torch.tensor(data.std).view(-1, 1, 1) + torch.tensor(data.mean).view(-1, 1, 1)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as in MNIST: magic 2051 (images) or 2049 (labels), big-endian sizes, unsigned bytes."""
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte, then the number of dimensions
    path.write_bytes(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


def _fake_idx_set(root: Path, folder: str, n_train: int = 100, n_test: int = 20) -> None:
    """A tiny MNIST-format set whose image i carries its id in pixel (0, 1) and its label in pixel (0, 0)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28))
        images[:, 0, 0], images[:, 0, 1] = labels, np.arange(n)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def _ids(data: TensorImages) -> set[int]:
    return set(data.images[:, 0, 0, 1].tolist())


def _cifar_images(n: int, seed: int) -> np.ndarray:
    """n random HWC uint8 images, as a user sees CIFAR images."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row format: 1024 red, 1024 green, 1024 blue values per image."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _jpeg(path: Path, color: tuple, size: tuple = (48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# ------------------------------------------------------------------------------------------------ registry, errors

def test_registry_has_every_dataset_of_the_issue():
    assert dataset_names() == sorted(["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "flowers102",
                                      "oxford_pets", "imagefolder"]) == sorted(DATASETS)


def test_unknown_name_is_a_one_line_error_listing_the_names():
    with pytest.raises(DataError, match=r"^dataset\.name: 'imagenet' is not a dataset; use one of cifar10, ") as e:
        load_dataset("imagenet")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "flowers102", "oxford_pets"])
def test_missing_root_is_a_data_error_and_never_a_download(tmp_path, name):
    # No network here: an attempted download would raise a URL error, not this message.
    where = re.escape(str(tmp_path))
    with pytest.raises(DataError, match=rf"^dataset\.root: {where}/nowhere does not exist; pass dataset\.root "
                                        r"or set SWEEP_DATA, or download: true$"):
        load_dataset(name, root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=rf"^dataset\.root: {where} has no {name} files \(missing {where}/"):
        load_dataset(name, root=str(tmp_path))


def test_root_comes_from_sweep_data_when_not_given(tmp_path, monkeypatch):
    _fake_idx_set(tmp_path, "FashionMNIST")
    monkeypatch.setenv("SWEEP_DATA", str(tmp_path))
    assert len(load_dataset("fashion_mnist").test) == 20
    monkeypatch.setenv("SWEEP_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match="elsewhere does not exist"):
        load_dataset("fashion_mnist")


@pytest.mark.parametrize("kwargs, field", [({"val_fraction": 1.0}, "val_fraction"),
                                           ({"val_fraction": -0.1}, "val_fraction"),
                                           ({"image_size": 0}, "image_size"), ({"limit": 0}, "limit")])
def test_bad_settings_name_their_field(kwargs, field):
    with pytest.raises(DataError, match=rf"^dataset\.{field}: "):
        load_dataset("digits", **kwargs)


def test_a_validation_fraction_that_holds_out_nothing_is_an_error(tmp_path):
    _fake_idx_set(tmp_path, "FashionMNIST", n_train=4)
    with pytest.raises(DataError, match=r"^dataset\.val_fraction: 0\.1 of 4 training examples holds out none"):
        load_dataset("fashion_mnist", root=str(tmp_path))


# ------------------------------------------------------------------------------------------------ digits

def test_digits_splits_are_stratified_disjoint_and_deterministic():
    splits = load_dataset("digits", seed=0)
    assert isinstance(splits, DataSplits)
    assert (splits.name, splits.num_classes, splits.in_channels, splits.image_size) == ("digits", 10, 1, 8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1294, 144, 359)  # of 1,797: 72/8/20
    x, y = splits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    # All 1,797 digits are distinct images, so image bytes identify examples.
    rows = {name: {bytes(im.numpy()) for im in getattr(splits, name).images} for name in ("train", "val", "test")}
    assert sum(map(len, rows.values())) == 1797
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    for split in (splits.train, splits.val, splits.test):
        assert set(split.labels.tolist()) == set(range(10))  # stratified: every class in every split
    again, other = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(again.val.images, splits.val.images)
    assert not torch.equal(other.val.images, splits.val.images)
    assert torch.equal(other.test.images, splits.test.images)  # the final number is on the same images for all seeds
    # Normalised with the digits' own statistics: the training pixels are centred with unit spread.
    pixels = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert abs(pixels.mean()) < 0.05 and abs(pixels.std() - 1) < 0.05


def test_digits_resize_and_limit():
    splits = load_dataset("digits", image_size=32, limit=50, seed=3)
    assert splits.image_size == 32 and splits.train[0][0].shape == (1, 32, 32)
    # limit cuts the official training split (validation is carved from it), never the test split
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 359)
    assert len(load_dataset("digits", limit=50, test_limit=40, seed=3).test) == 40
    assert set(splits.train.labels.tolist()) == set(range(10))
    assert torch.equal(load_dataset("digits", limit=50, seed=3).train.images, splits.train.images)
    assert not torch.equal(load_dataset("digits", limit=50, seed=4).train.images, splits.train.images)


def test_zero_validation_fraction_keeps_all_training_data():
    splits = load_dataset("digits", val_fraction=0.0)
    assert (len(splits.train), len(splits.val)) == (1438, 0)
    assert len(batches(splits.val, 32, train=False)) == 0


# ------------------------------------------------------------------------------------------------ MNIST-format sets

def test_mnist_real_files_load_compressed(tmp_path):
    _needs(MNIST)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNIST.glob("*.gz"):  # the .gz files as torchvision downloads them; no gunzip needed
        (raw / f.name).symlink_to(f)
    splits = load_dataset("mnist", root=str(tmp_path))
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.test.labels[:5].tolist() == [7, 2, 1, 0, 4]  # MNIST's first test digits
    assert splits.test[0][0].shape == (1, 28, 28)
    # The published MNIST mean, so the normalisation constants fit the data read.
    assert splits.train.images.float().mean() / 255 == pytest.approx(0.1307, abs=2e-3)
    assert torch.bincount(splits.val.labels).min() > 500


def test_mnist_uncompressed_subset_with_limit(tmp_path):
    _needs(MNIST)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNIST.glob("t10k-*.gz"):
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
        (raw / f.name.replace("t10k", "train")[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    splits = load_dataset("mnist", root=str(tmp_path), limit=200, test_limit=200, image_size=32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 200)
    assert splits.train[0][0].shape == (1, 32, 32)


def test_fashion_mnist_fake_idx_files(tmp_path):
    _fake_idx_set(tmp_path, "FashionMNIST")
    splits = load_dataset("fashion_mnist", root=str(tmp_path), seed=0)
    assert (splits.name, splits.num_classes, splits.in_channels) == ("fashion_mnist", 10, 1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert _ids(splits.train) | _ids(splits.val) == set(range(100)) and not _ids(splits.train) & _ids(splits.val)
    assert _ids(splits.test) == set(range(20))
    for split in (splits.train, splits.val, splits.test):
        assert torch.equal(split.labels, split.images[:, 0, 0, 0].long())  # labels travel with their images
    assert sorted(splits.val.labels.tolist()) == list(range(10))  # stratified: one of each class
    assert _ids(load_dataset("fashion_mnist", root=str(tmp_path), seed=0).val) == _ids(splits.val)
    assert _ids(load_dataset("fashion_mnist", root=str(tmp_path), seed=1).val) != _ids(splits.val)


def test_corrupt_idx_file_is_a_data_error(tmp_path):
    _fake_idx_set(tmp_path, "FashionMNIST")
    path = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"^dataset\.root: .*t10k-images-idx3-ubyte is not an IDX file"):
        load_dataset("fashion_mnist", root=str(tmp_path))


# ------------------------------------------------------------------------------------------------ CIFAR

def _fake_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    train, test = _cifar_images(20, seed=1), _cifar_images(6, seed=2)
    for i in range(5):
        _dump(base / f"data_batch_{i + 1}", {"batch_label": f"training batch {i + 1} of 5",
                                             "labels": [(4 * i + k) % 10 for k in range(4)],
                                             "data": _cifar_rows(train[4 * i:4 * i + 4]),
                                             "filenames": [f"{k}.png" for k in range(4)]})
    _dump(base / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": list(range(6)),
                                "data": _cifar_rows(test), "filenames": [f"{k}.png" for k in range(6)]})
    _dump(base / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                  "horse", "ship", "truck"], "num_cases_per_batch": 4})
    return train, test


def test_cifar10_fake_pickles(tmp_path):
    train, test = _fake_cifar10(tmp_path)
    splits = load_dataset("cifar10", root=str(tmp_path), val_fraction=0.2)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 6)
    assert splits.test.labels.tolist() == list(range(6))
    # Pixels land where the user sees them: CHW of the HWC image, scaled to [0, 1] before normalising.
    for i in range(6):
        x, y = splits.test[i]
        assert torch.allclose(_pixels(x, splits.test), torch.from_numpy(test[i]).permute(2, 0, 1) / 255, atol=1e-6)
    seen = {bytes(im.numpy()) for part in (splits.train, splits.val) for im in part.images}
    assert seen == {bytes(im.transpose(2, 0, 1).copy()) for im in train}


def test_cifar100_fake_pickles(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name, n in (("train", 30), ("test", 10)):
        _dump(base / name, {"filenames": [f"{k}.png" for k in range(n)], "batch_label": name,
                            "fine_labels": [(7 * k) % 100 for k in range(n)],
                            "coarse_labels": [k % 20 for k in range(n)],
                            "data": _cifar_rows(_cifar_images(n, seed=n))})
    _dump(base / "meta", {"fine_label_names": [f"c{k}" for k in range(100)],
                          "coarse_label_names": [f"s{k}" for k in range(20)]})
    splits = load_dataset("cifar100", root=str(tmp_path), image_size=64, val_fraction=0.1)
    assert (splits.num_classes, splits.image_size) == (100, 64)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (27, 3, 10)
    assert splits.test.labels.tolist() == [(7 * k) % 100 for k in range(10)]  # fine labels, not coarse
    assert splits.test[0][0].shape == (3, 64, 64)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    _fake_cifar10(tmp_path)
    marker = tmp_path / "ran"
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_3", {"data": _Payload(marker), "labels": []})
    with pytest.raises(DataError, match=r"^dataset\.root: .*data_batch_3 is not a cifar10 batch .*is not allowed"):
        load_dataset("cifar10", root=str(tmp_path))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ batches, tensor path

def _shifts(original: torch.Tensor, pad: int, flips: bool) -> torch.Tensor:
    """Every zero-padded shift (and, with flips, every mirrored one) of a C x H x W image."""
    candidates = [original] + ([original.flip(2)] if flips else [])
    out = []
    for image in candidates:
        h, w = image.shape[1:]
        padded = torch.nn.functional.pad(image, (pad,) * 4)
        out += [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return torch.stack(out)


@pytest.mark.parametrize("name, pad, flips", [("cifar10", 4, True), ("digits", 1, False)])
def test_train_augmentation_is_a_padded_shift_plus_flips_only_for_cifar(tmp_path, name, pad, flips):
    if name == "cifar10":
        _fake_cifar10(tmp_path)
    data = load_dataset(name, root=str(tmp_path), val_fraction=0.2).train
    plain = next(iter(batches(data, 16, train=True, seed=5, augment=False)))
    augmented = next(iter(batches(data, 16, train=True, seed=5)))
    assert torch.equal(plain[1], augmented[1])  # same shuffle; only the images are augmented
    assert not torch.equal(plain[0], augmented[0])
    matched_flips = 0
    for before, after in zip(plain[0], augmented[0]):
        before, after = _pixels(before, data), _pixels(after, data)
        distances = (_shifts(before, pad, flips) - after).abs().flatten(1).amax(1)
        assert distances.min() < 1e-5, "an augmented image is not a shift (or flip) of its original"
        matched_flips += int(distances.argmin() >= (2 * pad + 1) ** 2)
    if flips:  # 16 coin flips: all heads or all tails has probability 2**-15; the seed is fixed
        assert 0 < matched_flips < 16


def test_tensor_batches_count_shapes_reshuffle_and_fixed_eval():
    data = load_dataset("digits", image_size=16, limit=110, seed=0).train
    train = batches(data, 32, train=True, seed=1)
    assert len(train) == 3  # 99 // 32: the partial batch is dropped in training
    epochs = [list(train), list(train)]
    for epoch in epochs:
        assert len(epoch) == 3
        for x, y in epoch:
            assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32
            assert y.shape == (32,) and y.dtype == torch.long
    order = [torch.cat([y for _, y in epoch]) for epoch in epochs]
    assert not torch.equal(order[0], order[1])  # reshuffled per epoch
    assert [torch.equal(a[1], b[1]) for a, b in zip(list(batches(data, 32, train=True, seed=1)), epochs[0])] \
        == [True] * 3  # and deterministic given seed

    evaluation = batches(data, 32, train=False)
    assert len(evaluation) == math.ceil(99 / 32) == 4
    first, second = list(evaluation), list(evaluation)
    assert [x.shape[0] for x, _ in first] == [32, 32, 32, 3]
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)  # fixed order, no augmentation
    items = torch.stack([data[i][0] for i in range(len(data))])
    assert torch.allclose(torch.cat([x for x, _ in first]), items, atol=1e-6)  # batches equal indexed items
    assert torch.equal(torch.cat([y for _, y in first]), data.labels)


def test_tensor_batches_cache_the_split_on_the_device():
    data = load_dataset("digits", limit=64).train
    b = batches(data, 16, train=True, device="cpu")
    list(b)
    stored = data.placed(torch.device("cpu"))[0]
    list(b)
    assert data.placed(torch.device("cpu"))[0] is stored  # moved once, not per epoch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_batches_on_cuda():
    data = load_dataset("digits", image_size=32, limit=64).train
    b = batches(data, 16, train=True, device="cuda")
    x, y = next(iter(b))
    assert x.device.type == "cuda" and y.device.type == "cuda" and x.shape == (16, 1, 32, 32)
    assert data.placed(torch.device("cuda"))[0].device.type == "cuda"
    cpu = next(iter(batches(data, 16, train=True, device="cpu", augment=False)))
    gpu = next(iter(batches(data, 16, train=True, device="cuda", augment=False)))
    assert torch.equal(cpu[1], gpu[1].cpu()) and torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ image folders

@pytest.fixture(scope="module")
def hymenoptera(tmp_path_factory) -> Path:
    _needs(HYMENOPTERA)
    out = tmp_path_factory.mktemp("hymenoptera")
    with tarfile.open(HYMENOPTERA) as tar:
        tar.extractall(out, filter="data")
    return out / "hymenoptera_data"


def test_imagefolder_hymenoptera_train_and_val(hymenoptera):
    splits = load_dataset("imagefolder", root=str(hymenoptera), image_size=64, val_fraction=0.1, seed=0)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, 64)
    # Only train/ and val/: val/ is the test split, validation is held out of train/.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (220, 24, 153)
    train_paths, val_paths = {p for p, _ in splits.train.samples}, {p for p, _ in splits.val.samples}
    assert not train_paths & val_paths and all("/train/" in p for p in val_paths)
    assert all("/val/" in p for p, _ in splits.test.samples)
    assert set(splits.val.labels.tolist()) == {0, 1}
    x, y = splits.test[0]
    assert x.shape == (3, 64, 64) and y in (0, 1)
    again = load_dataset("imagefolder", root=str(hymenoptera), image_size=64, seed=0)
    assert again.val.samples == splits.val.samples


def test_loader_batches_augment_train_only(hymenoptera):
    data = load_dataset("imagefolder", root=str(hymenoptera), image_size=64, seed=0).val  # 24 real photos
    assert isinstance(data, FileImages)
    evaluation = batches(data, 8, train=False)
    assert len(evaluation) == 3
    first, second = list(evaluation), list(evaluation)
    for (x1, y1), (x2, y2) in zip(first, second):
        assert x1.shape == (8, 3, 64, 64) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(torch.cat([y for _, y in first]), data.labels)

    def per_image(epoch) -> list[float]:  # an order-free fingerprint of the images seen in an epoch
        return sorted(torch.cat([x for x, _ in epoch]).sum((1, 2, 3)).tolist())

    augmented = list(batches(data, 8, train=True, seed=0))
    assert per_image(augmented) != pytest.approx(per_image(first), abs=1e-3)
    plain = batches(data, 8, train=True, seed=0, augment=False)
    one, two = list(plain), list(plain)
    assert per_image(one) == pytest.approx(per_image(first), abs=1e-3)  # the same images, without augmentation,
    sums = [torch.cat([x for x, _ in epoch]).sum((1, 2, 3)) for epoch in (one, two)]
    assert not torch.allclose(sums[0], sums[1])  # in a new order each epoch


def _extract_some(archive: Path, out: Path, classes: tuple, per_split: dict) -> None:
    """Extract the first few images of some classes from a big tarball, streaming it once."""
    wanted = {(split, c): n for split, n in per_split.items() for c in classes}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and wanted.get((parts[0], parts[1]), 0) > 0:
                wanted[parts[0], parts[1]] -= 1
                tar.extract(member, out, filter="data")


def test_imagefolder_cifar_jpegs_are_decoded_once_into_uint8(tmp_path):
    _needs(CIFAR_JPG)
    _extract_some(CIFAR_JPG, tmp_path, ("airplane", "cat", "truck"), {"train": 10, "test": 3})
    splits = load_dataset("imagefolder", root=str(tmp_path), image_size=32, val_fraction=0.1, seed=0)
    assert (splits.num_classes, splits.image_size) == (3, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (27, 3, 9)
    assert sorted(splits.val.labels.tolist()) == [0, 1, 2]
    # 32-pixel photos become one uint8 tensor, decoded once; its rows are ImageFolder's files in order.
    assert isinstance(splits.test, TensorImages) and splits.test.images.dtype == torch.uint8
    assert (splits.train.pad, splits.train.flip) == (4, True)  # augmented as the file transforms did
    files = ImageFolder(str(tmp_path / "test")).samples
    for i in (0, 8):
        path, label = files[i]
        x, y = splits.test[i]
        decoded = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255
        assert y == label and torch.allclose(x * IMAGENET_STD + IMAGENET_MEAN, decoded, atol=1e-6)
    x, y = next(iter(batches(splits.train, 9, train=True, seed=0)))
    assert x.shape == (9, 3, 32, 32) and y.shape == (9,)


def test_small_photos_of_mixed_sizes_stay_files(tmp_path):
    for split in ("train", "test"):
        for c, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            for k in range(4):
                _jpeg(tmp_path / split / c / f"{k}.jpg", color, size=(16, 16) if k else (12, 12))
    splits = load_dataset("imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.25)
    assert isinstance(splits.train, FileImages) and splits.train[0][0].shape == (3, 16, 16)
    for k in range(4):  # one size now: decoded
        _jpeg(tmp_path / "train" / "a" / f"{k}.jpg", (255, 0, 0), size=(16, 16))
        _jpeg(tmp_path / "test" / "a" / f"{k}.jpg", (255, 0, 0), size=(16, 16))
        _jpeg(tmp_path / "train" / "b" / f"{k}.jpg", (0, 0, 255), size=(16, 16))
        _jpeg(tmp_path / "test" / "b" / f"{k}.jpg", (0, 0, 255), size=(16, 16))
    assert isinstance(load_dataset("imagefolder", root=str(tmp_path), image_size=16).train, TensorImages)
    # photos above 64 pixels keep the photo transforms (RandomResizedCrop): not decoded
    assert isinstance(load_dataset("imagefolder", root=str(tmp_path), image_size=96).train, FileImages)


def test_subsets_index_the_official_images_without_copying():
    official = load_official("digits")
    assert official.val is None
    splits = load_dataset("digits", val_fraction=0.2, limit=300, seed=3, official=official)
    for split in (splits.train, splits.val, splits.test):
        assert split.base is official.train.base  # digits: one tensor; every split is an index into it
    fresh = load_dataset("digits", val_fraction=0.2, limit=300, seed=3)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(splits, name).images, getattr(fresh, name).images)
        assert torch.equal(getattr(splits, name).labels, getattr(fresh, name).labels)
    assert torch.equal(splits.train.images, official.train.base[splits.train.index])
    # batches gather through the index: the same images as the materialised view, in order
    x, y = next(iter(batches(splits.train, len(splits.train), train=False)))
    assert torch.equal(y, splits.train.labels)
    assert torch.allclose(x, splits.train.prepare(splits.train.images), atol=1e-6)


def test_imagefolder_uses_val_folder_when_test_folder_exists(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            for k in range(n):
                _jpeg(tmp_path / split / c / f"{k}.jpg", color)
    splits = load_dataset("imagefolder", root=str(tmp_path), image_size=96)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 6)
    assert splits.train[0][0].shape == (3, 96, 96)


def test_imagefolder_errors_name_the_root(tmp_path):
    with pytest.raises(DataError, match=r"^dataset\.root: .* does not exist; point dataset\.root at a folder with "
                                        r"train/<class>/"):
        load_dataset("imagefolder", root=str(tmp_path / "missing"))
    _jpeg(tmp_path / "train" / "a" / "0.jpg", (1, 2, 3))
    with pytest.raises(DataError, match=r"has no imagefolder files \(missing .*/test\)"):
        load_dataset("imagefolder", root=str(tmp_path))
    _jpeg(tmp_path / "test" / "b" / "0.jpg", (1, 2, 3))
    with pytest.raises(DataError, match=r"test has classes \['b'\] but train/ has \['a'\]"):
        load_dataset("imagefolder", root=str(tmp_path))


# ------------------------------------------------------------------------------------------------ Flowers102, Pets

def test_flowers102_fake_in_torchvision_layout(tmp_path):
    base = tmp_path / "flowers-102"
    for i in range(1, 9):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", (30 * i, 0, 0))
    savemat(base / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 2, 3, 3, 102, 102]])})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 3, 5, 7]]), "valid": np.array([[2, 4]]),
                                 "tstid": np.array([[6, 8]])})
    splits = load_dataset("flowers102", root=str(tmp_path), image_size=64)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (102, 3, 64)
    assert splits.train.labels.tolist() == [0, 1, 2, 101] and splits.val.labels.tolist() == [0, 1]
    assert splits.test.labels.tolist() == [2, 101]
    assert splits.test.samples[1][0].endswith("image_00008.jpg")
    x, _ = splits.test[1]
    assert (x * IMAGENET_STD + IMAGENET_MEAN)[0].mean() == pytest.approx(240 / 255, abs=0.02)  # image 8's red


def test_oxford_pets_fake_in_torchvision_layout(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    rows = {"trainval": [("Abyssinian_1", 1, 1, 1), ("Abyssinian_2", 1, 1, 1), ("beagle_1", 13, 2, 2),
                         ("beagle_2", 13, 2, 2), ("yorkshire_terrier_1", 37, 2, 25),
                         ("yorkshire_terrier_2", 37, 2, 25)],
            "test": [("Abyssinian_3", 1, 1, 1), ("beagle_3", 13, 2, 2)]}
    for split, entries in rows.items():
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in entries))
        for r in entries:
            _jpeg(base / "images" / f"{r[0]}.jpg", (0, 200, 0))
    splits = load_dataset("oxford_pets", root=str(tmp_path), image_size=64, val_fraction=0.5, seed=0)
    assert (splits.num_classes, splits.image_size) == (37, 64)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 3, 2)
    assert sorted(splits.val.labels.tolist()) == [0, 12, 36]  # 1-based file labels, one per class held out
    assert splits.test.labels.tolist() == [0, 12]
    assert splits.test[1][0].shape == (3, 64, 64)


def test_an_epoch_depends_on_seed_and_epoch_alone():
    """A resumed trial must see the same data order as an uninterrupted one: set_epoch, not a hidden counter."""
    data = load_dataset("digits", limit=200, seed=0).train
    used, fresh = batches(data, 32, train=True, seed=7), batches(data, 32, train=True, seed=7)
    list(used), list(used)  # two epochs already consumed
    used.set_epoch(5)
    fresh.set_epoch(5)
    for (x1, y1), (x2, y2) in zip(used, fresh):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_stats_replace_the_dataset_normalisation():
    own = load_dataset("digits", limit=100, seed=0)
    other = load_dataset("digits", limit=100, seed=0, stats=((0.5,), (0.25,)))
    raw = own.test.images[:4].float() / 255
    assert torch.allclose(other.test.prepare(own.test.images[:4]), (raw - 0.5) / 0.25)
    assert not torch.allclose(own.test.prepare(own.test.images[:4]), (raw - 0.5) / 0.25)
