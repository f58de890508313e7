"""worker.shared_data: the driver puts a dataset's official splits in Ray's object store once; a trial gets them back
as read-only views of the node's shared memory and carves its own seed's splits out of them."""

import pytest
import torch

from sweep.worker import shared_data
from sweep.zoo.batching import batches
from sweep.zoo.data import load_dataset, load_official

pytestmark = pytest.mark.e2e


def _equal_splits(a, b) -> None:
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).images, getattr(b, name).images), name
        assert torch.equal(getattr(a, name).labels, getattr(b, name).labels), name
    assert (a.num_classes, a.in_channels, a.image_size) == (b.num_classes, b.in_channels, b.image_size)


def test_published_splits_come_back_zero_copy_and_carve_like_a_fresh_load(local_ray):
    import ray

    dataset = {"name": "digits", "root": None, "download": False, "image_size": 16}
    key = shared_data.data_key(dataset)
    refs = shared_data.publish({key: load_official("digits", image_size=16)})
    assert set(refs) == {key}
    packed = ray.get(refs[key])
    # Ray hands numpy arrays back as views of the object store's shared memory: read-only, nothing copied
    assert not packed["train"][0].flags.writeable and not packed["train"][0].flags.owndata
    assert packed["train"][0] is packed["test"][0]  # digits' splits index one tensor, sent once

    official = shared_data.fetch(refs[key])
    for seed in (0, 1):
        carved = load_dataset("digits", image_size=16, seed=seed, limit=400, official=official)
        _equal_splits(carved, load_dataset("digits", image_size=16, seed=seed, limit=400))
        assert carved.train.base is official.train.base  # carving indexes the shared pages, never copies them
    # training reads the shared pages (read-only) without writing to them
    train = load_dataset("digits", image_size=16, official=official).train
    x, y = next(iter(batches(train, 32, train=True, seed=0)))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32


def test_keys_ignore_what_each_trial_carves_and_factories_are_not_shared():
    a = {"name": "cifar10", "root": "/data", "download": False, "image_size": 32, "val_fraction": 0.1, "limit": 10}
    b = {**a, "val_fraction": 0.2, "limit": None, "test_limit": 50}
    assert shared_data.data_key(a) == shared_data.data_key(b)
    assert shared_data.data_key({**a, "image_size": 64}) != shared_data.data_key(a)
    assert shared_data.data_key({**a, "root": "/other"}) != shared_data.data_key(a)
    assert shared_data.data_key({"factory": "pkg.mod:load", "name": None}) is None


def test_file_splits_are_not_published_and_sharing_can_be_turned_off(local_ray, tmp_path, monkeypatch):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            for k in range(5):
                (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (80 + k, 80), (40 * k, 0, 0)).save(tmp_path / split / c / f"{k}.png")
    photos = load_official("imagefolder", str(tmp_path), image_size=96)
    assert not shared_data.shareable(photos)
    assert shared_data.publish({"photos": photos}) == {}
    monkeypatch.setenv("SWEEP_SHARE_DATA", "0")
    assert shared_data.publish({"digits": load_official("digits")}) == {}
