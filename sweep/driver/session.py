"""The Ray session and the storage a sweep's driver and its analyses share: a local Ray bound to loopback (or a
cluster, whose address is checked in seconds first), the resources it offers, and where bases and launches live (a
folder, or object storage such as s3://bucket/sweeps)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sweep.config.spec import SpecError, SweepSpec
from sweep.errors import InputError
from sweep.store import objects
from sweep.worker.raycompat import quiet_ray_logs

DEFAULT_STORAGE = "sweep_results"
LOOPBACK = "127.0.0.1"
# Ray reads this when `ray` is first imported: "0" makes a local Ray pick 127.0.0.1 as its node address, and every
# Ray server then listens on loopback only (checked with `ss -ltn` on Ray 2.60: with "1", they listen on *).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DEFAULT_CONNECT_TIMEOUT_S = 15.0
# Environment every trial worker gets, on this machine or a cluster's: MLflow prints "View run ... at: URL" for each
# run it ends against an http:// store, and those lines from workers would break into the progress line.
WORKER_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_AUTH_MODE_ENV = "RAY_AUTH_MODE"

# --- Ray ---------------------------------------------------------------------------------------------


def start_ray(address: str | None = None, num_cpus: int | None = None,
              connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> bool:
    """Connect to Ray: a new local instance on loopback (address None; `num_cpus` caps it, else every core) or a
    cluster, whose address must answer within connect_timeout seconds (InputError otherwise); False if already
    connected."""
    import ray

    if ray.is_initialized():
        return False  # the caller owns this connection (tests, notebooks): use it and leave it up
    os.environ.update(WORKER_ENV)  # this driver's own runs, and local workers (they inherit it)
    if address is not None:
        check_address(address, connect_timeout)
        _connect(address)
        return True
    os.environ[_LOCAL_ONLY_ENV] = "0"  # for processes Ray starts from here; they import ray afresh
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the internet from a local run
    from ray._private import ray_constants

    # This process may have imported ray before the variable was set; Ray consults the constant when it picks
    # the node address, so set it too (a private name, hence the check on the result below).
    ray_constants.ENABLE_RAY_CLUSTER = False
    quiet_ray_logs()
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"local Ray bound {node_ip}, not {LOOPBACK}; set {_LOCAL_ONLY_ENV}=0 before starting")
    return True


def _connect(address: str) -> None:
    """ray.init on a cluster, holding what is written to file descriptor 2 meanwhile: Ray's C++ client writes a
    warning per retry straight there ("Failed to get cluster ID from GCS server: Unauthenticated", 20 of them before
    ray.init gives up). Replayed once connected; dropped on failure, where our one line says what went wrong."""
    import ray

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            ray.init(address=address, runtime_env={"env_vars": WORKER_ENV})
        except ConnectionError as error:  # the GCS answered but refused us: token authentication, most often
            raise InputError(_refused(address, error)) from None
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        sys.stderr.write(sink.read().decode(errors="replace"))
        sys.stderr.flush()


def _host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) a Ray address reaches first: the GCS (HOST:PORT, or what 'auto' finds), or the Ray Client
    server (ray://HOST:PORT); None when there is nothing to probe ('auto' with no cluster: Ray says so at once)."""
    if address.startswith("ray://"):
        target = address[len("ray://"):].split("/")[0]
        return (target.rsplit(":", 1)[0], int(target.rsplit(":", 1)[1])) if ":" in target else (target, 10001)
    if address == "auto":
        from ray._private import services

        try:  # a private helper (the one ray.init uses): if it moves, ray.init itself answers
            address = services.canonicalize_bootstrap_address(address) or ""
        except Exception:
            return None
    host, _, port = address.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def check_address(address: str, timeout: float) -> None:
    """A Ray address that does not accept a connection within timeout seconds: InputError naming it and the fix.
    (ray.init would retry it for ever.) A cluster that is starting gets the whole timeout: refusals are retried."""
    target = _host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(target, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as error:
            why = error.strerror or type(error).__name__
        if time.monotonic() + 0.5 > deadline:
            break
        time.sleep(0.5)
    raise InputError(f"--address {address}: no Ray cluster answered at {target[0]}:{target[1]} within {timeout:g} s "
                     f"({why}); start it (`ray start --head`, or `ray up cluster.yaml`), check the address (the "
                     "head's GCS port, 6379 by default, or ray://HEAD:10001), or wait longer with --connect-timeout")


def _refused(address: str, error: Exception) -> str:
    """One line for a cluster that answered and refused the driver."""
    text = " ".join(str(error).split())[:200]
    if "could not find any running ray instance" in text.lower():
        return (f"--address {address}: no running Ray cluster found from this machine ({text}); start one "
                "(`ray start --head`), or give its address (HEAD:6379 or ray://HEAD:10001), or leave --address out "
                "for a local Ray")
    if os.environ.get(_AUTH_MODE_ENV, "").lower() != "token":
        token = os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get(
            "RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser().is_file()
        where = "the token this machine has (~/.ray/auth_token or $RAY_AUTH_TOKEN)" if token else \
            "the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN (`ray get-auth-token` on the head)"
        return (f"--address {address}: Ray refused the connection ({text}); a cluster with token authentication "
                f"(Ray's default once ~/.ray/auth_token exists) needs {_AUTH_MODE_ENV}=token and {where}: "
                f"export {_AUTH_MODE_ENV}=token and run again")
    return (f"--address {address}: Ray refused the connection ({text}) although {_AUTH_MODE_ENV}=token; check that "
            "the token (~/.ray/auth_token or $RAY_AUTH_TOKEN) is the cluster's (`ray get-auth-token` on the head)")


def check_resources(spec: SweepSpec) -> None:
    """After connecting: a trial that asks for GPUs (or more CPUs or memory than any node has) can never be
    scheduled."""
    import ray

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    want, errors = spec.resources, []
    most = {key: max((node.get(key, 0) for node in nodes), default=0) for key in ("GPU", "CPU", "memory")}
    if want["gpu"] > 0 and most["GPU"] == 0:
        errors.append(f"resources.gpu: {want['gpu']:g} GPU per trial requested but the Ray cluster has no GPUs; "
                      "set resources.gpu: 0 (with device: auto or cpu), or run on a cluster with GPUs (--address)")
    elif want["gpu"] > most["GPU"]:
        errors.append(f"resources.gpu: {want['gpu']:g} GPUs per trial but no node has that many; "
                      "ask for at most the GPUs of one node")
    if want["cpu"] > most["CPU"]:
        errors.append(f"resources.cpu: {want['cpu']:g} CPUs per trial but the largest node has {most['CPU']:g}; "
                      f"set resources.cpu to at most {most['CPU']:g}")
    most_gib = most["memory"] / 2**30
    if want.get("memory") and want["memory"] > most_gib:  # Tune would wait for such a node forever, silently
        errors.append(f"resources.memory: {want['memory']:g} GiB per trial but the largest node offers Ray "
                      f"{most_gib:.1f} GiB; set resources.memory to at most {most_gib:.1f}")
    if errors:
        raise SpecError(errors)


# --- storage --------------------------------------------------------------------------------------------------


def resolve_storage(storage: str | None) -> str:
    """Where the sweep keeps Tune state, checkpoints and bases: an absolute folder (default ./sweep_results; Ray
    needs it absolute), or object storage as given (s3://bucket/prefix, gs://..., whatever pyarrow.fs reads)."""
    path = storage or DEFAULT_STORAGE
    return path.rstrip("/") if objects.is_uri(path) else str(Path(path).expanduser().resolve())


def reports_dir(storage: str | None) -> str:
    """The one folder `sweep run` and `sweep report` write a sweep's report into (as NAME/): <storage>/reports;
    ./reports when the storage is a bucket, for the report is files for a person to open on this machine."""
    path = resolve_storage(storage)
    return "reports" if objects.is_uri(path) else os.path.join(path, "reports")


def cache_dir(storage: str, name: str) -> str:
    """Where a sweep's trials share their base models: <storage>/<name>/bases."""
    return objects.join(storage, name, "bases")


def new_launch_path(storage: str, name: str) -> str:
    """<storage>/<name>/launches/<time>-<random>: overlapping launches never write into each other's Tune state."""
    return objects.join(storage, name, "launches", f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
