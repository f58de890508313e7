"""`sweep report NAME --register MODEL`: the best trial's pruned network in the MLflow Model Registry (sqlite),
loadable with mlflow.pyfunc.load_model and with sweep.pruning.load_pruned, giving the same outputs; no pickle."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sweep.cli import main
from sweep.config.schema import trial_config
from sweep.config.spec import load_spec
from sweep.driver.launch import run_one
from sweep.pruning import load_pruned
from sweep.store import registry, tracking
from sweep.worker.base import new_model
from sweep.zoo.data import load_dataset

SPACE = """
name: reg
dataset: {{name: digits, limit: 150}}
model: {{name: small_cnn}}
base: {{epochs: 1, batch_size: 32}}
finetune: {{epochs: 1, batch_size: 32}}
measure: {{batch_size: 1, warmup: 1, runs: 2}}
prune: {{strategy: l1, ratio: {ratio}}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory, template_db):
    """Two real trials (no Ray) of one sweep in a fresh sqlite store."""
    root = tmp_path_factory.mktemp("registry")
    shutil.copy(template_db, root / "mlflow.db")  # an empty store, schema made once per session
    uri = f"sqlite:///{root / 'mlflow.db'}"
    torch.set_num_threads(1)
    for ratio in (0.3, 0.7):
        path = root / f"r{ratio}.yaml"
        path.write_text(SPACE.format(ratio=ratio), encoding="utf-8")
        run_one(load_spec(path), tracking_uri=uri, storage=str(root / "results"))
    return root, uri


def test_register_best_then_load_both_ways(store, tmp_path):
    root, uri = store
    client = MlflowClient(uri)
    runs = tracking.child_runs(client, "reg")
    assert len(runs) == 2
    best = max(runs, key=lambda r: (r.data.metrics["val_accuracy"], r.info.start_time))

    version = registry.register_best("reg", "digits-pruned", tracking_uri=uri)
    assert version.run_id == best.info.run_id and str(version.version) == "1"
    assert client.get_run(best.info.run_id).info.status == "FINISHED"  # the trial's record is unchanged

    # no pickle anywhere in the registered model: models from code, a JSON record, a weights-only checkpoint
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "m"),
                                                     tracking_uri=uri))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    arch = json.loads(next(local.rglob("architecture.json")).read_text())
    assert arch == {"model": "small_cnn", "factory": None, "kwargs": None, "num_classes": 10, "in_channels": 1}

    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/digits-pruned/1")
    finally:
        mlflow.set_tracking_uri(None)
    splits = load_dataset("digits", limit=50)
    x = torch.stack([splits.test[i][0] for i in range(16)])
    predicted = pyfunc.predict(x.numpy())
    assert predicted.shape == (16, 10) and predicted.dtype == np.float32

    checkpoint = mlflow.artifacts.download_artifacts(run_id=best.info.run_id, artifact_path="checkpoint/pruned.pt",
                                                     dst_path=str(tmp_path / "c"), tracking_uri=uri)
    config = load_spec(root / "r0.3.yaml").trial
    architecture = new_model(trial_config(config).model, splits.num_classes, splits.in_channels, source_weights=False)
    model, plan = load_pruned(checkpoint, architecture)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)

    # a second registration of the same sweep is version 2 of the same name
    assert str(registry.register_best("reg", "digits-pruned", tracking_uri=uri).version) == "2"


@pytest.mark.parametrize("by, expected", [
    ("test_accuracy", "--by: test_accuracy is measured on the test split"),
    ("accuracy", "--by: accuracy is measured on the test split"),  # an older store's name for test accuracy
    ("val_acc", "--by: unknown metric 'val_acc'"),
])
def test_never_select_on_test_data(store, by, expected):
    with pytest.raises(registry.RegistryError, match=expected):
        registry.register_best("reg", "nope", by=by, tracking_uri=store[1])


def test_cli_register(store, capsys):
    root, uri = store
    assert main(["report", "reg", "--tracking-uri", uri, "--out", str(root / "reports"), "--register", "cli-pruned",
                 "--by", "flops_reduction"]) == 0
    out = capsys.readouterr().out
    assert "registered: cli-pruned version 1" in out and "models:/cli-pruned/1" in out
    assert main(["report", "reg", "--tracking-uri", uri, "--register", "x", "--by", "test_top5"]) == 2
    assert "error: --by: test_top5 is measured on the test split" in capsys.readouterr().err


def test_sweep_trial_force_runs_a_finished_config_again(store, capsys):
    root, uri = store
    args = ["trial", str(root / "r0.3.yaml"), "--tracking-uri", uri, "--storage", str(root / "results")]
    assert main(args) == 0
    assert "already has a FINISHED run (--force runs it again)" in capsys.readouterr().out
    before = len(tracking.child_runs(MlflowClient(uri), "reg"))
    assert main([*args, "--force"]) == 0
    assert "already has a FINISHED run" not in capsys.readouterr().out
    assert len(tracking.child_runs(MlflowClient(uri), "reg")) == before + 1
