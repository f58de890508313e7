"""The connection to MLflow: which store a sweep writes to, whether a server answers, and `with_retry`, which
`sweep.store.store.Store` puts around every call so that it rides out a busy sqlite file."""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException
from sqlalchemy.exc import OperationalError

from sweep.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")

# sqlite allows one writer at a time. MLflow already sets busy_timeout, but a deferred transaction that must upgrade
# to a write lock fails at once with "database is locked" (sqlite refuses to wait to avoid a deadlock): retry those.
RETRY_ATTEMPTS = 10
RETRY_SECONDS = 120.0


def with_retry(
    fn: Callable[..., T], *args: Any, attempts: int = RETRY_ATTEMPTS, seconds: float = RETRY_SECONDS, **kwargs: Any
) -> T:
    """Call fn, retrying sqlite lock errors with jittered exponential backoff, at most `attempts` times / `seconds`."""
    deadline = time.monotonic() + seconds
    for attempt in itertools.count(1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            delay = min(0.05 * 2 ** (attempt - 1), 2.0)
            locked = isinstance(exc, (MlflowException, OperationalError)) and "locked" in str(exc).lower()
            if not locked or attempt >= attempts or time.monotonic() + delay > deadline:
                raise
            log.debug("sqlite locked (attempt %d/%d), retrying in %.2fs", attempt, attempts, delay)
            time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: writers that collided must not retry in lockstep


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit uri > $MLFLOW_TRACKING_URI > sqlite:///<cwd>/mlflow.db; relative sqlite paths are made absolute
    (Ray runs trials in their own working directories: they must all write the driver's file)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not os.path.isabs(uri[len(prefix) :]):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri


# --- a tracking server that does not answer ------------------------------------------------------------------------

PROBE_TIMEOUT_S = 5.0
WATCH_EVERY_S = 5.0
_down_since: dict[str, float] = {}  # server URI -> when a probe first failed, while it keeps failing


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the tracking server at uri answers an HTTP request within timeout seconds, else why not. Any HTTP
    answer counts (an auth proxy's 401 too): the point is whether anything is there, which MLflow's client would
    otherwise find out after about 4 minutes of retries."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return " ".join(str(reason).split()) or type(error).__name__


def check_tracking_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """An http(s) tracking URI with nothing answering: InputError naming it and the fix. Other stores: nothing."""
    why = probe(uri, timeout) if is_server(uri) else None
    if why is not None:
        raise InputError(f"--tracking-uri {uri}: no MLflow server answered within {timeout:g} s ({why}); start it "
                         "(`mlflow server --host 127.0.0.1 --port 5000`), check the address, or leave --tracking-uri "
                         "and $MLFLOW_TRACKING_URI unset for the local sqlite store")


def down_for(uri: str) -> float | None:
    """Seconds since the watched server at uri stopped answering, or None while it answers (or is not watched)."""
    since = _down_since.get(uri)
    return None if since is None else time.time() - since


class ServerWatch:
    """Probes a tracking server every `every_s` from a daemon thread while a sweep runs, so that `down_for` can say
    how long an outage has lasted: MLflow's own client retries in silence."""

    def __init__(self, uri: str, every_s: float = WATCH_EVERY_S, timeout: float = PROBE_TIMEOUT_S):
        self.uri, self.every_s, self.timeout = uri, every_s, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tracking-watch", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            answered = probe(self.uri, self.timeout) is None
            if self._stop.is_set():  # the sweep ended while this probe ran: say nothing more
                return
            if answered:
                _down_since.pop(self.uri, None)
            else:
                _down_since.setdefault(self.uri, started)
            self._stop.wait(self.every_s)

    def __enter__(self) -> ServerWatch:
        if is_server(self.uri):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        _down_since.pop(self.uri, None)
