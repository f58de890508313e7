"""Eight trials logging every batch at once lose no metric point and raise no 'database is locked', on the embedded
sqlite store and on an MLflow tracking server backed by PostgreSQL (what a cluster uses).

Each writer is a separate process (spawned, like a Ray worker) that creates its trial run with
`tracking.TrialRun.create`
and logs the loss of every batch of a real (tiny) training loop. All eight start logging together, behind a barrier.
The PostgreSQL server and the MLflow server are throwaway processes on 127.0.0.1 started by the test; the server
case is skipped, saying why, where PostgreSQL is not installed (`.ci/run` installs Debian's postgresql).
"""

import glob
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep.store import tracking

WRITERS = 8
BATCHES = 100
EXPERIMENT = "concurrency"


def writer(uri: str, index: int, barrier, results) -> None:
    """One trial: open its run, fit a line by SGD for BATCHES batches, log each batch's loss, finish.

    Plain Python rather than torch: the point is the logging, and eight torch imports on two cores cost more than
    the whole test should.
    """
    try:
        config = {"name": EXPERIMENT, "seed": index, "model": {"name": "line"}, "prune": {"ratio": 0.5}}
        run = tracking.TrialRun.create(uri, EXPERIMENT, None, config)
        rng = random.Random(index)
        weight, bias = 0.0, 0.0
        barrier.wait(timeout=120)  # everyone writes at the same moment
        for step in range(BATCHES):
            batch = [(x, 3 * x + 1 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(32))]
            errors = [(weight * x + bias - y, x) for x, y in batch]
            loss = sum(e * e for e, _ in errors) / len(batch)
            weight -= 0.1 * sum(2 * e * x for e, x in errors) / len(batch)
            bias -= 0.1 * sum(2 * e for e, _ in errors) / len(batch)
            run.log_points([("batch_loss", step, loss), ("batch", step, step)])
        run.finish("FINISHED")
        results.put((index, run.run_id, None))
    except BaseException as error:  # reported to the test, which fails on it
        results.put((index, None, f"{type(error).__name__}: {error}"))


def run_writers(uri: str) -> dict[int, str]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(WRITERS), context.Queue()
    processes = [context.Process(target=writer, args=(uri, i, barrier, results)) for i in range(WRITERS)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    errors = [f"writer {i}: {error}" for i, _, error in outcomes if error]
    assert not errors, errors
    return {i: run_id for i, run_id, _ in outcomes}


def assert_every_point_recorded(uri: str, run_ids: dict[int, str]) -> None:
    client = MlflowClient(uri)
    assert len(set(run_ids.values())) == WRITERS
    for run_id in run_ids.values():
        for metric in ("batch_loss", "batch"):
            history = client.get_metric_history(run_id, metric)
            assert sorted(m.step for m in history) == list(range(BATCHES)), (run_id, metric, len(history))
        assert client.get_run(run_id).info.status == "FINISHED"
    runs = tracking.child_runs(client, EXPERIMENT)
    assert len(runs) == WRITERS


@pytest.mark.timeout(300)
def test_eight_writers_on_sqlite(sqlite_uri, capfd):
    run_ids = run_writers(sqlite_uri)
    assert_every_point_recorded(sqlite_uri, run_ids)
    assert "database is locked" not in capfd.readouterr().err  # not even as a logged warning


# --- a throwaway PostgreSQL and MLflow server on loopback ---------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder holding initdb and postgres: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: run it as the postgres user then."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    return [runuser, "-u", "postgres", "--"]


def wait_until(check, what: str, seconds: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what}: the process exited ({process.returncode}):\n{log.read_text()[-2000:]}")
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"{what}: not ready after {seconds:.0f} s:\n{log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def postgres():
    """A fresh PostgreSQL cluster listening on 127.0.0.1 only; yields its SQLAlchemy URI for a database 'mlflow'."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                    "`.ci/run` installs it with apt-get; the sqlite case still ran")
    pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[test]' installs it")
    user = as_postgres_user()
    # Not under pytest's tmp_path: that is private to root, and the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    if user:
        shutil.chown(root, "postgres", "postgres")
    data, sockets, log = root / "data", root / "sockets", root / "postgres.log"
    init = subprocess.run([*user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                           "--no-sync"], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    (sockets).mkdir()
    if user:
        shutil.chown(sockets, "postgres", "postgres")
    port = free_port()
    with open(log, "wb") as out:
        server = subprocess.Popen([*user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                                   "-c", "listen_addresses=127.0.0.1", "-k", str(sockets), "-c", "fsync=off"],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        import psycopg2

        def accepting() -> bool:
            try:
                psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres").close()
                return True
            except psycopg2.OperationalError:
                return False

        wait_until(accepting, "PostgreSQL", 60, server, log)
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"  # SQLAlchemy 2.1 defaults to psycopg 3
    finally:
        stop(server)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` on 127.0.0.1 with the PostgreSQL backend store; yields its http URI."""
    port, log = free_port(), tmp_path / "mlflow-server.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
               "--backend-store-uri", postgres, "--artifacts-destination", str(tmp_path / "artifacts")]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, "mlflow server", 120, server, log)  # creates the schema in PostgreSQL first
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)  # the server and its worker processes
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait(timeout=10)


# slow (about 60 s with the servers' start and stop): the suite's 10 minutes; the writers' side is the sqlite test's
# above, and the default suite reaches a tracking server in test_addresses (a dead one) and test_mlflow_ui
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_writers_on_a_postgres_backed_tracking_server(mlflow_server, capfd):
    tracking.init_store(mlflow_server)
    run_ids = run_writers(mlflow_server)
    assert_every_point_recorded(mlflow_server, run_ids)
    err = capfd.readouterr().err
    assert "database is locked" not in err and "Traceback" not in err
