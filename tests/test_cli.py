"""The `sweep` command line without Ray: validate, run on bad input, models, strategies, prune, trial, report.

Commands run in-process through `sweep.cli.main([...])`; one test runs the installed entry point as a subprocess.
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sweep.cli import main, trial_threads
from sweep.config.spec import load_spec
from sweep.pruning import STRATEGIES, load_pruned
from sweep.store import tracking
from sweep.worker.measure import count_params
from sweep.zoo.models import build_model, model_names

REPO = Path(__file__).resolve().parents[1]

GOOD = """
name: cli_good
dataset: {name: digits, limit: 120}
model: {name: small_cnn}
base: {epochs: 1, batch_size: 32}
finetune: {epochs: 1, batch_size: 32}
measure: {batch_size: 1, warmup: 1, runs: 2}
space:
  strategy: {grid: [l1, fpgm, random]}
  ratio: {grid: [0.3, 0.6]}
resources: {cpu: 1}
"""

# Each bad spec with the fields its errors must name (every problem of a file is reported, not just the first).
BAD = {
    "many.yaml": ("""
name: bad name
model: {name: small_cn}
dataset: {name: digits}
finetune: {epochs: -1, lr: 0}
space:
  strategy: {grid: [l1, l3]}
  ratio: {grid: [0.5, 1.5]}
  bogus: 3
resources: {cpu: 0, gpu: -1}
""", ["name:", "model.name:", "finetune.epochs:", "finetune.lr:", "space.strategy.grid[1]:", "space.ratio.grid[1]:",
      "space.bogus:", "resources.cpu:", "resources.gpu:"]),
    "search.yaml": ("""
name: bad_search
model: {name: small_cnn}
dataset: {name: mnist_typo}
search: {algorithm: random}
scheduler: {name: asha, grace_period: 5, max_t: 2}
space:
  finetune.lr: {loguniform: [0, 0.1]}
""", ["dataset.name:", "search.num_samples:", "scheduler.grace_period:", "space.finetune.lr.loguniform[0]:"]),
    "yaml.yaml": ("name: broken\nspace: [\n", ["line 3"]),
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # MLflow's default store is ./mlflow.db: run every command in an empty folder to see whether it writes one.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: extra threads only spin
    yield tmp_path
    torch.set_num_threads(before)


def _write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _error_lines(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), err  # no traceback, nothing else
    return lines


def test_validate_good_spec_counts_its_trials(isolated, capsys):
    path = _write(isolated, "good.yaml", GOOD)
    quickstart = str(REPO / "search_spaces" / "quickstart.yaml")
    assert main(["validate", path, quickstart]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = len(load_spec(quickstart).grid_configs())
    assert out == [f"ok: {path} (6 trials)", f"ok: {quickstart} ({expected} trials)"]


def test_validate_reports_every_error_of_every_bad_spec(isolated, capsys):
    good = _write(isolated, "good.yaml", GOOD)
    paths = {name: _write(isolated, name, text) for name, (text, _) in BAD.items()}
    missing = str(isolated / "missing.yaml")
    assert main(["validate", good, *paths.values(), missing]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"ok: {good} (6 trials)"]
    lines = _error_lines(captured.err)
    for name, (_, fields) in BAD.items():
        mine = [line for line in lines if line.startswith(f"error: {paths[name]}: ")]
        assert len(mine) == len(fields), mine
        for field in fields:
            assert any(field in line for line in mine), (field, mine)
    assert any(line.startswith(f"error: {missing}: file not found") for line in lines)
    assert sorted(p.name for p in isolated.iterdir()) == sorted(["good.yaml", *BAD])  # no mlflow.db, no mlruns


def test_run_with_a_bad_spec_fails_before_touching_mlflow(isolated, capsys):
    path = _write(isolated, "many.yaml", BAD["many.yaml"][0])
    db = isolated / "store" / "mlflow.db"
    assert main(["run", path, "--tracking-uri", f"sqlite:///{db}", "--storage", str(isolated / "results")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == len(BAD["many.yaml"][1])
    assert not db.parent.exists() and not (isolated / "results").exists() and not (isolated / "mlflow.db").exists()


def test_usage_errors_exit_2(capsys):
    assert main(["run"]) == 2
    assert "SPACE.yaml" in capsys.readouterr().err
    assert main(["prune", "--model", "small_cnn", "--ratio", "1.5"]) == 2
    assert "--ratio: 1.5 is outside (0, 1)" in capsys.readouterr().err


def test_models_and_strategies_are_listed(capsys):
    assert main(["models", "--names"]) == 0
    names = capsys.readouterr().out.split()
    assert names == model_names() and {"small_cnn", "resnet20", "resnet18", "vgg16"} <= set(names)
    assert main(["strategies"]) == 0
    assert capsys.readouterr().out.split() == list(STRATEGIES)


def test_prune_prints_the_table_and_writes_a_loadable_checkpoint(isolated, capsys):
    out = isolated / "pruned" / "small.pt"
    args = ["prune", "--model", "small_cnn", "--num-classes", "10", "--strategy", "l1", "--ratio", "0.5",
            "--input-size", "32", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    table = {parts[0]: (int(parts[2]), int(parts[3])) for parts in map(str.split, text.splitlines())
             if len(parts) == 4 and parts[1] in ("Conv2d", "Linear")}
    assert table, text
    params = next(line for line in text.splitlines() if line.startswith("params:"))
    before, after = (int(n.replace(",", "")) for n in params.split()[1:4:2])

    model, plan = load_pruned(out, build_model("small_cnn", 10))
    assert count_params(build_model("small_cnn", 10)) == before
    assert count_params(model) == after < before
    for name, (width_before, width_after) in table.items():
        module = model.get_submodule(name)
        assert (module.out_channels if isinstance(module, torch.nn.Conv2d) else module.out_features) == width_after
        assert width_after <= width_before
    assert any(b > a for b, a in table.values())  # something was removed
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_prune_user_errors_are_one_line(capsys):
    assert main(["prune", "--model", "no_such_net"]) == 2
    assert _error_lines(capsys.readouterr().err)[0].startswith("error: --model: unknown model 'no_such_net'")
    assert main(["prune", "--model", "small_cnn", "--strategy", "l3"]) == 2
    assert _error_lines(capsys.readouterr().err)[0].startswith("error: strategy: unknown 'l3'")
    assert main(["prune", "--model", "small_cnn", "--weights", "nothing/here.pt"]) == 2
    assert len(_error_lines(capsys.readouterr().err)) == 1
    # the field becomes its flag; a path that holds a field's words is printed as given
    assert main(["prune", "--model", "small_cnn", "--weights", "/x/nope/model.name.pt"]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        "error: --weights: no checkpoint file at '/x/nope/model.name.pt'; give an existing .pt/.pth/.th file"]
    # ViT takes 224x224 only: the whole of stderr is one line naming the flag (no traceback first)
    assert main(["prune", "--model", "vit_b_32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --input-size: vit_b_32 does not run at 32x32"), err


def test_trial_runs_one_config_without_ray_then_report(isolated, capsys):
    path = _write(isolated, "good.yaml", GOOD)
    uri = f"sqlite:///{isolated / 'mlflow.db'}"
    storage = str(isolated / "results")
    assert main(["trial", path, "--tracking-uri", uri, "--storage", storage]) == 0
    captured = capsys.readouterr()
    assert "running the first" in captured.err
    printed = dict(line.split(maxsplit=1) for line in captured.out.splitlines() if not line.startswith("epoch"))
    runs = tracking.child_runs(MlflowClient(uri), "cli_good")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["strategy"] == "l1" and float(run.data.params["ratio"]) == 0.3  # the first grid point
    assert "mlflow.parentRunId" not in run.data.tags
    assert float(printed["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"], rel=1e-5)
    assert len(list((isolated / "results" / "cli_good" / "bases").iterdir())) == 1  # the sweep's base cache

    # The same config again: no new run, the recorded metrics are printed.
    assert main(["trial", path, "--tracking-uri", uri, "--storage", storage]) == 0
    assert "already has a FINISHED run" in capsys.readouterr().out
    assert len(tracking.child_runs(MlflowClient(uri), "cli_good")) == 1

    # one report folder: <storage>/reports/NAME, where `sweep run` writes it too (sweep.driver.session.reports_dir)
    assert main(["report", "cli_good", "--tracking-uri", uri, "--storage", storage]) == 0
    assert "Sweep `cli_good`" in capsys.readouterr().out
    assert (isolated / "results" / "reports" / "cli_good" / "runs.csv").read_text().count("\n") == 2  # header + 1
    assert not (isolated / "reports").exists()
    assert main(["report", "no_such_sweep", "--tracking-uri", uri]) == 2
    assert "not found" in _error_lines(capsys.readouterr().err)[0]


def test_console_entry_point_exits_2_on_bad_input(isolated):
    path = _write(isolated, "many.yaml", BAD["many.yaml"][0])
    done = subprocess.run([sys.executable, "-m", "sweep.cli", "validate", path], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(_error_lines(done.stderr)) == len(BAD["many.yaml"][1])


PLUGIN = '''
from torch import nn


def build(num_classes, in_channels, width=4):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(2 * width, num_classes))
'''


@pytest.fixture
def plugin(isolated):
    """A module of the user's own, in the working directory, under a name no other test imported."""
    name = f"userplug_{uuid.uuid4().hex[:8]}"
    (isolated / f"{name}.py").write_text(PLUGIN, encoding="utf-8")
    yield name
    sys.modules.pop(name, None)


def test_validate_reports_a_misspelt_factory_with_the_other_mistakes(plugin, capsys):
    """Three mistakes, three lines in one pass: the factory's used to come only after the others were fixed."""
    path = _write(Path.cwd(), "mine.yaml", f"""
name: mine
dataset: {{name: digits}}
model: {{factory: "{plugin}:buld"}}
space:
  strategy: l3
  ratio: 1.2
""")
    assert main(["validate", path]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 3, lines
    assert any("space.strategy:" in line for line in lines) and any("space.ratio:" in line for line in lines)
    [factory] = [line for line in lines if "model.factory:" in line]
    assert f"module '{plugin}' has no attribute 'buld'; did you mean 'build'?" in factory


def test_run_reports_a_misspelt_factory_before_anything_starts(plugin, capsys):
    text = f"name: mine\ndataset: {{name: digits}}\nmodel: {{factory: '{plugin}:buld'}}\nspace: {{ratio: 1.2}}\n"
    path = _write(Path.cwd(), "mine.yaml", text)
    assert main(["run", path, "--storage", str(Path.cwd() / "results")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 2 and any("did you mean 'build'?" in line for line in lines), lines
    assert not (Path.cwd() / "results").exists() and not (Path.cwd() / "mlflow.db").exists()


def test_validate_names_the_nearest_module_of_a_misspelt_one(plugin, capsys):
    typo = plugin[:-1]  # one character short
    path = _write(Path.cwd(), "mine.yaml", f"""
name: mine
dataset: {{factory: "{typo}:load"}}
model: {{factory: "{plugin}:build"}}
""")
    assert main(["validate", path]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert f"dataset.factory: cannot import module '{typo}'" in line and f"(did you mean '{plugin}'?)" in line
    good = f"name: mine\ndataset: {{name: digits}}\nmodel: {{factory: '{plugin}:build'}}\n"
    path = _write(Path.cwd(), "good.yaml", good)
    assert main(["validate", path]) == 0


def test_trial_threads_are_what_ray_gives_a_trial():
    assert trial_threads({"cpu": 1}, {}) == 1
    assert trial_threads({"cpu": 2.5}, {}) == 2  # Ray: the floor of the trial's CPUs
    assert trial_threads({"cpu": 0.5}, {}) == 1  # and at least one
    assert trial_threads({"cpu": 1}, {"OMP_NUM_THREADS": "3"}) == 3  # the user's own setting wins, as under Ray


def test_sweep_trial_prints_each_epoch_as_it_ends(isolated):
    """The installed command, its output piped: one line per fine-tune epoch, with the values MLflow recorded."""
    text = GOOD.replace("finetune: {epochs: 1,", "finetune: {epochs: 2,").replace("name: cli_good", "name: cli_epochs")
    path = _write(isolated, "epochs.yaml", text)
    uri = f"sqlite:///{isolated / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-m", "sweep.cli", "trial", path, "--tracking-uri", uri, "--storage",
                           str(isolated / "results")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "note: 1 torch thread, as a trial gets under `sweep run`" in done.stderr  # resources.cpu: 1
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1", "epoch 2"], done.stdout
    [run] = tracking.child_runs(MlflowClient(uri), "cli_epochs")
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "val_accuracy")
    for line, point in zip(epochs, sorted(history, key=lambda m: m.step)):
        shown = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].rsplit(" (", 1)[0].split(", "))
        assert float(shown["val_accuracy"]) == pytest.approx(point.value, rel=1e-5)
        assert {"val_loss", "train_loss"} <= set(shown) and "flops" not in shown


def _channel_table(text: str) -> dict[str, tuple[int, int]]:
    return {parts[0]: (int(parts[2]), int(parts[3])) for parts in map(str.split, text.splitlines())
            if len(parts) == 4 and parts[1] in ("Conv2d", "Linear")}


def test_prune_takes_the_users_own_network(plugin, capsys):
    """By --factory with --kwargs, or by a spec's model block (classes, channels and size from its dataset)."""
    assert main(["prune", "--factory", f"{plugin}:build", "--kwargs", '{"width": 8}', "--ratio", "0.5"]) == 0
    table = _channel_table(capsys.readouterr().out)
    assert table == {"0": (8, 4), "3": (16, 8), "7": (10, 10)}, table  # the head keeps the 10 classes

    path = _write(Path.cwd(), "mine.yaml", f"name: mine\ndataset: {{name: digits}}\n"
                                           f"model: {{factory: '{plugin}:build', kwargs: {{width: 6}}}}\n")
    out = Path.cwd() / "mine.pt"
    assert main(["prune", "--spec", path, "--ratio", "0.5", "--out", str(out)]) == 0
    assert _channel_table(capsys.readouterr().out) == {"0": (6, 3), "3": (12, 6), "7": (10, 10)}
    built = build_model(None, 10, in_channels=1, factory=f"{plugin}:build", kwargs={"width": 6})  # digits: 1x8x8
    model, _ = load_pruned(out, built)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert main(["prune", "--spec", path, "--strategy", "taylor"]) == 0  # scored on the spec's images
    assert "random inputs" not in capsys.readouterr().err

    assert main(["prune", "--factory", f"{plugin}:buld"]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert line == f"error: --factory: module '{plugin}' has no attribute 'buld'; did you mean 'build'?"
    assert main(["prune", "--model", "small_cnn", "--kwargs", '{"width": 8}']) == 2
    assert _error_lines(capsys.readouterr().err)[0].startswith("error: --kwargs: only a --factory takes")
    assert main(["prune", "--model", "no_such_net"]) == 2
    assert "give --factory 'pkg.module:function'" in _error_lines(capsys.readouterr().err)[0]


def test_mlflow_lock_file_is_ignored():
    """MLflow's sqlite lock beside the default store showed in `git status` of a fresh clone."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "mlflow.db.lock", "sub/mlflow.db.lock"], cwd=REPO, timeout=60,
                          capture_output=True, text=True)
    assert done.stdout.split() == ["mlflow.db.lock", "sub/mlflow.db.lock"], done.stdout + done.stderr
