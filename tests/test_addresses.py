"""Addresses that do not answer are said in seconds, before anything runs, and an outage of the tracking server is
said while it lasts.

Real processes and real sockets: `sweep run` as a subprocess against a port nothing listens on, the probe against a
real HTTP server on loopback, and (slow) a sweep whose real MLflow server is killed and restarted mid-training.
"""

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep.driver.progress import CompactProgress
from sweep.store import client, tracking

REPO = Path(__file__).resolve().parents[1]

SPEC = """
name: addresses
dataset: {name: digits, limit: 100}
model: {name: small_cnn}
base: {epochs: 1, batch_size: 32}
finetune: {epochs: 1, batch_size: 32}
resources: {cpu: 1}
space:
  strategy: {grid: [l1]}
"""


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sweep_run(tmp_path: Path, *args: str, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for name in ("MLFLOW_TRACKING_URI", *unset):
        env.pop(name, None)
    # 60 s: the bound, most of it this loaded machine importing torch, Ray and MLflow
    return subprocess.run([sys.executable, "-m", "sweep.cli", "run", str(spec), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_dead_ray_address_exits_2_with_one_line(tmp_path):
    address = f"127.0.0.1:{unused_port()}"
    out = sweep_run(tmp_path, "--address", address, "--connect-timeout", "2")
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"--address {address}" in lines[0] and "within 2 s" in lines[0] and "--connect-timeout" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # the store is untouched
    assert not (tmp_path / "sweep_results").exists()


def test_a_dead_tracking_server_exits_2_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{unused_port()}"
    out = sweep_run(tmp_path, "--tracking-uri", uri)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"--tracking-uri {uri}" in lines[0] and "no MLflow server answered" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "sweep_results").exists()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 -- the name http.server calls
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _progress(uri: str) -> CompactProgress:
    return CompactProgress("val_accuracy", "max", lambda config: "", outage=lambda: client.down_for(uri))


def test_the_progress_line_says_while_the_tracking_server_is_unreachable(health_server):
    dead = f"http://127.0.0.1:{unused_port()}"
    with client.ServerWatch(dead, every_s=0.2, timeout=1.0):
        wait = threading.Event()
        for _ in range(50):  # bounded: the first probe fails at once (connection refused)
            if client.down_for(dead) is not None:
                break
            wait.wait(0.1)
        line, state = _progress(dead).line([])
        assert "tracking server unreachable for" in line and "retrying" in line
        assert "tracking server unreachable" in state  # the outage starting is a change worth a line in a log
    assert client.down_for(dead) is None  # the watch ended with the sweep

    with client.ServerWatch(health_server, every_s=0.2, timeout=1.0):
        threading.Event().wait(0.5)  # a few probes, all answered
        assert client.down_for(health_server) is None
        assert "unreachable" not in _progress(health_server).line([])[0]


# --- a real server goes away mid-sweep -----------------------------------------------------------------------------


def start_mlflow_server(tmp_path: Path, db: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over a sqlite store, returned once /health answers (at most 120 s)."""
    log = open(tmp_path / f"mlflow-server-{port}.log", "ab")
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(tmp_path / "artifacts")]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    deadline = time.monotonic() + 120
    while client.probe(f"http://127.0.0.1:{port}", timeout=2) is not None:
        assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    return server


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn worker: an outage, not a shutdown
    server.wait(timeout=30)


OUTAGE_SPEC = """
name: outage
dataset: {name: digits, limit: 1000}
model: {name: small_cnn}
base: {epochs: 1, batch_size: 32}
finetune: {epochs: 6, batch_size: 16}
checkpoint_every_s: 0
resources: {cpu: 1}
space:
  strategy: {grid: [l1]}
"""


@pytest.mark.slow  # two server starts and a sweep: minutes on 2 busy cores (the progress line itself: above, fast)
@pytest.mark.timeout(500)
def test_a_tracking_server_outage_mid_sweep_is_said_and_ridden_out(tmp_path, template_db):
    db = tmp_path / "server.db"
    db.write_bytes(template_db.read_bytes())  # schema already there: the server starts in seconds
    port = unused_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, db, port)
    spec = tmp_path / "spec.yaml"
    spec.write_text(OUTAGE_SPEC, encoding="utf-8")
    log = tmp_path / "driver.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(spec), "--tracking-uri", uri,
                                   "--storage", str(tmp_path / "results")], cwd=tmp_path, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        while "1 running" not in log.read_text(errors="replace"):  # a trial is training
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        stop(server)
        deadline = time.monotonic() + 60
        while "tracking server unreachable for" not in log.read_text(errors="replace"):
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        server = start_mlflow_server(tmp_path, db, port)
        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        stop(server)
    text = log.read_text(errors="replace")
    assert "View run" not in text and "View experiment" not in text  # MLflow's chatter stays out of the display
    runs = tracking.child_runs(MlflowClient(f"sqlite:///{db}"), "outage")
    assert [r.info.status for r in runs] == ["FINISHED"]


# --- a cluster that wants a token ----------------------------------------------------------------------------------

TOKEN_HEAD = """
import os, sys, time
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
print(cluster.address, flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # a Ray head starting, then Ray's own 20 s of retries before it gives up: about a minute here
@pytest.mark.timeout(300)
def test_a_cluster_that_wants_a_token_the_driver_lacks_exits_2_naming_the_variable(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(ray_tmp),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    head = subprocess.Popen([sys.executable, "-c", TOKEN_HEAD], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        address = head.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        out = sweep_run(tmp_path, "--address", address, unset=("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"))  # no token
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and the Ray processes it started, in its session
        head.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # Ray's retry warnings held back
    assert f"--address {address}" in lines[0] and "RAY_AUTH_MODE=token" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()
