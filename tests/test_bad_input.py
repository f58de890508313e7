"""Bad input, table-driven: every malformed spec or command line fails with one-line errors naming the field and
exit code 2, before any trial starts, leaving an existing MLflow store exactly as it was.

Each case goes through `sweep.cli.main(["run", ...])` (and spec-level cases through `validate` too). Cases the YAML
parser cannot see (a corrupt or foreign checkpoint, a model the pruner refuses, an empty dataset folder) are caught
by `driver.preflight`; resources the cluster cannot give (a GPU on this CPU-only machine) by the orchestrator after
connecting to Ray.
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from sweep.cli import main
from sweep.config.spec import SpecError, load_spec
from sweep.driver.preflight import preflight
from sweep.store import tracking
from sweep.zoo.models import build_model

HEAD = "name: bad\ndataset: {name: digits, limit: 100}\nmodel: {name: small_cnn}\n"


def spec(extra: str = "", head: str = HEAD) -> str:
    return head + extra


# (case id, spec text, text every error line must contain). {tmp} is replaced by a folder of the test.
SPEC_CASES = [
    ("yaml_unclosed_bracket", "name: x\nspace: {ratio: [0.1\n", "line 3"),
    ("yaml_bad_indent", "name: x\n  model: small_cnn\n bad: 1\n", "not valid YAML"),
    ("yaml_duplicate_key", spec("finetune: {epochs: 1}\nfinetune: {epochs: 2}\n"), "duplicate key 'finetune'"),
    ("yaml_tab", "name: x\n\tmodel: small_cnn\n", "line 2"),
    ("empty_file", "", "the file is empty"),
    ("top_level_list", "- name: x\n", "not a mapping"),
    ("missing_name", "dataset: {name: digits}\nmodel: {name: small_cnn}\n", "name: missing"),
    ("unsafe_name", spec(head=HEAD.replace("name: bad", "name: ../../etc")), "name: '../../etc' is not a safe name"),
    ("ratio_zero", spec("prune: {ratio: 0}\n"), "prune.ratio: 0 is outside (0, 1)"),
    ("ratio_one_and_a_half", spec("prune: {ratio: 1.5}\n"), "prune.ratio: 1.5 is outside (0, 1)"),
    ("ratio_in_grid", spec("space: {ratio: {grid: [0.5, 1.5]}}\n"), "space.ratio.grid[1]: 1.5 is outside"),
    ("negative_epochs", spec("finetune: {epochs: -2}\n"), "finetune.epochs: -2 is not >= 0"),
    ("epochs_as_text", spec("base: {epochs: three}\n"), "base.epochs: 'three' is not a whole number"),
    ("lr_zero", spec("finetune: {lr: 0}\n"), "finetune.lr: 0 is not > 0"),
    ("batch_size_zero", spec("base: {batch_size: 0}\n"), "base.batch_size: 0 is not >= 1"),
    ("unknown_strategy", spec("space: {strategy: {grid: [l1, l3]}}\n"), "space.strategy.grid[1]: unknown strategy"),
    ("unknown_model", HEAD.replace("small_cnn", "resnet21"), "model.name: unknown model 'resnet21'"),
    ("unknown_dataset", HEAD.replace("digits", "digitz"), "dataset.name: unknown dataset 'digitz'"),
    ("unknown_top_key", spec("epochs: 3\n"), "epochs: unknown key"),
    ("unknown_space_key", spec("space: {learning_rate: {grid: [0.1]}}\n"), "space.learning_rate: no such setting"),
    ("unknown_domain", spec("space: {ratio: {grd: [0.3]}}\n"), "space.ratio.grd: unknown domain"),
    ("range_in_grid_search", spec("space: {ratio: {uniform: [0.2, 0.8]}}\n"), "space.ratio.uniform: grid search"),
    ("random_without_samples", spec("search: {algorithm: random}\n"), "search.num_samples: random search needs"),
    ("grace_above_max_t", spec("scheduler: {name: asha, grace_period: 5, max_t: 2}\n"), "scheduler.grace_period"),
    ("iterative_one_step", spec("prune: {schedule: iterative, steps: 1}\n"), "prune.steps: an iterative schedule"),
    ("cuda_without_gpu_resource", spec("device: cuda\n"), "device: 'cuda' needs a GPU"),
    ("cpu_zero", spec("resources: {cpu: 0}\n"), "resources.cpu: 0 is not > 0"),
    ("gpu_negative", spec("resources: {gpu: -1}\n"), "resources.gpu: -1 is not >= 0"),
    ("min_channels_zero", spec("prune: {min_channels: 0}\n"), "prune.min_channels: 0 is neither"),
    ("optimizer_unknown", spec("finetune: {optimizer: adam}\n"), "finetune.optimizer: unknown optimizer 'adam'"),
    ("max_failures_negative", spec("max_failures: -1\n"), "max_failures: -1 is not >= 0"),
    ("val_fraction_zero",
     spec("dataset: {name: digits, val_fraction: 0}\n", head="name: bad\nmodel: {name: small_cnn}\n"),
     "dataset.val_fraction: 0 is outside (0, 1)"),
    ("weights_none_as_text", spec(head=HEAD.replace("{name: small_cnn}", "{name: small_cnn, weights: None}")),
     "model.weights: 'None' is text in YAML"),
    ("weights_file_missing", spec(head=HEAD.replace("{name: small_cnn}", "{name: small_cnn, weights: no/such.pt}")),
     "model.weights: file 'no/such.pt' does not exist"),
    ("dataset_path_missing", "name: bad\nmodel: {name: small_cnn}\ndataset: {name: cifar10, root: {tmp}/nowhere}\n",
     "dataset.root: '{tmp}/nowhere' does not exist"),
    ("imagefolder_without_root", "name: bad\nmodel: {name: small_cnn}\ndataset: {name: imagefolder}\n",
     "dataset.root: imagefolder needs a root folder"),
    ("grid_with_num_samples", spec("search: {algorithm: grid, num_samples: 3}\n"), "search.num_samples: a grid runs"),
]

# Cases only loading can find (sweep.driver.preflight): the spec parses, the sweep could not run a single trial.
PREFLIGHT_CASES = [
    ("model_the_pruner_refuses", HEAD.replace("small_cnn", "swin_t"),
     "model.name: swin_t on digits (1x8x8 inputs) cannot be pruned: cannot prune through op "
     "'shifted_window_attention'"),
    ("corrupt_weights_file", HEAD.replace("{name: small_cnn}", "{name: small_cnn, weights: {tmp}/corrupt.pt}"),
     "model.weights: cannot load '{tmp}/corrupt.pt'"),
    ("foreign_checkpoint", HEAD.replace("{name: small_cnn}", "{name: small_cnn, weights: {tmp}/resnet20.pt}"),
     "model.weights: '{tmp}/resnet20.pt' does not fit SmallCNN"),
    ("empty_dataset_folder", "name: bad\nmodel: {name: small_cnn}\ndataset: {name: cifar10, root: {tmp}/empty}\n",
     "dataset.root: {tmp}/empty has no cifar10 files"),
    ("unknown_torchvision_weights", "name: bad\ndataset: {name: digits}\nmodel: {name: resnet18, weights: IMAGENET9}\n",
     "model.weights: unknown weights 'IMAGENET9' for resnet18"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, template_db):
    """A folder with an MLflow store holding one finished trial run, plus the files the cases point at."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "empty").mkdir()
    (root / "corrupt.pt").write_bytes(os.urandom(4096))  # not a torch.save file at all
    # a real checkpoint of another architecture, made here: the tests need no data from outside the repository
    torch.save(build_model("resnet20", 10).state_dict(), root / "resnet20.pt")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    (root / "store").mkdir()
    shutil.copy(template_db, root / "store" / "mlflow.db")  # an empty store, schema made once per session
    config = load_spec_text(root, HEAD).trial
    run = tracking.TrialRun.create(uri, "bad", None, config)
    for epoch in (1, 2):
        run.log_points([("val_accuracy", epoch, 0.5 + epoch / 10)])
    run.log_points([("test_accuracy", 0, 0.7)])
    run.finish("FINISHED")
    return {"root": root, "uri": uri, "db": root / "store" / "mlflow.db", "storage": root / "results"}


def load_spec_text(root: Path, text: str):
    path = root / "good.yaml"
    path.write_text(text, encoding="utf-8")
    return load_spec(path)


def store_snapshot(world) -> tuple:
    """Everything an existing store holds that a failed launch must not change: the bytes, the runs, the metrics."""
    client = MlflowClient(world["uri"])
    runs = tracking.child_runs(client, "bad")
    record = [(r.info.run_id, r.info.status, r.info.end_time, sorted(r.data.metrics.items()),
               [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val_accuracy")]) for r in runs]
    experiments = sorted(e.name for e in client.search_experiments())
    return hashlib.sha256(world["db"].read_bytes()).hexdigest(), record, experiments


@pytest.fixture(scope="module")
def before(world):
    return store_snapshot(world)


@pytest.fixture(autouse=True)
def one_thread_no_ray():
    # compared with before the test: this test process may hold the session's shared local Ray from an earlier module
    torch.set_num_threads(1)
    connected = ray.is_initialized()
    yield
    assert ray.is_initialized() == connected, "a failed command left Ray connected (or disconnected the shared one)"


def write_case(world, case: str, text: str) -> Path:
    path = world["root"] / f"{case}.yaml"
    path.write_text(text.replace("{tmp}", str(world["root"])), encoding="utf-8")
    return path


def error_lines(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), err  # no traceback, nothing else
    return lines


def run_args(world, path) -> list[str]:
    return ["run", str(path), "--tracking-uri", world["uri"], "--storage", str(world["storage"])]


def assert_untouched(world, before) -> None:
    assert store_snapshot(world) == before
    assert not world["storage"].exists(), "a trial or Tune experiment was started"


@pytest.mark.parametrize("case, text, expected", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_spec_is_refused_by_run_and_validate(world, before, capsys, case, text, expected):
    path = write_case(world, case, text)
    expected = expected.replace("{tmp}", str(world["root"]))
    for command in (run_args(world, path), ["validate", str(path)]):
        assert main(command) == 2, command
        captured = capsys.readouterr()
        lines = error_lines(captured.err)
        assert all(line.startswith(f"error: {path}: ") for line in lines), lines  # which file, then the field
        assert any(expected in line for line in lines), (expected, lines)
        assert "Trial name" not in captured.out  # Tune's progress table: no trial was started
    assert_untouched(world, before)


@pytest.mark.parametrize("case, text, expected", PREFLIGHT_CASES, ids=[c[0] for c in PREFLIGHT_CASES])
def test_what_only_loading_finds_is_refused_before_any_trial(world, before, capsys, case, text, expected):
    path = write_case(world, case, text)
    expected = expected.replace("{tmp}", str(world["root"]))
    load_spec(path)  # the parser cannot see it ...
    with pytest.raises(SpecError) as caught:  # ... the preflight can
        preflight(load_spec(path))
    assert len(caught.value.errors) == 1 and expected in caught.value.errors[0], caught.value.errors
    assert "\n" not in caught.value.errors[0]
    for command in (run_args(world, path), ["validate", str(path)]):
        assert main(command) == 2, command
        captured = capsys.readouterr()
        [line] = error_lines(captured.err)
        assert expected in line and "Trial name" not in captured.out
    assert_untouched(world, before)


def test_gpu_requested_where_none_exists(world, before, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the case needs a CPU-only Ray cluster")
    # a config the store has not finished: with nothing to run, a launch would not ask Ray for anything
    path = write_case(world, "gpu", spec("resources: {gpu: 1}\nprune: {ratio: 0.4}\n"))
    assert main(run_args(world, path)) == 2  # starts a local Ray to see its resources, then stops it
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {path}: resources.gpu: 1 GPU per trial requested but the Ray cluster has no GPUs")
    assert_untouched(world, before)


# Command lines: (case id, argv with {tmp} and {good}, text the error must contain). argparse prints its usage line
# before the error, so these check the `error` line only.
CLI_CASES = [
    ("run_missing_file", ["run", "{tmp}/nope.yaml"], "nope.yaml: file not found"),
    ("run_not_utf8", ["run", "{tmp}/latin1.yaml"], "not UTF-8 text"),
    ("run_storage_uri", ["run", "{good}", "--storage", "nosuch://bucket/x"], "--storage: nosuch://bucket/x is not "
     "writable (Unrecognized filesystem type in URI"),
    ("run_max_concurrent_zero", ["run", "{good}", "--max-concurrent", "0"], "argument --max-concurrent: 0 is less"),
    ("run_unknown_option", ["run", "{good}", "--retry"], "unrecognized arguments: --retry"),
    ("unknown_command", ["sweeep"], "invalid choice: 'sweeep'"),
    ("validate_nothing", ["validate"], "the following arguments are required: SPACE.yaml"),
    ("prune_ratio_too_big", ["prune", "--model", "small_cnn", "--ratio", "1.5"], "--ratio: 1.5 is outside (0, 1)"),
    ("prune_unknown_model", ["prune", "--model", "resnet21"], "--model: unknown model 'resnet21'"),
]


@pytest.mark.parametrize("case, argv, expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line(world, before, capsys, case, argv, expected):
    (world["root"] / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    good = write_case(world, "good_cli", HEAD)
    argv = [a.replace("{tmp}", str(world["root"])).replace("{good}", str(good)) for a in argv]
    if argv[0] == "run":
        argv += ["--tracking-uri", world["uri"]] + ([] if "--storage" in argv else ["--storage", str(world["storage"])])
    assert main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error: " in line]
    assert len(errors) == 1 and expected in errors[0], captured.err
    others = [line for line in captured.err.splitlines() if line and "error: " not in line]
    assert all(line.startswith(("usage: ", " ")) for line in others), captured.err  # argparse's usage, no traceback
    assert "Trial name" not in captured.out
    assert_untouched(world, before)
