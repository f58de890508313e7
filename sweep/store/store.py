"""One MLflow tracking store behind one `MlflowClient`, with the sqlite-lock retry inside every call.

Everything in sweep talks to MLflow through a `Store` (report/ still holds a few clients of its own): no fluent
`mlflow.start_run`, no global active run, so the code is safe in Ray workers and threads, and a leaked
`MLFLOW_RUN_ID` (mlflow issue 15713) cannot re-parent a trial. Callers never wrap a call in `with_retry`.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mlflow.entities import Experiment, FileInfo, Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from sweep.store.client import RETRY_ATTEMPTS, RETRY_SECONDS, with_retry


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic GC off for the block. A search page of 1000 runs makes ~100,000 SQLAlchemy objects, and the
    collections they trigger (each scanning every live object) took 60 % of a 2,000-run search here (16.4 s -> 6.4 s
    with it off). Reference counting still frees everything; cycles are collected when it is back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Store:
    """A tracking store: built from its URI (or a client someone already holds); each call retries sqlite lock
    errors, at most `attempts` times within `seconds`, and raises every other error at once."""

    def __init__(self, where: str | MlflowClient, attempts: int = RETRY_ATTEMPTS, seconds: float = RETRY_SECONDS):
        self.client = where if isinstance(where, MlflowClient) else MlflowClient(where)
        self.attempts, self.seconds = attempts, seconds

    @classmethod
    def of(cls, where: Store | MlflowClient | str) -> Store:
        """The store a caller names: a Store as it is, or one over a client (report/ and tests hold those) or URI."""
        return where if isinstance(where, Store) else cls(where)

    def bounded(self, attempts: int, seconds: float) -> Store:
        """The same client with other retry bounds: a lease must give up before it lapses."""
        return Store(self.client, attempts, seconds)

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return with_retry(getattr(self.client, method), *args, attempts=self.attempts, seconds=self.seconds,
                          **kwargs)

    # --- experiments ---------------------------------------------------------------------------------------------

    def connect(self) -> None:
        """One query: creates a fresh database's schema, and fails here on a store that cannot be opened."""
        self._call("search_experiments", max_results=1)

    def get_experiment(self, experiment_id: str) -> Experiment:
        return self._call("get_experiment", experiment_id)

    def get_experiment_by_name(self, name: str) -> Experiment | None:
        return self._call("get_experiment_by_name", name)

    def experiment_id(self, name: str) -> str | None:
        """The id of the active experiment `name`; None if there is none or it is deleted."""
        experiment = self.get_experiment_by_name(name)
        return None if experiment is None or experiment.lifecycle_stage == "deleted" else experiment.experiment_id

    def create_experiment(self, name: str, artifact_location: str | None, tags: dict[str, str]) -> str:
        return self._call("create_experiment", name, artifact_location=artifact_location, tags=tags)

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self._call("set_experiment_tag", experiment_id, key, value)

    # --- runs --------------------------------------------------------------------------------------------------------

    def runs(self, experiment_id: str, filter_string: str = "", max_results: int | None = None) -> list[Run]:
        """Every active run of an experiment matching filter_string, newest first (follows MLflow's pagination);
        max_results: only the newest that many."""
        runs: list[Run] = []
        token = None
        with _gc_paused():
            while True:
                page = self._call("search_runs", [experiment_id], filter_string=filter_string,
                                  order_by=["attributes.start_time DESC"], page_token=token,
                                  **({"max_results": max_results} if max_results else {}))
                runs.extend(page)
                token = page.token
                if not token or (max_results and len(runs) >= max_results):
                    return runs[:max_results] if max_results else runs

    def get_run(self, run_id: str) -> Run:
        return self._call("get_run", run_id)

    def create_run(self, experiment_id: str, tags: dict[str, str], run_name: str | None = None) -> Run:
        return self._call("create_run", experiment_id, tags=tags, run_name=run_name)

    def update_run(self, run_id: str, status: str) -> None:
        self._call("update_run", run_id, status=status)

    def set_terminated(self, run_id: str, status: str) -> None:
        self._call("set_terminated", run_id, status=status)

    def delete_run(self, run_id: str) -> None:
        self._call("delete_run", run_id)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("set_tag", run_id, key, value)

    def delete_tag(self, run_id: str, key: str) -> None:
        self._call("delete_tag", run_id, key)

    def log_batch(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
                  tags: Sequence[RunTag] = ()) -> None:
        """One request, so one sqlite transaction; MLflow takes at most 1000 metrics or 100 params in one."""
        self._call("log_batch", run_id, metrics=metrics, params=params, tags=tags)

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        return self._call("get_metric_history", run_id, key)

    # --- artifacts and the model registry --------------------------------------------------------------------------

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call("log_text", run_id, text, artifact_file)

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", run_id, str(local_path), artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", run_id, str(local_dir), artifact_path)

    def download_artifacts(self, run_id: str, path: str, dst_path: str) -> str:
        return self._call("download_artifacts", run_id, path, dst_path)

    def list_artifacts(self, run_id: str) -> list[FileInfo]:
        return self._call("list_artifacts", run_id)

    def create_registered_model(self, name: str, description: str) -> None:
        self._call("create_registered_model", name, description=description)

    def create_model_version(self, name: str, source: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
        return self._call("create_model_version", name, source, run_id=run_id, tags=tags)


# What the store's functions accept: the Store itself, or what report/ and tests still hold (a client, a URI).
StoreLike = Store | MlflowClient | str
