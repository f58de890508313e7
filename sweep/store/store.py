"""One MLflow tracking store behind one `MlflowClient`, with the sqlite-lock retry inside every call.

Everything in sweep talks to MLflow through a `Store`: no fluent `mlflow.start_run`, no global active run, so the
code is safe in Ray workers and threads, and a leaked `MLFLOW_RUN_ID` (mlflow issue 15713) cannot re-parent a trial.
"""

from __future__ import annotations

import functools
import gc
import os
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from sweep.store.client import RETRY_ATTEMPTS, RETRY_SECONDS, with_retry


class Store:
    """A tracking store: built from its URI (or a client someone already holds); each call retries sqlite lock
    errors, at most `attempts` times within `seconds`, and raises every other error at once."""

    def __init__(self, where: str | MlflowClient, attempts: int = RETRY_ATTEMPTS, seconds: float = RETRY_SECONDS):
        self.client = where if isinstance(where, MlflowClient) else MlflowClient(where)
        self.attempts, self.seconds = attempts, seconds

    @classmethod
    def of(cls, where: Store | MlflowClient | str) -> Store:
        """The store a caller names: a Store as it is, or one over a client (tests and benches hold those) or a URI."""
        return where if isinstance(where, Store) else cls(where)

    def bounded(self, attempts: int, seconds: float) -> Store:
        """The same client with other retry bounds: a lease must give up before it lapses."""
        return Store(self.client, attempts, seconds)

    def __getattr__(self, name: str) -> Any:
        """Any other MlflowClient method, with the retry around it: get_run, set_tag, log_batch, log_text,
        download_artifacts, create_model_version, ... (attributes that are not methods, such as tracking_uri, as
        they are)."""
        if name.startswith("_"):  # copy and pickle look these up before __init__ ran: never the client's
            raise AttributeError(name)
        value = getattr(self.client, name)
        return functools.partial(with_retry, value, attempts=self.attempts, seconds=self.seconds) if callable(value) \
            else value

    def experiment_id(self, name: str) -> str | None:
        """The id of the active experiment `name`; None if there is none or it is deleted."""
        experiment = self.get_experiment_by_name(name)
        return None if experiment is None or experiment.lifecycle_stage == "deleted" else experiment.experiment_id

    def runs(self, experiment_id: str | None, filter_string: str = "", max_results: int | None = None) -> list[Run]:
        """Every active run of an experiment matching filter_string, newest first (follows MLflow's pagination);
        max_results: only the newest that many. No experiment (None): no runs."""
        if experiment_id is None:
            return []
        runs: list[Run] = []
        token = None
        # Python's cyclic GC off meanwhile: the collections that a search's ~100 SQLAlchemy objects a run trigger took
        # most of a large search's time (docs/benchmarks/scale.md); cycles are collected once it is back on.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            while True:
                page = self.search_runs([experiment_id], filter_string=filter_string,
                                        order_by=["attributes.start_time DESC"], page_token=token,
                                        **({"max_results": max_results} if max_results else {}))
                runs.extend(page)
                token = page.token
                if not token or (max_results and len(runs) >= max_results):
                    return runs[:max_results] if max_results else runs
        finally:
            if was_enabled:
                gc.enable()

    def create_run(self, experiment_id: str, tags: dict[str, str], run_name: str | None = None) -> Run:
        """MlflowClient.create_run with the tags second (its second parameter is start_time)."""
        return self.__getattr__("create_run")(experiment_id, tags=tags, run_name=run_name)

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.__getattr__("log_artifact")(run_id, str(local_path), artifact_path)


# What the store's functions accept: the Store itself, or what tests and benches hold (a client, a URI).
StoreLike = Store | MlflowClient | str
