"""The Ray session and the storage folder a sweep's driver and its analyses share: a local Ray bound to loopback (or
a cluster), the resources it offers, and where bases and launches live."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from sweep.config.spec import SpecError, SweepSpec
from sweep.errors import InputError
from sweep.worker.raycompat import quiet_ray_logs

DEFAULT_STORAGE = "sweep_results"
LOOPBACK = "127.0.0.1"
# Ray reads this when `ray` is first imported: "0" makes a local Ray pick 127.0.0.1 as its node address, and every
# Ray server then listens on loopback only (checked with `ss -ltn` on Ray 2.60: with "1", they listen on *).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# --- Ray ---------------------------------------------------------------------------------------------


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: a new local instance on loopback (address None; `num_cpus` caps it, else every core) or a
    cluster; False if already connected."""
    import ray

    if ray.is_initialized():
        return False  # the caller owns this connection (tests, notebooks): use it and leave it up
    if address is not None:
        ray.init(address=address)
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


def check_resources(spec: SweepSpec) -> None:
    """After connecting: a trial that asks for GPUs (or more CPUs or memory than any node has) can never be
    scheduled."""
    import ray

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    want = spec.resources
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    errors = []
    if want["gpu"] > 0 and total_gpus == 0:
        errors.append(f"resources.gpu: {want['gpu']:g} GPU per trial requested but the Ray cluster has no GPUs; "
                      "set resources.gpu: 0 (with device: auto or cpu), or run on a cluster with GPUs (--address)")
    elif want["gpu"] > max((node.get("GPU", 0) for node in nodes), default=0):
        errors.append(f"resources.gpu: {want['gpu']:g} GPUs per trial but no node has that many; "
                      "ask for at most the GPUs of one node")
    most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    if want["cpu"] > most_cpus:
        errors.append(f"resources.cpu: {want['cpu']:g} CPUs per trial but the largest node has {most_cpus:g}; "
                      f"set resources.cpu to at most {most_cpus:g}")
    most_gib = max((node.get("memory", 0) for node in nodes), default=0) / 2**30
    if want.get("memory") and want["memory"] > most_gib:  # Tune would wait for such a node forever, silently
        errors.append(f"resources.memory: {want['memory']:g} GiB per trial but the largest node offers Ray "
                      f"{most_gib:.1f} GiB; set resources.memory to at most {most_gib:.1f}")
    if errors:
        raise SpecError(errors)


# --- storage and MLflow --------------------------------------------------------------------------------------


def resolve_storage(storage: str | None) -> str:
    """The absolute storage folder (default ./sweep_results); Ray needs it absolute."""
    path = storage or DEFAULT_STORAGE
    if "://" in path:
        raise InputError(f"--storage: {path!r} is a URI; base models are shared through a file lock, so give a "
                         "folder (on a cluster, one that every node mounts, such as an NFS path)")
    return str(Path(path).expanduser().resolve())


def cache_dir(storage: str, name: str) -> str:
    """Where a sweep's trials share their base models: <storage>/<name>/bases."""
    return os.path.join(storage, name, "bases")


def new_launch_path(storage: str, name: str) -> str:
    """Each launch has its own Tune folder, <storage>/<name>/launches/<time>-<random>: overlapping launches of one
    spec never write into each other's Tune state."""
    launch = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return os.path.join(storage, name, "launches", launch)
