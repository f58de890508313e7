"""Trial claims (store.claims) with real processes: racing launches claim each config once, a SIGKILLed holder's claim
is taken over after its lease lapses, renewal keeps a long claim alive, dead runs are closed with a reason.

Each racer is a separate OS process (this file run as a script), started behind a file barrier so that they hit
the store together; the stores are a real sqlite file and a real `mlflow server` on 127.0.0.1 (sqlite-backed).
Every wait is bounded by count and time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # a worker process: make the package importable exactly as the test run does
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
from mlflow.entities import ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from sweep.store import claims, tracking  # noqa: E402

HASHES = [f"cfg{i}" for i in range(int(os.environ.get("CLAIMS_TEST_HASHES", "5")))]  # more: a longer race
RACERS = 3


# --- the worker processes ---------------------------------------------------------------------------------------


def _wait_file(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {seconds} s")
        time.sleep(0.02)


def race_worker(uri: str, experiment_id: str, owner: str, folder: str, lease_s: float, hold_s: float) -> None:
    """Claim every hash in turn; hold a won claim for hold_s (the 'trial'), then finish it. Prints one JSON line."""
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)  # connect (and import the store) before the barrier
    Path(folder, f"ready-{owner}").touch()
    _wait_file(Path(folder, "go"), 120)
    out = []
    for chash in HASHES:
        result = claims.claim_trial(client, experiment_id, chash, owner,
                                    claims.child_run_creator(client, experiment_id, None, run_name=chash),
                                    lease_s=lease_s)
        if result.kind == "claimed":
            time.sleep(hold_s)
            client.log_metric(result.run_id, "work", 1.0)
            result.lease.check()
            result.lease.release("FINISHED")
        out.append({"hash": chash, "kind": result.kind, "run_id": result.run_id, "attempts": result.attempts})
    print(json.dumps(out), flush=True)


def hold_worker(uri: str, experiment_id: str, owner: str, chash: str, lease_s: float, parent: bool) -> None:
    """Claim one hash (or put a lease on a new parent run) and hold it, renewing, until killed (at most 120 s)."""
    client = MlflowClient(uri)
    if parent:
        run = client.create_run(experiment_id, tags={"sweep.role": tracking.PARENT_ROLE})
        lease = claims.Lease.acquire(client, run.info.run_id, owner, lease_s)
        run_id = run.info.run_id
    else:
        result = claims.claim_trial(client, experiment_id, chash, owner,
                                    claims.child_run_creator(client, experiment_id, None), lease_s=lease_s)
        assert result.kind == "claimed", result
        run_id, lease = result.run_id, result.lease
    print(json.dumps({"run_id": run_id}), flush=True)
    for _ in range(1200):
        time.sleep(0.1)
    lease.release("FINISHED")


# --- helpers for the tests ----------------------------------------------------------------------------------------


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _runs(uri: str, experiment_id: str, view=ViewType.ACTIVE_ONLY):
    return MlflowClient(uri).search_runs([experiment_id], run_view_type=view, max_results=1000)


def race(uri: str, tmp_path: Path, lease_s: float = 5.0, hold_s: float = 0.3) -> list[dict]:
    client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    folder = tmp_path / "barrier"
    folder.mkdir()
    owners = [f"launch{i}" for i in range(RACERS)]
    procs = [_spawn("race", uri, experiment_id, owner, str(folder), str(lease_s), str(hold_s)) for owner in owners]
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("ready-*"))) < RACERS:
            assert time.monotonic() < deadline, "racers did not start within 120 s"
            assert all(p.poll() is None for p in procs), [p.communicate(timeout=5) for p in procs]
            time.sleep(0.05)
        (folder / "go").touch()
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [row for out, _ in outputs for row in json.loads(out.strip().splitlines()[-1])]

    # Exactly one claim per config; every other launch saw it held or finished.
    claimed = Counter(r["hash"] for r in results if r["kind"] == "claimed")
    assert claimed == {h: 1 for h in HASHES}, results
    assert all(r["kind"] in ("claimed", "held", "finished") for r in results)
    # The store shows one FINISHED run per config and nothing else: no RUNNING leftovers, no yielded claims.
    active = _runs(uri, experiment_id)
    finished = sorted((r.data.tags["config_hash"], r.info.status) for r in active)
    assert finished == [(h, "FINISHED") for h in sorted(HASHES)]
    winners = {r["run_id"] for r in results if r["kind"] == "claimed"}
    assert {r.info.run_id for r in active} == winners
    # Yielded claims are deleted, ended KILLED with the reason first.
    for run in _runs(uri, experiment_id, ViewType.DELETED_ONLY):
        assert run.info.status == "KILLED"
        assert run.data.tags[claims.CLOSED_REASON_TAG].startswith("yielded to ")
    return results


# --- racing launches ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_racing_processes_claim_each_config_once_on_sqlite(sqlite_uri, tmp_path):
    results = race(sqlite_uri, tmp_path)
    print("registrations per launch and config:", sorted(r["attempts"] for r in results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(tmp_path: Path, db: Path):
    """`mlflow server` on 127.0.0.1 over a sqlite store; returns (process, uri) once /health answers (<= 120 s)."""
    port, log = _free_port(), tmp_path / "mlflow-server.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(tmp_path / "artifacts")]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=_env())
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return server, uri
        except OSError:
            time.sleep(0.3)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError(f"mlflow server not healthy after 120 s:\n{log.read_text()[-2000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.mark.slow  # about 90 s here, most of it the server starting on 2 busy cores
@pytest.mark.timeout(400)
def test_racing_processes_claim_each_config_once_through_a_tracking_server(template_db, tmp_path):
    db = tmp_path / "server.db"
    db.write_bytes(template_db.read_bytes())  # schema already there: the server starts in seconds
    server, uri = _mlflow_server(tmp_path, db)
    try:
        race(uri, tmp_path)
    finally:
        _stop(server)


# --- the interleavings the race may or may not hit, forced ------------------------------------------------------


def test_a_claim_that_sees_a_rival_after_registering_yields_and_is_deleted(sqlite_uri):
    """B registers between A's check and A's registration: A's re-check sees B, A yields (its run deleted)."""
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    plain = claims.child_run_creator(client, experiment_id, None)
    rival: dict = {}

    def interleaved(tags: dict) -> str:
        if not rival:  # B's create lands just before A's
            rival["id"] = plain(claims.claim_tags(tags["config_hash"], "B", 30))
        return plain(tags)

    a = claims.claim_trial(client, experiment_id, "cfgY", "A", interleaved, lease_s=30, backoff_s=0.01)
    assert (a.kind, a.run_id, a.attempts) == ("held", rival["id"], 1)
    [yielded] = _runs(sqlite_uri, experiment_id, ViewType.DELETED_ONLY)
    assert yielded.info.status == "KILLED"
    assert yielded.data.tags[claims.CLOSED_REASON_TAG] == f"yielded to {rival['id']}"
    assert [r.info.run_id for r in _runs(sqlite_uri, experiment_id)] == [rival["id"]]


def test_a_yielded_claim_retries_and_claims_once_the_rival_is_dead(sqlite_uri):
    """A's re-check sees C (registered at the same moment, then dead): A yields, waits for C's lease, claims."""
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    plain = claims.child_run_creator(client, experiment_id, None)
    calls: list[str] = []

    def interleaved(tags: dict) -> str:
        run_id = plain(tags)
        calls.append(run_id)
        if len(calls) == 1:  # C registers right after A and dies before renewing
            calls.append(plain(claims.claim_tags(tags["config_hash"], "C", 1.0)))
        return run_id

    a = claims.claim_trial(client, experiment_id, "cfgZ", "A", interleaved, lease_s=1.0, backoff_s=0.05, wait_s=10)
    try:
        assert a.kind == "claimed" and a.attempts == 2 and a.run_id == calls[2]
        assert a.closed == [calls[1]]  # C, dead, closed FAILED with the reason tags
        assert client.get_run(calls[1]).info.status == "FAILED"
        [yielded] = _runs(sqlite_uri, experiment_id, ViewType.DELETED_ONLY)  # A's first registration
        assert yielded.info.run_id == calls[0]
    finally:
        a.lease.release("FINISHED")


def test_two_resumers_of_one_run_never_both_proceed(sqlite_uri):
    """B writes its adopt tag on R right after A's: A's re-check sees it and A yields; B then sees A's tag gone."""
    uri = sqlite_uri
    plain_client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(plain_client, "claims")
    first = claims.claim_trial(plain_client, experiment_id, "cfgA", "old", claims.child_run_creator(
        plain_client, experiment_id, None), lease_s=1.0)
    first.lease.release("FAILED")  # the attempt crashed; two launches now resume R from its checkpoint

    class Interleaved(MlflowClient):
        def set_tag(self, run_id, key, value, *args, **kwargs):
            super().set_tag(run_id, key, value, *args, **kwargs)
            if key == claims.ADOPT_PREFIX + "A":  # B's registration lands between A's and A's re-check
                plain_client.set_tag(run_id, claims.ADOPT_PREFIX + "B", f"{time.time() + 30:.3f}")

    a = claims.claim_trial(Interleaved(uri), experiment_id, "cfgA", "A", None, lease_s=30,
                           resume_run_id=first.run_id, backoff_s=0.01)
    assert (a.kind, a.run_id, a.attempts) == ("held", first.run_id, 1)
    run = plain_client.get_run(first.run_id)
    assert claims.ADOPT_PREFIX + "A" not in run.data.tags and run.info.status == "FAILED"  # A withdrew
    # B's re-check (after A withdrew) finds no rival: B proceeds and owns R.
    runs = tracking.all_runs(plain_client, experiment_id, tracking.hash_filter("cfgA"))
    assert claims._rivals(runs, "B", time.time(), 30) == ([], [])


def test_a_forced_rerun_ignores_only_runs_finished_before_it(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    creator = claims.child_run_creator(client, experiment_id, None)
    old = claims.claim_trial(client, experiment_id, "cfgF", "earlier", creator, lease_s=5)
    old.lease.release("FINISHED")
    time.sleep(0.05)
    launch_start = time.time()
    forced = claims.claim_trial(client, experiment_id, "cfgF", "forced", creator, lease_s=5,
                                ignore_finished_before=launch_start)
    assert forced.kind == "claimed" and forced.run_id != old.run_id
    forced.lease.release("FINISHED")
    # A second forced launch that started before that rerun finished sees it: done meanwhile, not again.
    again = claims.claim_trial(client, experiment_id, "cfgF", "forced2", creator, lease_s=5,
                               ignore_finished_before=launch_start)
    assert (again.kind, again.run_id) == ("finished", forced.run_id)


# --- a holder dies -----------------------------------------------------------------------------------------------


def _started(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()  # the worker prints its run id once the claim is in the store
    assert line, proc.stderr.read()[-3000:]
    return json.loads(line)["run_id"]


def test_sigkilled_holder_is_taken_over_after_its_lease_expires(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    lease_s = 2.0
    holder = _spawn("hold", sqlite_uri, experiment_id, "doomed", "cfgK", str(lease_s), "child")
    try:
        dead_run = _started(holder)
        creator = claims.child_run_creator(client, experiment_id, None)
        held = claims.claim_trial(client, experiment_id, "cfgK", "rescuer", creator, lease_s=lease_s)
        assert (held.kind, held.run_id) == ("held", dead_run)  # alive and renewing: not ours to take
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    killed_at = time.time()
    result = claims.claim_trial(client, experiment_id, "cfgK", "rescuer", creator, lease_s=lease_s, wait_s=15)
    waited = time.time() - killed_at
    try:
        assert result.kind == "claimed" and result.run_id != dead_run
        assert result.closed == [dead_run]
        assert waited < lease_s + 5  # the lease lapsed at most lease_s after the last renewal
        dead = client.get_run(dead_run)
        assert dead.info.status == "FAILED"
        assert dead.data.tags[claims.CLOSED_BY_TAG] == "rescuer"
        reason = dead.data.tags[claims.CLOSED_REASON_TAG]
        assert reason.startswith("lease expired at ") and "owner doomed stopped renewing" in reason
    finally:
        result.lease.release("FINISHED")
    assert [r.info.status for r in _runs(sqlite_uri, experiment_id) if r.info.status == "RUNNING"] == []


def test_renewal_keeps_a_long_claim_alive(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    lease_s = 1.5
    creator = claims.child_run_creator(client, experiment_id, None)
    mine = claims.claim_trial(client, experiment_id, "cfgL", "long", creator, lease_s=lease_s)
    assert mine.kind == "claimed"
    try:
        time.sleep(4 * lease_s)  # four lease periods: without renewal it would have lapsed long ago
        other = claims.claim_trial(client, experiment_id, "cfgL", "other", creator, lease_s=lease_s)
        assert (other.kind, other.run_id) == ("held", mine.run_id)
        assert claims.close_dead_runs(client, experiment_id, lease_s=lease_s) == []
        assert mine.lease.renewals >= 8 and not mine.lease.lost.is_set()
        assert float(client.get_run(mine.run_id).data.tags[claims.LEASE_TAG]) > time.time()
    finally:
        mine.lease.release("FINISHED")
    assert client.get_run(mine.run_id).info.status == "FINISHED"


def test_close_dead_runs_closes_killed_parents_and_lease_less_runs_only(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    lease_s = 2.0
    parent = _spawn("hold", sqlite_uri, experiment_id, "driver", "-", str(lease_s), "parent")
    try:
        parent_run = _started(parent)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
    # A run from an older release: no lease tag, started 10 minutes ago, never ended.
    old = client.create_run(experiment_id, start_time=int((time.time() - 600) * 1000), tags={"config_hash": "old"})
    live = claims.claim_trial(client, experiment_id, "cfgLive", "alive",
                              claims.child_run_creator(client, experiment_id, None), lease_s=lease_s)
    try:
        time.sleep(lease_s + 0.5)
        closed = claims.close_dead_runs(client, experiment_id, closer="janitor", lease_s=lease_s)
        assert sorted(closed) == sorted([parent_run, old.info.run_id])
        assert client.get_run(parent_run).info.status == "KILLED"  # a launch that died, as an interrupted one
        assert client.get_run(old.info.run_id).info.status == "FAILED"
        assert "no lease" in client.get_run(old.info.run_id).data.tags[claims.CLOSED_REASON_TAG]
        assert client.get_run(parent_run).data.tags[claims.CLOSED_BY_TAG] == "janitor"
        assert client.get_run(live.run_id).info.status == "RUNNING"
    finally:
        live.lease.release("FINISHED")


def test_a_retry_continues_its_own_run_even_after_it_was_closed(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    lease_s = 1.0
    creator = claims.child_run_creator(client, experiment_id, None)
    first = claims.claim_trial(client, experiment_id, "cfgR", "trialA", creator, lease_s=lease_s)
    first.lease.release()  # the attempt "dies": renewal stops, the run stays RUNNING
    # The same trial's retry (same owner) continues the run at once, without waiting for the lease.
    retry = claims.claim_trial(client, experiment_id, "cfgR", "trialA", creator, lease_s=lease_s,
                               resume_run_id=first.run_id)
    assert (retry.kind, retry.run_id) == ("claimed", first.run_id)
    retry.lease.release()
    time.sleep(lease_s + 0.3)
    # Another launch closes it as dead; a later --resume from its checkpoint (another owner) reopens the same run.
    assert claims.close_dead_runs(client, experiment_id, lease_s=lease_s) == [first.run_id]
    resumed = claims.claim_trial(client, experiment_id, "cfgR", "launch2", creator, lease_s=lease_s,
                                 resume_run_id=first.run_id)
    assert (resumed.kind, resumed.run_id) == ("claimed", first.run_id)
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING" and run.data.tags[claims.OWNER_TAG] == "launch2"
    assert claims.CLOSED_REASON_TAG not in run.data.tags
    assert not any(k.startswith(claims.ADOPT_PREFIX) for k in run.data.tags)
    resumed.lease.release("FINISHED")
    assert len(_runs(sqlite_uri, experiment_id)) == 1


def test_a_launch_waits_out_a_dead_launchs_leases_but_not_a_live_ones(sqlite_uri):
    """A launch started right after another's driver died: the dead launch's parent and trial leases are waited
    out, so that its configs are closed and run again rather than found held; a live launch (renewing) is left to
    its runs after a third of a lease."""
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    lease_s = 3.0
    parents = {}
    for name in ("dead", "live"):
        parents[name] = tracking.start_parent_run(sqlite_uri, "claims", "", tags={"sweep.role": "parent"})
        parents[name + "_lease"] = claims.Lease.acquire(client, parents[name], f"launch-{name}", lease_s)
    trial = claims.claim_trial(client, experiment_id, "cfgD", "launch-dead/t1",
                               claims.child_run_creator(client, experiment_id, parents["dead"]), lease_s=lease_s)
    parents["dead_lease"].release()  # the driver dies: nothing renews its parent or its trial
    trial.lease.release()
    try:
        started = time.monotonic()
        claims.outlive_dead_launches(client, experiment_id, lease_s)
        waited = time.monotonic() - started
        assert lease_s / 3 < waited < 2 * lease_s  # until the dead leases lapsed, not a full wait on the live one
        assert sorted(claims.close_dead_runs(client, experiment_id, lease_s=lease_s)) == \
            sorted([parents["dead"], trial.run_id])
        assert client.get_run(parents["live"]).info.status == "RUNNING"
    finally:
        parents["live_lease"].release("FINISHED")


def test_a_dead_run_being_adopted_is_not_closed(sqlite_uri):
    """A --resume writes its adopt tag on a lapsed run just after a closer listed it as dead: the closer's re-read
    sees the adopter and leaves the run (closing it would fail the resumed trial at its end)."""
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    lease_s = 1.0
    first = claims.claim_trial(client, experiment_id, "cfgA", "dead", claims.child_run_creator(client, experiment_id,
                                                                                                None), lease_s=lease_s)
    first.lease.release()
    time.sleep(lease_s + 0.3)
    listed = client.get_run(first.run_id)  # what the closer's query returned
    client.set_tag(first.run_id, claims.ADOPT_PREFIX + "resumer", f"{time.time() + 30:.3f}")
    assert not claims._close(client, listed, "FAILED", "closer", "lease expired")
    assert client.get_run(first.run_id).info.status == "RUNNING"
    assert claims.close_dead_runs(client, experiment_id, lease_s=lease_s) == []


def test_a_holder_whose_run_was_taken_over_does_not_end_it(sqlite_uri):
    """A holder paused past its lease (a stopped VM) comes back and ends its trial: the run is another's by then,
    and keeps the status its new holder gives it."""
    client = MlflowClient(sqlite_uri)
    experiment_id = tracking.get_or_create_experiment(client, "claims")
    lease_s = 1.0
    creator = claims.child_run_creator(client, experiment_id, None)
    paused = claims.claim_trial(client, experiment_id, "cfgP", "paused", creator, lease_s=lease_s)
    paused.lease.release()  # the pause: no renewal, and nothing noticed yet
    time.sleep(lease_s + 0.3)
    taker = claims.claim_trial(client, experiment_id, "cfgP", "taker", creator, lease_s=lease_s,
                               resume_run_id=paused.run_id)
    assert (taker.kind, taker.run_id) == ("claimed", paused.run_id)
    paused.lease.release("FINISHED")  # back from the pause
    run = client.get_run(paused.run_id)
    assert run.info.status == "RUNNING" and run.data.tags[claims.OWNER_TAG] == "taker"
    taker.lease.release("FAILED")
    assert client.get_run(paused.run_id).info.status == "FAILED"


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "race":
        uri, experiment_id, owner, folder, lease_s, hold_s = rest
        race_worker(uri, experiment_id, owner, folder, float(lease_s), float(hold_s))
    else:
        uri, experiment_id, owner, chash, lease_s, kind = rest
        hold_worker(uri, experiment_id, owner, chash, float(lease_s), kind == "parent")
