"""`resources.process: fork`: a node's trials are forked from one process that imported torch and sweep once.

Ray Tune runs each trial in its own worker process, and a process that imports what a trial imports holds about
0.6 GiB before it touches a tensor (torch's relocated libraries, torchvision, MLflow, Tune). Under `fork` each node
gets one zygote actor that pays for those imports once and maps the node's shared datasets; a trial's Tune worker
(which imports Ray alone) asks it for a forked child and relays between the two:

    Tune worker (forked_trial)  <-- AF_UNIX socket, pickled messages -->  child of the zygote (run_trial)
      tune.report(metrics, checkpoint)  <--  ("report", metrics, dir)  <--  each epoch; blocks until the reply
      ("ack",) or ("stop",) -->                                              ("stop",): Tune stopped the trial
                                        <--  ("done",) | ("error", traceback)

The child shares the zygote's pages copy-on-write; it never touches Ray (a forked Ray worker must not: its threads
stayed behind), so its data comes from the zygote, already mapped, and its reports go through the Tune worker. Each
trial still has a process of its own: its own RNG and torch threads, and a crash takes only that trial down.

Fate: the child dies with its Tune worker (it exits on its socket's EOF, within a second; the retry, which Tune
starts only after it saw the worker die, reclaims the run under the same owner id, as a retried worker would); the
Tune worker fails when its child dies, and Tune retries the trial from its last checkpoint; a zygote that dies takes
no running trial with it (its children need it no more), and the next trial on the node starts a new one. The
zygotes are detached actors named after the launch; the driver kills them when the sweep ends, and one left by a
driver that died ends itself after `_IDLE_S` without a trial.

This module imports no torch: it is what the Tune workers import.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

_PREFIX = "sweep-fork"
_NAMESPACE = "sweep"
_CONNECT_S = 60.0  # a forked child connects at once; this bounds one stuck before it could
_STOP_S = 120.0  # a stopped trial's child writes what it recorded before it ends
_IDLE_S = 300.0  # a zygote with no trial for this long ends itself: its driver may have died without killing it
_ENV = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")  # what Ray set for this trial's slot


class TrialProcessError(RuntimeError):
    """The trial failed in its forked process (the message carries the child's traceback) or the process died."""


def zygote_name(launch_id: str, node_id: str) -> str:
    return f"{_PREFIX}-{launch_id}-{node_id}"


def forked_trial(config: dict, context: list, launch_id: str, shared: dict) -> None:
    """The Tune trainable under `resources.process: fork` (config as in sweep.trial.sweep_trial). `context` is
    [ObjectRef of the SweepContext]: in a list, Ray hands the ref over unopened, and only the zygote opens it
    (here it would import torch)."""
    import ray
    from ray import tune

    from .progress import quiet_ray_logs
    from .raycompat import allow_stopped_trials_to_record

    quiet_ray_logs()
    allow_stopped_trials_to_record()
    work = tempfile.mkdtemp(prefix="sweep-fork-")  # 0700: only this user reaches the socket
    try:
        restored = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            restored = os.path.join(work, "restored")
            checkpoint.to_directory(restored)
        address = os.path.join(work, "socket")
        node = ray.get_runtime_context().get_node_id()
        # SWEEP_TRIAL_ID: the trial's claim owner; SWEEP_TUNE_WORKER_PID: whom the child reports through (what a
        # fault test kills)
        env = {k: os.environ[k] for k in _ENV if k in os.environ} | {
            "SWEEP_NODE_ID": node, "SWEEP_TRIAL_ID": tune.get_context().get_trial_id(),
            "SWEEP_TUNE_WORKER_PID": str(os.getpid())}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(address)
            server.listen(1)
            for attempt in range(2):  # a zygote that just ended itself (idle) gives way to a new one
                try:
                    pid = ray.get(_zygote(launch_id, node).fork.remote(config["trial"], context, shared,
                                                                       restored, address, env))
                    break
                except ray.exceptions.RayActorError:
                    if attempt:
                        raise
            conn = _accept(server, pid)
        with conn:
            _relay(conn, pid, tune)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def start_zygotes(launch_id: str) -> None:
    """Start a zygote on every node now (driver side), so that its imports overlap the Tune workers' start; a node
    that joins later gets one from its first trial."""
    import ray

    for node in ray.nodes():
        if node["Alive"] and node["Resources"].get("CPU"):
            _zygote(launch_id, node["NodeID"])


def stop_zygotes(launch_id: str) -> None:
    """Kill this launch's zygotes (driver side, when the sweep ends; their children have ended with the trials)."""
    import ray

    names = {zygote_name(launch_id, node["NodeID"]) for node in ray.nodes()}
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=_NAMESPACE))
        except ValueError:  # no zygote on that node
            continue
    deadline = time.monotonic() + 10.0  # a killed actor gives its name back shortly after: wait, bounded
    while time.monotonic() < deadline and names & {a["name"] for a in ray.util.list_named_actors(True)}:
        time.sleep(0.1)


@functools.cache
def _zygote_class() -> Any:
    import ray

    return ray.remote(num_cpus=0, max_concurrency=64)(Zygote)  # wrapped once: Ray exports a class per wrapping


def _zygote(launch_id: str, node: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # detached: the first trial on the node creates it, and it must outlive that trial; stop_zygotes ends it
    return _zygote_class().options(name=zygote_name(launch_id, node), namespace=_NAMESPACE, get_if_exists=True,
                                   lifetime="detached",
                                   scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


def _accept(server: socket.socket, pid: int) -> Connection:
    server.settimeout(1.0)
    deadline = time.monotonic() + _CONNECT_S
    while True:
        try:
            sock, _ = server.accept()
            break
        except TimeoutError:
            if not _alive(pid) or time.monotonic() > deadline:
                raise TrialProcessError(f"the trial's forked process {pid} never connected") from None
    sock.settimeout(None)
    return Connection(sock.detach())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the child runs on this node (node affinity), as this user
        return True
    except ProcessLookupError:
        return False


def _relay(conn: Connection, pid: int, tune: Any) -> None:
    while True:
        try:
            kind, *body = conn.recv()
        except (EOFError, OSError):
            raise TrialProcessError(f"the trial's forked process {pid} died (killed, or out of memory); Tune "
                                    "retries it from its last checkpoint") from None
        if kind == "done":
            return
        if kind == "error":
            raise TrialProcessError(f"the trial failed in its forked process {pid}:\n{body[0]}")
        metrics, directory = body
        try:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)
        except BaseException:  # Tune stopped the trial inside report (ASHA): the child records that, then ends
            conn.send(("stop",))
            deadline = time.monotonic() + _STOP_S
            while time.monotonic() < deadline and conn.poll(max(0.0, deadline - time.monotonic())):
                try:
                    if conn.recv()[0] in ("done", "error"):
                        break
                except (EOFError, OSError):
                    break
            raise
        conn.send(("ack",))


class Zygote:
    """One per node and launch: imports what a trial imports, maps the node's shared datasets, forks trials."""

    def __init__(self) -> None:
        # CUDA must be first reached in a child, after the fork (a CUDA driver does not survive one): should
        # anything here ask whether CUDA is available, let torch answer through NVML, which starts no driver
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        from . import trial  # noqa: F401  the imports every forked trial shares

        # What a trial's first MLflow call imports lazily: 0.4 s of every forked trial otherwise (a reused worker
        # pays it once). Modules only: a store's connections must not cross a fork.
        for store in ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.tracking.rest_store"):
            with contextlib.suppress(ImportError):  # mlflow-skinny has no SQL store
                importlib.import_module(store)

        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}  # data key -> the official splits, mapped from the object store once
        self._children: set[int] = set()
        self._last_fork = time.monotonic()
        threading.Thread(target=self._reap, daemon=True).start()

    def fork(self, config: dict, context_ref: list, shared: dict, restored: str | None, address: str,
             env: dict) -> int:
        import ray

        from . import shared_data

        context = ray.get(context_ref[0])
        key = shared_data.data_key(config.get("dataset", {}))
        with self._lock:  # one fork at a time: no other thread of ours holds a lock the child would inherit
            if key in shared and key not in self._data:
                self._data[key] = shared_data.fetch(shared[key])
            official = self._data.get(key)
            sys.stdout.flush()
            sys.stderr.flush()
            gc.collect()
            gc.freeze()  # the child's collector then leaves these objects (and their pages) alone
            pid = os.fork()
            if pid == 0:
                _child(config, context, official, restored, address, env)  # never returns
            self._children.add(pid)
            self._last_fork = time.monotonic()
        return pid

    def _reap(self) -> None:
        while True:
            for pid in list(self._children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self._children.discard(pid)
            with self._lock:
                if not self._children and time.monotonic() - self._last_fork > _IDLE_S:
                    os._exit(0)  # the shared data's pages and the imports go back to the node
            time.sleep(1.0)


def _child(config: dict, context: Any, official: Any, restored: str | None, address: str, env: dict) -> None:
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):  # Ray's handlers belong to the zygote
            signal.signal(sig, signal.SIG_DFL)
        for name in _ENV:
            os.environ.pop(name, None)
        os.environ.update(env)  # before torch reaches CUDA (the zygote never did): this trial's GPUs
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        conn = Connection(sock.detach())
        threading.Thread(target=_exit_when_client_ends, args=(conn.fileno(),), daemon=True).start()

        import torch

        from .trial import run_trial

        torch.set_num_threads(max(1, int(env.get("OMP_NUM_THREADS", "1"))))

        def report(metrics: dict, directory: str | None) -> None:
            try:
                conn.send(("report", metrics, directory))
                reply = conn.recv()
            except (EOFError, OSError):
                os._exit(1)
            if reply[0] == "stop":
                raise SystemExit("stopped by the scheduler")

        try:
            run_trial(config, context, report=report, checkpoint_dir=restored, official=official)
            conn.send(("done",))
            code = 0
        except SystemExit:
            conn.send(("done",))
            code = 0
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _exit_when_client_ends(fd: int) -> None:
    """The Tune worker sends only in reply to a report: a readable socket with nothing in it is its end."""
    peek = socket.socket(fileno=os.dup(fd))
    while True:
        readable, _, _ = select.select([peek], [], [], 1.0)
        if not readable:
            continue
        try:
            if peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                os._exit(1)  # no cleanup: a retry of this trial takes its run over, as after a killed worker
        except BlockingIOError:  # the reply was read meanwhile
            continue
        time.sleep(0.2)  # a reply waits for the trial to read it
