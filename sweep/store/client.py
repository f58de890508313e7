"""The connection to MLflow: which store a sweep writes to, and calls that ride out a busy sqlite file.

Every module of sweep.store calls MLflow through `with_retry`; nothing outside sweep.store talks to MLflow directly
except through sweep.store's functions.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException

try:
    from sqlalchemy.exc import OperationalError as _SqlOperationalError
except ImportError:  # mlflow-skinny against a server: no sqlalchemy, no sqlite locks
    _SqlOperationalError = MlflowException

log = logging.getLogger(__name__)
T = TypeVar("T")

# sqlite allows one writer at a time. MLflow already sets busy_timeout, but a deferred transaction that must upgrade
# to a write lock fails at once with "database is locked" (sqlite refuses to wait to avoid a deadlock): retry those.
RETRY_ATTEMPTS = 10
RETRY_SECONDS = 120.0


def _is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, (MlflowException, _SqlOperationalError)) and "locked" in str(exc).lower()


def with_retry(
    fn: Callable[..., T], *args: Any, attempts: int = RETRY_ATTEMPTS, seconds: float = RETRY_SECONDS, **kwargs: Any
) -> T:
    """Call fn, retrying sqlite lock errors with jittered exponential backoff, at most `attempts` times / `seconds`."""
    deadline = time.monotonic() + seconds
    delay = 0.05
    attempt = 1
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _is_lock_error(exc) or attempt >= attempts or time.monotonic() + delay > deadline:
                raise
            log.debug("sqlite locked (attempt %d/%d), retrying in %.2fs", attempt, attempts, delay)
            time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: writers that collided must not retry in lockstep
            delay = min(delay * 2, 2.0)
            attempt += 1


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit uri > $MLFLOW_TRACKING_URI > sqlite:///<cwd>/mlflow.db; relative sqlite paths are made absolute.

    Absolute because Ray runs trials in their own working directories: they must all write the driver's file.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not os.path.isabs(uri[len(prefix) :]):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri
