"""Your own model and dataset by import path (`model.factory`, `dataset.factory`): the loaders, their errors, and a
real trial of a model and a dataset defined in a file outside the package, imported from the working directory."""

import sys
import textwrap
import uuid

import pytest
import torch
from torch import nn

from sweep.zoo.batching import batches
from sweep.zoo.data import DataError, DataSplits, load_dataset
from sweep.zoo.models import ModelError, build_model

pytestmark = pytest.mark.e2e  # starts Ray and runs real sweeps (`-m 'not e2e'` leaves them out)

PLUGIN = '''
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_channels, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(num_classes, in_channels, width=8):
    return TinyNet(num_classes, in_channels, width)


def not_a_module(num_classes, in_channels):
    return "a string"


class Stripes(Dataset):
    """Horizontal stripes (class 0) or vertical stripes (class 1), with noise: easy, and made on the fly."""

    classes = ["horizontal", "vertical"]

    def __init__(self, n, seed, size=8, channels=3):
        g = torch.Generator().manual_seed(seed)
        self.targets = [i % 2 for i in range(n)]
        base = (torch.arange(size) % 2).float()
        self.images = []
        for y in self.targets:
            img = base.view(size, 1).expand(size, size) if y == 0 else base.view(1, size).expand(size, size)
            self.images.append(img.expand(channels, size, size) + 0.3 * torch.randn(channels, size, size, generator=g))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def load(n=40, size=8, with_val=True):
    out = {"train": Stripes(n, 0, size), "test": Stripes(n // 2, 2, size)}
    if with_val:
        out["val"] = Stripes(n // 2, 1, size)
    return out


def load_tuple(n=40):
    return Stripes(n, 0), Stripes(n // 2, 2)


def load_plain(n=30):
    # no targets attribute: labels come from one pass over the items
    x = torch.randn(n, 1, 6, 6)
    y = torch.arange(n) % 3
    return TensorDataset(x, y), None, TensorDataset(x[:9], y[:9])


def load_root(root):
    return {"train": Stripes(20, 0), "test": Stripes(10, 1), "name": "stripes@" + root}


def load_broken():
    raise RuntimeError("disk on fire")
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module with a unique name in a folder outside the package, made the working directory (not on sys.path)."""
    name = f"myplugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_model_factory_from_the_working_directory(plugin):
    model = build_model(None, 5, in_channels=2, factory=f"{plugin}:build", kwargs={"width": 4})
    assert isinstance(model, nn.Module) and model.conv1.in_channels == 2 and model.fc.out_features == 5
    assert model.conv1.out_channels == 4
    assert model(torch.zeros(3, 2, 8, 8)).shape == (3, 5)


def test_model_factory_loads_a_local_checkpoint(plugin, tmp_path):
    source = build_model(None, 3, factory=f"{plugin}:build")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "mine.pt")
    loaded = build_model(None, 3, weights=str(tmp_path / "mine.pt"), factory=f"{plugin}:build")
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(ModelError, match=r"model.weights: .* wrong shape .*; check model.factory and model.kwargs"):
        build_model(None, 3, weights=str(tmp_path / "mine.pt"), factory=f"{plugin}:build", kwargs={"width": 6})
    with pytest.raises(ModelError, match="model.weights: 'DEFAULT' is not a checkpoint file"):
        build_model(None, 3, weights="DEFAULT", factory=f"{plugin}:build")


@pytest.mark.parametrize("factory, kwargs, expected", [
    ("{p}.build", None, "model.factory: '{p}.build' is not an import path; write 'package.module:function'"),
    ("no_such_module_xyz:build", None, "model.factory: cannot import module 'no_such_module_xyz'"),
    ("{p}:nope", None, "model.factory: module '{p}' has no attribute 'nope'"),
    ("{p}:not_a_module", None, "model.factory: {p}:not_a_module returned str, not a torch.nn.Module"),
    ("{p}:build", {"depth": 3}, "unexpected keyword argument 'depth'"),
    ("{p}:build", {"num_classes": 3}, "model.kwargs: num_classes come from the dataset"),
])
def test_model_factory_errors_name_the_field(plugin, factory, kwargs, expected):
    with pytest.raises(ModelError) as caught:
        build_model(None, 3, factory=factory.replace("{p}", plugin), kwargs=kwargs)
    assert expected.replace("{p}", plugin) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_name_and_factory_exclude_each_other(plugin):
    with pytest.raises(ModelError, match="either name or factory"):
        build_model("small_cnn", 3, factory=f"{plugin}:build")
    with pytest.raises(ModelError, match="model.kwargs: only a model.factory"):
        build_model("small_cnn", 3, kwargs={"width": 2})
    with pytest.raises(ModelError, match="model.factory: 'pkg.module:function'"):  # the hint on an unknown name
        build_model("mynet.MyNet", 3)


def test_dataset_factory_dict_infers_shape_and_classes(plugin):
    splits = load_dataset(None, factory=f"{plugin}:load", kwargs={"n": 40, "size": 6})
    assert isinstance(splits, DataSplits)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, 6)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 20, 20)
    assert splits.name == f"{plugin}:load"
    seen = 0
    for x, y in batches(splits.train, 16, train=True):  # through a DataLoader, shuffled, last partial batch dropped
        assert x.shape == (16, 3, 6, 6) and y.dtype == torch.long
        seen += len(y)
    assert seen == 32
    assert sum(len(y) for _, y in batches(splits.test, 16, train=False)) == 20


def test_dataset_factory_without_val_holds_out_val_fraction_and_limit_works(plugin):
    splits = load_dataset(None, val_fraction=0.25, factory=f"{plugin}:load", kwargs={"with_val": False})
    assert (len(splits.train), len(splits.val)) == (30, 10)
    assert set(splits.val.labels.tolist()) == {0, 1}  # held out per class
    small = load_dataset(None, limit=6, test_limit=5, factory=f"{plugin}:load_tuple")
    assert len(small.train) + len(small.val) <= 6 and len(small.test) <= 5
    assert len(small.val) >= 1


def test_dataset_factory_tuple_of_plain_datasets(plugin):
    splits = load_dataset(None, factory=f"{plugin}:load_plain")  # (train, None, test); labels read from the items
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 1, 6)
    assert len(splits.train) + len(splits.val) == 30 and len(splits.test) == 9


def test_dataset_factory_receives_root(plugin, tmp_path):
    splits = load_dataset(None, root=str(tmp_path), factory=f"{plugin}:load_root")
    assert splits.name == f"stripes@{tmp_path}"


@pytest.mark.parametrize("factory, kwargs, expected", [
    ("{p}:load_broken", None, "dataset.factory: {p}:load_broken raised RuntimeError: disk on fire"),
    ("{p}:build", None, "dataset.factory: {p}:build(**dataset.kwargs) failed"),
    ("{p}:nothing", None, "dataset.factory: module '{p}' has no attribute 'nothing'"),
    ("{p}", None, "dataset.factory: '{p}' is not an import path"),
    ("{p}:load", {"size": 0}, "dataset.factory: train images are 3x0x0; they hold no pixels"),
])
def test_dataset_factory_errors_name_the_field(plugin, factory, kwargs, expected):
    with pytest.raises(DataError) as caught:
        load_dataset(None, factory=factory.replace("{p}", plugin), kwargs=kwargs)
    assert expected.replace("{p}", plugin) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_real_trial_of_a_plugin_model_on_plugin_data(plugin, tmp_path, sqlite_uri, one_thread):
    """The trial pipeline (base, prune, fine-tune, measure, MLflow) on a network and a dataset from a user file."""
    from mlflow.tracking import MlflowClient

    from sweep.config.spec import load_spec
    from sweep.store import tracking
    from sweep.worker.trial import SweepContext, run_trial

    (tmp_path / "space.yaml").write_text(
        "name: plug\ndataset: {name: digits}\nmodel: {name: small_cnn}\nbase: {epochs: 1, batch_size: 16}\n"
        "finetune: {epochs: 1, batch_size: 16}\nmeasure: {batch_size: 1, warmup: 1, runs: 2}\n"
        "prune: {strategy: l1, ratio: 0.5}\n", encoding="utf-8")
    config = load_spec(tmp_path / "space.yaml").trial
    # what the spec will write for `model: {factory: ..., kwargs: ...}` and `dataset: {factory: ...}`
    config["model"].update(name=None, factory=f"{plugin}:build", kwargs={"width": 8})
    config["dataset"].update(name=None, factory=f"{plugin}:load", kwargs={"n": 48, "size": 8})
    context = SweepContext(sqlite_uri, "plug", None, str(tmp_path / "cache"))
    result = run_trial(config, context, report=lambda metrics, checkpoint: None)
    assert 0.4 < result["flops_reduction"] < 0.9
    [run] = tracking.child_runs(MlflowClient(sqlite_uri), "plug")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.factory"] == f"{plugin}:build"
    assert run.data.params["dataset.factory"] == f"{plugin}:load"


def test_ray_workers_import_the_plugin_from_the_drivers_directory(plugin, tmp_path, own_ray):
    """As under `sweep run`: the driver resolves the factory (preflight), then starts Ray; a worker, whose working
    directory Tune changes to the trial's, still imports the module from the driver's directory."""
    import os

    import ray

    from sweep.driver.session import start_ray
    from sweep.zoo.models import ModelError
    from sweep.zoo.plugin import resolve_factory

    resolve_factory(f"{plugin}:build", "model.factory", ModelError)
    assert start_ray(None)
    try:
        @ray.remote
        def build_elsewhere():
            os.chdir("/")  # Tune runs a trial in its own directory
            from sweep.zoo.models import build_model

            return type(build_model(None, 3, factory=f"{plugin}:build")).__name__

        assert ray.get(build_elsewhere.remote(), timeout=120) == "TinyNet"
    finally:
        ray.shutdown()


def test_sweep_run_of_a_plugin_model_and_dataset(plugin, tmp_path, own_ray, capsys, sqlite_uri):
    """`sweep run` as a user runs it: a spec beside their own file, the working directory not on sys.path (as for a
    console script), Ray started by the command itself."""
    from mlflow.tracking import MlflowClient

    from sweep.cli import main
    from sweep.store import tracking

    (tmp_path / "space.yaml").write_text(f"""
name: plugged
model: {{factory: "{plugin}:build", kwargs: {{width: 8}}}}
dataset: {{factory: "{plugin}:load", kwargs: {{n: 48, size: 8}}}}
base: {{epochs: 1, batch_size: 16}}
finetune: {{epochs: 1, batch_size: 16}}
space:
  strategy: {{grid: [l1, random]}}
  ratio: 0.5
""", encoding="utf-8")
    uri = sqlite_uri  # a copy of the session's empty store
    assert main(["run", "space.yaml", "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet"]) == 0
    runs = tracking.child_runs(MlflowClient(uri), "plugged")
    assert sorted(r.data.params["strategy"] for r in runs) == ["l1", "random"]
    assert all(r.info.status == "FINISHED" and r.data.params["model.factory"] == f"{plugin}:build" for r in runs)
