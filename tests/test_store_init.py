"""Two launches at once on a fresh sqlite store: neither dies while MLflow creates the schema (tracking.init_store).

Without the lock beside the database, one of two processes started together fails in alembic ("Online migration
expected to match one row when updating ... in 'alembic_version'; 0 found"): it happened on 2 of 2 tries here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402


def launch(uri: str, folder: str, name: str) -> None:
    """What a launch does first: init the store, then write to it."""
    from mlflow.tracking import MlflowClient

    from sweep.store import tracking

    Path(folder, f"ready-{name}").touch()
    deadline = time.monotonic() + 120
    while not Path(folder, "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no go")
        time.sleep(0.01)
    tracking.init_store(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(client, "init-race")
    run = client.create_run(experiment_id, tags={"launch": name})
    client.set_terminated(run.info.run_id)
    print("ok", flush=True)


@pytest.mark.timeout(300)
def test_two_launches_on_a_fresh_sqlite_store_both_start(tmp_path):
    db = tmp_path / "fresh" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen([sys.executable, __file__, uri, str(tmp_path), name], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for name in ("a", "b")]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < 2:  # both imported, both about to open the store
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.strip() == "ok", err[-3000:]
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("init-race").experiment_id])
    assert sorted(r.data.tags["launch"] for r in runs) == ["a", "b"]
    assert Path(str(db) + ".lock").exists()


if __name__ == "__main__":
    launch(*sys.argv[1:])
