"""Register a sweep's winner in the MLflow Model Registry, as a pyfunc model with no pickled network.

    version = register_best("quickstart", "digits-pruned", by="val_accuracy")   # a ModelVersion
    model = mlflow.pyfunc.load_model("models:/digits-pruned/1")                  # predict(N x C x H x W float32)

The winner is the FINISHED current trial run (a forced rerun's earlier run is not one) with the best value of `by`,
a metric a selection may read (never a test metric), of one launch (`launch`) and/or group (`where`), all measured
on one validation split. The model holds the run's `checkpoint/pruned.pt`, an `architecture.json` and this package's
model code (pyfunc_model.py), no pickle; loading needs `sweep` installed (docs/comparing.md, "Register the winner").
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from sweep.config.names import LEGACY_METRICS, METRICS, selectable_metrics
from sweep.errors import InputError
from sweep.pruning import load_pruned
from sweep.store import tracking
from sweep.store.store import Store
from sweep.zoo.models import build_model

MODEL_DIR = "registered_model"  # artifact folder of the trial run that holds the pyfunc model
CHECKPOINT = "checkpoint/pruned.pt"
VAL_SPLIT_TAG = "data.val_split"  # tracking: which images a run's validation accuracy was measured on


class RegistryError(InputError):
    """A winner cannot be chosen or registered; the message names the option and the fix."""


class PrunedNetwork(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: logits (N x classes, float32) of a batch of images (N x C x H x W, float32, normalised)."""

    def load_context(self, context) -> None:
        self.model = load_network(context.artifacts["architecture"], context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


def load_network(architecture: str | Path, checkpoint: str | Path) -> torch.nn.Module:
    """The pruned network from an architecture.json and a pruned.pt, in eval mode, on the CPU."""
    arch = json.loads(Path(architecture).read_text(encoding="utf-8"))
    base = build_model(arch.get("model"), arch["num_classes"], None, arch["in_channels"],
                       factory=arch.get("factory"), kwargs=arch.get("kwargs"))
    model, _ = load_pruned(str(checkpoint), base)
    return model.eval()


def parse_where(text: str | None) -> dict[str, str]:
    """`--where strategy=l1,ratio=0.5` as {param: value}."""
    where: dict[str, str] = {}
    for part in (text or "").split(","):
        key, equals, value = (s.strip() for s in part.partition("="))
        if not part.strip():
            continue
        if not equals or not key or not value:
            raise RegistryError(f"--where: {part.strip()!r} is not param=value; write e.g. "
                                "--where strategy=l1,ratio=0.5")
        where[key] = value
    return where


def _matches(params: dict, key: str, wanted: str) -> bool:
    value = params.get(key)
    if value is None:
        return False
    try:
        return float(value) == float(wanted)  # ratio=0.5 matches a logged 0.5 however it was written
    except ValueError:
        return value == wanted


def candidates(experiment: str, by: str = "val_accuracy", tracking_uri: str | None = None,
               launch: str | None = None, where: dict[str, str] | None = None) -> list:
    """The current FINISHED trial runs a registration ranks: of one launch (its parent run id) and/or one group
    (params equal to `where`); runs a forced rerun replaced are never among them. `by` must be a metric a selection
    may read."""
    if by in LEGACY_METRICS or by.startswith("test_") or (by in METRICS and not METRICS[by].selectable):
        raise RegistryError(f"--by: {by} is measured on the test split, which must never choose a model (its number "
                            f"would be optimistic); choose by one of {', '.join(selectable_metrics())}")
    if by not in METRICS:
        raise RegistryError(f"--by: unknown metric '{by}'; choose one of {', '.join(selectable_metrics())}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    store = Store(uri)
    if store.experiment_id(experiment) is None:
        raise RegistryError(f"NAME: no sweep '{experiment}' in {uri}; check the name or --tracking-uri")
    runs = tracking.current(tracking.child_runs(store, experiment, "attributes.status = 'FINISHED'"))
    if launch is not None:
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == launch]
        if not runs:
            raise RegistryError(f"--launch: no FINISHED trial of '{experiment}' belongs to launch {launch}; give the "
                                f"parent run id of one of its launches (the MLflow UI, or the report's runs.csv)")
    for key, wanted in (where or {}).items():
        if not any(key in r.data.params for r in runs):
            known = sorted({k for r in runs for k in r.data.params})
            raise RegistryError(f"--where: no trial of '{experiment}' has param '{key}'; use one of {', '.join(known)}")
        runs = [r for r in runs if _matches(r.data.params, key, wanted)]
    if not runs:
        listed = ", ".join(f"{k}={v}" for k, v in (where or {}).items())
        raise RegistryError(f"--where: no FINISHED trial of '{experiment}' has {listed}; check the values "
                            f"(the report's runs.csv lists every run's params)")
    runs = [r for r in runs if by in r.data.metrics]
    if not runs:
        raise RegistryError(f"--by: no FINISHED trial of '{experiment}' has metric {by}; run the sweep first or "
                            f"choose another metric")
    splits = sorted({r.data.tags.get(VAL_SPLIT_TAG, "unrecorded") for r in runs})
    if len(splits) > 1:
        raise RegistryError(f"--register: these {len(runs)} runs measured {by} on {len(splits)} different validation "
                            f"splits (tag {VAL_SPLIT_TAG}), so their values do not compare; name one group or launch "
                            f"with --where param=value,... or --launch PARENT_RUN_ID")
    return runs


def best_run(experiment: str, by: str = "val_accuracy", tracking_uri: str | None = None,
             launch: str | None = None, where: dict[str, str] | None = None):
    """The best `by` among `candidates` (ties: the newest run)."""
    runs = candidates(experiment, by, tracking_uri, launch, where)
    sign = 1 if METRICS[by].direction == "max" else -1
    return max(runs, key=lambda r: (sign * r.data.metrics[by], r.info.start_time))


def _param(params: dict, key: str):
    value = params.get(key)
    return None if value in (None, "None", "null") else value


def _architecture(run, checkpoint: Path) -> dict:
    """What rebuilds the base network: the run's model params, and classes/channels read off its weights (no param
    holds them). Pruning never touches the stem's inputs nor the head's outputs, so the first conv's input channels
    and the last layer's outputs are the base network's."""
    params = run.data.params
    kwargs = _param(params, "model.kwargs")
    factory = _param(params, "model.factory")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() >= 2]
    # the `model` param names a plug-in by its factory path; build_model takes that as factory, not as a name
    return {"model": None if factory else _param(params, "model"), "factory": factory,
            "kwargs": json.loads(kwargs) if kwargs else None,
            "in_channels": int(next(v for v in weights if v.dim() == 4).shape[1]),
            "num_classes": int(weights[-1].shape[0])}


def register_best(experiment: str, model_name: str, by: str = "val_accuracy", tracking_uri: str | None = None,
                  launch: str | None = None, where: dict[str, str] | None = None) -> ModelVersion:
    """Register the best trial's pruned network (see `best_run`) as a new version of `model_name`."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    run = best_run(experiment, by, uri, launch, where)
    store = Store(uri)
    with tempfile.TemporaryDirectory(prefix="sweep-register-") as tmp:
        tmp = Path(tmp)
        try:
            checkpoint = Path(store.download_artifacts(run.info.run_id, CHECKPOINT, str(tmp)))
        except Exception as e:
            raise RegistryError(f"run {run.info.run_id} has no {CHECKPOINT} artifact ({type(e).__name__}); "
                                f"it cannot be registered") from e
        arch = _architecture(run, checkpoint)
        (tmp / "architecture.json").write_text(json.dumps(arch, indent=2), encoding="utf-8")
        load_network(tmp / "architecture.json", checkpoint)  # fails here, not at load time, if it cannot
        tensor = mlflow.types.TensorSpec
        signature = mlflow.models.ModelSignature(  # any image size: the network's pooling decides what fits
            inputs=mlflow.types.Schema([tensor(np.dtype(np.float32), (-1, arch["in_channels"], -1, -1))]),
            outputs=mlflow.types.Schema([tensor(np.dtype(np.float32), (-1, arch["num_classes"]))]))
        local = tmp / MODEL_DIR
        mlflow.pyfunc.save_model(
            str(local), python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"architecture": str(tmp / "architecture.json"), "checkpoint": str(checkpoint)},
            signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            metadata={"sweep.experiment": experiment, "sweep.run_id": run.info.run_id, "sweep.by": by,
                      f"sweep.{by}": run.data.metrics[by]})
        # Artifacts only: the FINISHED trial run keeps its status, metrics and end time.
        store.log_artifacts(run.info.run_id, str(local), MODEL_DIR)
    try:
        store.create_registered_model(model_name,
                                      description="Pruned networks chosen from sweeps by `sweep report --register`")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise RegistryError(f"--register: cannot create registered model '{model_name}': {e.message}") from e
    tags = {"sweep.experiment": experiment, "sweep.by": by, f"sweep.{by}": str(run.data.metrics[by])}
    return store.create_model_version(model_name, f"{run.info.artifact_uri}/{MODEL_DIR}", run_id=run.info.run_id,
                                      tags=tags)
