"""What a verdict is computed from (issue 23, items 3-6): validation no base has seen, the unpruned control arm, the
scratch arm once per ratio, one current run per config (a forced rerun supersedes), registration within one group
with one validation split, and plug-ins named by their factory path. Real trials, real MLflow (sqlite), real Ray."""

import shutil
import sys
import textwrap
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from sweep.cli import main
from sweep.config.schema import TrialConfig
from sweep.config.spec import load_spec, parse_spec
from sweep.driver.launch import _progress_reporter, run_one
from sweep.report import summary
from sweep.store import registry, tracking
from sweep.store.view import SUPERSEDED_TAG, TRIAL_FILTER
from sweep.worker.trial import load_splits
from sweep.zoo.data import load_dataset, load_official
from sweep.zoo.models import ModelError, build_model, weights_trained_on

PLUGIN = '''
import torch
from torch import nn
from torch.utils.data import Dataset


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


def build_seen(num_classes, in_channels, width=8):
    return TinyNet(num_classes, in_channels, width)


build_seen.trained_on = ["imagenet", "MODULE:load"]  # what the weights it builds with were trained on


class Stripes(Dataset):
    """Horizontal stripes (class 0) or vertical stripes (class 1), with noise."""

    classes = ["horizontal", "vertical"]

    def __init__(self, n, seed, size=8):
        g = torch.Generator().manual_seed(seed)
        self.targets = [i % 2 for i in range(n)]
        base = (torch.arange(size) % 2).float()
        self.images = []
        for y in self.targets:
            img = base.view(size, 1).expand(size, size) if y == 0 else base.view(1, size).expand(size, size)
            self.images.append(img.expand(3, size, size) + 0.8 * torch.randn(3, size, size, generator=g))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def load(n=48, size=8):
    return {"train": Stripes(n, 0, size), "test": Stripes(n // 2, 2, size)}
'''

DIGITS = """
name: {name}
seed: {seed}
dataset: {{name: digits, limit: 150, val_fraction: {val_fraction}}}
model: {{name: small_cnn, weights: {weights}}}
base: {{epochs: {base_epochs}, batch_size: 32}}
finetune: {{epochs: 1, batch_size: 32}}
measure: {{batch_size: 1, warmup: 1, runs: 2}}
prune: {{strategy: {strategy}, ratio: {ratio}, arm: {arm}}}
"""


def _digits(tmp_path: Path, file: str, **settings) -> Path:
    values = {"name": "inputs", "seed": 0, "val_fraction": 0.1, "weights": "null", "base_epochs": 1,
              "strategy": "l1", "ratio": 0.5, "arm": "finetune", **settings}
    path = tmp_path / file
    path.write_text(DIGITS.format(**values), encoding="utf-8")
    return path


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module with a unique name in a folder outside the package, made the working directory (not on sys.path)."""
    name = f"verdict_plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN).replace("MODULE", name), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


# --- validation no base has seen -------------------------------------------------------------------------------

def _rows(split) -> set[int]:
    return set(split.index.tolist())  # a TensorImages subset: its rows of the one images tensor


def test_a_base_trained_on_the_sweeps_data_is_validated_on_test_images_it_never_saw():
    official = load_official("digits")
    held = load_dataset("digits", seed=0, val_fraction=0.1)
    assert held.val_source == "train" and _rows(held.val) <= _rows(official.train)

    carved = [load_dataset("digits", seed=seed, val_fraction=0.1, val_from_test=True) for seed in (0, 1)]
    for splits in carved:
        assert splits.val_source == "test"
        assert _rows(splits.train) == _rows(official.train)  # the base saw all of train: nothing held out of it
        assert _rows(splits.val) | _rows(splits.test) == _rows(official.test)
        assert not _rows(splits.val) & _rows(splits.test)  # test_accuracy is measured on other images
        assert len(splits.val) == round(0.1 * len(official.test))  # test shrinks by the validation size
    # every seed validates and tests on the same images: one validation split, comparable test numbers
    assert _rows(carved[0].val) == _rows(carved[1].val) and _rows(carved[0].test) == _rows(carved[1].test)
    limited = load_dataset("digits", seed=0, limit=100, val_fraction=0.1, val_from_test=True)
    assert len(limited.train) == 100 and _rows(limited.val) == _rows(carved[0].val)  # limit cuts train only


def test_weights_say_what_they_were_trained_on(plugin, tmp_path):
    net = build_model("small_cnn", 10, in_channels=1)
    torch.save({"state_dict": net.state_dict(), "trained_on": "digits"}, tmp_path / "declared.pt")
    torch.save({"state_dict": net.state_dict()}, tmp_path / "silent.pt")
    (tmp_path / "resnet20-12fca82f.th").write_bytes(b"")  # the public CIFAR-10 checkpoint, known by its name
    assert weights_trained_on("small_cnn", str(tmp_path / "declared.pt")) == ("digits",)
    assert weights_trained_on("small_cnn", str(tmp_path / "silent.pt")) == ()
    assert weights_trained_on("resnet20", str(tmp_path / "resnet20-12fca82f.th")) == ("cifar10",)
    assert weights_trained_on("small_cnn", None) == ()
    assert weights_trained_on(None, None, f"{plugin}:build_seen") == ("imagenet", f"{plugin}:load")
    assert weights_trained_on(None, None, f"{plugin}:build") == ()
    torch.save({"state_dict": net.state_dict(), "trained_on": 10}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match=r"model.weights .*bad.pt: trained_on is 10; give a dataset name"):
        weights_trained_on("small_cnn", str(tmp_path / "bad.pt"))


def test_dataset_val_source_overrides_what_the_weights_say(tmp_path):
    net = build_model("small_cnn", 10, in_channels=1)
    torch.save({"state_dict": net.state_dict(), "trained_on": "digits"}, tmp_path / "seen.pt")
    torch.save({"state_dict": net.state_dict()}, tmp_path / "silent.pt")

    def source(weights: str, val_source: str) -> str:
        config = {"model": {"name": "small_cnn", "weights": str(tmp_path / weights)},
                  "dataset": {"name": "digits", "val_source": val_source}}
        return load_splits(TrialConfig.model_validate(config)).val_source

    assert (source("seen.pt", "auto"), source("silent.pt", "auto")) == ("test", "train")
    assert (source("silent.pt", "test"), source("seen.pt", "train")) == ("test", "train")  # the spec decides


def test_a_trial_of_a_base_trained_on_its_own_data_validates_on_test(tmp_path, sqlite_uri, one_thread):
    net = build_model("small_cnn", 10, in_channels=1)
    torch.save({"state_dict": net.state_dict(), "trained_on": "digits"}, tmp_path / "seen.pt")
    space = _digits(tmp_path, "seen.yaml", weights=str(tmp_path / "seen.pt"), base_epochs=0)
    run_one(load_spec(space), tracking_uri=sqlite_uri, storage=str(tmp_path / "results"))
    (run,) = tracking.child_runs(MlflowClient(sqlite_uri), "inputs")
    tags = run.data.tags
    assert tags["data.val_source"] == "test" and tags["data.val_size"] == str(round(0.1 * 359))
    assert "val_accuracy" in run.data.metrics and "base_val_accuracy" in run.data.metrics


def test_the_report_warns_when_a_base_scores_higher_on_validation_than_on_test():
    runs = pd.DataFrame({"run_id": list("abcd"), "model": ["resnet20"] * 2 + ["small_cnn"] * 2,
                         "strategy": ["l1"] * 4, "seed": [0, 1, 0, 1],
                         "base_val_accuracy": [0.90, 0.88, 0.80, 0.81], "base_test_accuracy": [0.81, 0.80, 0.80, 0.80]})
    (warning, blank) = summary.leak_warnings(runs)
    assert "model resnet20" in warning and "89.0 % on validation but 80.5 % on test (8.5 points more)" in warning
    assert "small_cnn" not in warning and blank == ""
    assert summary.leak_warnings(runs[runs["model"] == "small_cnn"]) == []


# --- the control arm, and the scratch arm once per ratio -------------------------------------------------------

ARMS = """
name: arms
model: {{name: small_cnn}}
dataset: {{name: digits}}
prune: {{scope: {scope}}}
space:
  arm: {{grid: [finetune, scratch, control]}}
  strategy: {{grid: [l1, random, fpgm]}}
  ratio: {{grid: [0.3, 0.5]}}
  seed: {{grid: [0, 1]}}
"""


@pytest.mark.parametrize("scope, scratch", [("local", 2 * 2), ("global", 3 * 2 * 2)])
def test_a_control_trial_runs_once_per_seed_and_scratch_once_per_ratio_under_local_scope(scope, scratch):
    spec = parse_spec(ARMS.format(scope=scope))
    configs = spec.grid_configs()
    assert spec.num_trials() == len(configs)  # what `sweep validate` says it will run
    by_arm = {arm: [c for c in configs if c["prune"]["arm"] == arm] for arm in ("finetune", "scratch", "control")}
    assert len(by_arm["finetune"]) == 3 * 2 * 2  # strategies x ratios x seeds
    assert len(by_arm["control"]) == 2  # one per seed: nothing pruned, so strategy and ratio change nothing
    assert {(c["prune"]["strategy"], c["prune"]["ratio"]) for c in by_arm["control"]} == {("none", 0.0)}
    assert len(by_arm["scratch"]) == scratch
    if scope == "local":  # every criterion gives one architecture: recorded without one
        assert {c["prune"]["strategy"] for c in by_arm["scratch"]} == {"none"}
    assert len({tracking.config_hash(c) for c in configs}) == len(configs)


def test_strategy_none_is_only_what_the_control_records():
    with pytest.raises(Exception, match="prune.strategy: none prunes nothing .*use arm: control"):
        parse_spec("name: x\nmodel: {name: small_cnn}\ndataset: {name: digits}\nprune: {strategy: none}\n")


def test_the_control_arm_fine_tunes_the_unpruned_base_and_pairs_by_seed(tmp_path, sqlite_uri, one_thread):
    storage = str(tmp_path / "results")
    control = run_one(load_spec(_digits(tmp_path, "c.yaml", name="control", arm="control", strategy="fpgm")),
                      tracking_uri=sqlite_uri, storage=storage)
    assert control["flops_reduction"] == 0 and control["channels_removed"] == 0 and control["train_time_s"] > 0
    assert control["pruned_val_accuracy"] == control["base_val_accuracy"]  # nothing removed before fine-tuning
    run_one(load_spec(_digits(tmp_path, "p.yaml", name="control")), tracking_uri=sqlite_uri, storage=storage)
    runs = summary.load_runs("control", sqlite_uri)
    row = runs.set_index("arm").loc["control"]
    assert (row["strategy"], row["ratio"]) == ("none", 0)
    paired = summary.control_table(runs)
    assert len(paired) == 1 and paired["pairs"].iloc[0] == 1
    pruned = runs.set_index("arm").loc["finetune", "test_accuracy"]
    assert paired["difference"].iloc[0] == pytest.approx(pruned - row["test_accuracy"])


# --- one current run per config, and what --register ranks -----------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory, template_db):
    """Two configs of one sweep, the first run twice (`--force`), and a stray run with another validation split."""
    root = tmp_path_factory.mktemp("supersede")
    shutil.copy(template_db, root / "mlflow.db")
    uri, storage = f"sqlite:///{root / 'mlflow.db'}", str(root / "results")
    torch.set_num_threads(1)
    for ratio in (0.3, 0.7):
        run_one(load_spec(_digits(root, f"r{ratio}.yaml", ratio=ratio)), tracking_uri=uri, storage=storage)
    first = {r.data.params["ratio"]: r.info.run_id for r in tracking.child_runs(MlflowClient(uri), "inputs")}
    run_one(load_spec(root / "r0.3.yaml"), tracking_uri=uri, storage=storage, force=True)
    run_one(load_spec(_digits(root, "stray.yaml", val_fraction=0.2)), tracking_uri=uri, storage=storage)
    return root, uri, first


def test_a_forced_rerun_supersedes_the_earlier_run_which_stays_in_the_store(store):
    root, uri, first = store
    client = MlflowClient(uri)
    runs = tracking.child_runs(client, "inputs")
    assert len(runs) == 4  # nothing deleted
    old = client.get_run(first["0.3"])
    new = next(r for r in runs if r.data.params["ratio"] == "0.3" and r.info.run_id != first["0.3"]
               and r.data.params["dataset.val_fraction"] == "0.1")
    assert old.info.status == "FINISHED" and old.data.tags[SUPERSEDED_TAG] == new.info.run_id
    assert SUPERSEDED_TAG not in new.data.tags and SUPERSEDED_TAG not in client.get_run(first["0.7"]).data.tags

    reported = summary.load_runs("inputs", uri)
    assert first["0.3"] not in set(reported["run_id"]) and len(reported) == 3
    experiment_id = tracking.find_experiment_id(client, "inputs")
    shown = {r.info.run_id for r in client.search_runs([experiment_id], TRIAL_FILTER)}  # the saved UI view
    assert shown == set(reported["run_id"])


def test_register_never_ranks_runs_of_different_validation_splits(store, capsys):
    root, uri, first = store
    base = ["report", "inputs", "--tracking-uri", uri, "--out", str(root / "reports"), "--register", "m"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --register: these 3 runs measured val_accuracy on 2 different validation splits")
    assert len(err.splitlines()) == 1

    runs = registry.candidates("inputs", tracking_uri=uri, where=registry.parse_where("dataset.val_fraction=0.1"))
    assert {r.data.params["ratio"] for r in runs} == {"0.3", "0.7"}
    assert first["0.3"] not in {r.info.run_id for r in runs}  # the superseded run is not a candidate
    picked = registry.best_run("inputs", tracking_uri=uri, where={"ratio": "0.70"})
    assert picked.info.run_id == first["0.7"]  # numbers match as numbers

    assert main([*base, "--where", "dataset.val_fraction=0.1,ratio=0.7", "--by", "flops_reduction"]) == 0
    assert f"run {first['0.7']}" in capsys.readouterr().out
    for extra, message in ((["--launch", "nope"], "--launch: no FINISHED trial of 'inputs' belongs to launch nope"),
                           (["--where", "colour=red"], "--where: no trial of 'inputs' has param 'colour'"),
                           (["--where", "ratio"], "--where: 'ratio' is not param=value")):
        assert main([*base, *extra]) == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")
    assert main(base[:6] + ["--where", "ratio=0.3"]) == 2
    assert "--where: chooses what --register ranks" in capsys.readouterr().err


def test_the_plots_draw_one_base_line_per_base():
    runs = pd.DataFrame({"model": ["a"] * 4, "dataset": ["d"] * 4, "strategy": ["l1"] * 4, "seed": [0, 1, 0, 1],
                         "base.epochs": [1, 1, 5, 5], "base_test_accuracy": [0.5, 0.6, 0.8, 0.9]})
    ax = Figure().subplots()
    summary._base_line(ax, runs, {"model": "a", "dataset": "d"})
    assert sorted(line.get_ydata()[0] for line in ax.lines) == pytest.approx([55.0, 85.0])
    assert sorted(line.get_label() for line in ax.lines) == ["unpruned base base.epochs=1 (55.0%)",
                                                           "unpruned base base.epochs=5 (85.0%)"]


# --- plug-ins named by their factory path, end to end ----------------------------------------------------------

def test_a_plugin_is_named_by_its_factory_path_in_the_params():
    config = TrialConfig.model_validate({"model": {"factory": "pkg.nets:build"},
                                         "dataset": {"factory": "pkg.data:load"}}).model_dump()
    params = tracking.flat_params(config)
    assert params["model"] == "pkg.nets:build" and params["dataset"] == "pkg.data:load"
    assert params["model.factory"] == "pkg.nets:build"


def test_the_progress_line_names_a_plugin_by_its_factory_path(plugin):
    spec = parse_spec(f"name: p\nmodel: {{factory: '{plugin}:build'}}\ndataset: {{factory: '{plugin}:load'}}\n"
                      "space: {strategy: {grid: [l1, fpgm]}}\n")
    describe = _progress_reporter(spec, 1, "sqlite:///unused.db").describe
    assert describe({"trial": spec.grid_configs()[0]}) == f"model {plugin}:build, strategy l1, ratio 0.5"
    table = _progress_reporter(spec, 2, "sqlite:///unused.db")  # --verbose: Tune's table, a column per setting
    assert table._parameter_columns["trial/model/factory"] == "model"


@pytest.mark.e2e
@pytest.mark.slow  # 18 Ray trials: 40 s idle, 140 s on a loaded 2-core machine; each part is also tested above
def test_a_plugin_sweep_names_its_model_and_a_forced_trial_keeps_its_group_at_three_seeds(plugin, tmp_path, own_ray,
                                                                                           capsys, sqlite_uri):
    """Done when (issue 23): own model and dataset plug-ins, three strategies, two ratios, three seeds; the report
    names the model by its factory path, and `sweep trial --force` of one config leaves its group at n = 3."""
    (tmp_path / "space.yaml").write_text(f"""
name: verdicts
model: {{factory: "{plugin}:build", kwargs: {{width: 4}}}}
dataset: {{factory: "{plugin}:load", kwargs: {{n: 32}}}}
base: {{epochs: 1, batch_size: 16}}
finetune: {{epochs: 1, batch_size: 16}}
measure: {{batch_size: 1, warmup: 1, runs: 2}}
resources: {{cpu: 1}}
space:
  strategy: {{grid: [l1, random, fpgm]}}
  ratio: {{grid: [0.25, 0.5]}}
  seed: {{grid: [0, 1, 2]}}
""", encoding="utf-8")
    common = ["--tracking-uri", sqlite_uri, "--storage", str(tmp_path / "results")]
    assert main(["run", "space.yaml", *common]) == 0
    assert f"model {plugin}:build" in capsys.readouterr().out  # the progress line's best trial
    assert main(["trial", "space.yaml", *common, "--force"]) == 0
    capsys.readouterr()
    client = MlflowClient(sqlite_uri)
    runs = tracking.child_runs(client, "verdicts")
    assert len(runs) == 19 and sum(SUPERSEDED_TAG in r.data.tags for r in runs) == 1
    assert {r.data.params["model"] for r in runs} == {f"{plugin}:build"}

    assert main(["report", "verdicts", "--tracking-uri", sqlite_uri, "--out", str(tmp_path / "reports")]) == 0
    text = capsys.readouterr().out
    assert f"{plugin}:build" in text and "None" not in text
    table = pd.read_csv(tmp_path / "reports" / "verdicts" / "summary.csv")
    assert len(table) == 6 and set(table["n"]) == {3}  # the forced config's group included
    assert set(table["model"]) == {f"{plugin}:build"}
    assert len(pd.read_csv(tmp_path / "reports" / "verdicts" / "runs.csv")) == 18

    # the winner of one group, rebuilt from the factory path the run records
    assert main(["report", "verdicts", "--tracking-uri", sqlite_uri, "--out", str(tmp_path / "reports"),
                 "--register", "plugged", "--where", "strategy=l1,ratio=0.5"]) == 0
    assert "registered: plugged version 1" in capsys.readouterr().out
