"""Failures for real: a trial that crashes mid-fine-tune, a driver killed with SIGKILL, a node lost mid-sweep, and a
pruning config that would empty every layer. Each ends with exactly one FINISHED MLflow run per config.

Real Ray (local on loopback; a 2-node `ray.cluster_utils.Cluster`), real MLflow (sqlite), real tiny trials (digits,
small_cnn). Every wait is a bounded polling loop and every test has a timeout.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import ray
from conftest import two_node_cluster
from mlflow.tracking import MlflowClient

from sweep.config.spec import load_spec
from sweep.driver.launch import run_sweep
from sweep.store import claims, tracking

pytestmark = pytest.mark.e2e  # starts Ray and runs real sweeps (`-m 'not e2e'` leaves them out)

REPO = Path(__file__).resolve().parents[1]

SPEC = """
name: {name}
dataset: {{name: digits, limit: {limit}}}
model: {{name: small_cnn}}
base: {{epochs: 1, batch_size: 32}}
finetune: {{epochs: {epochs}, batch_size: {batch}}}
measure: {{batch_size: 1, warmup: 1, runs: 2}}
resources: {{cpu: 1}}
max_failures: {max_failures}
{extra}
"""


def write_spec(folder: Path, name: str, extra: str, epochs: int = 3, limit: int = 200, batch: int = 32,
               max_failures: int = 1) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, epochs=epochs, limit=limit, batch=batch, max_failures=max_failures,
                                extra=extra), encoding="utf-8")
    return path


def runs_by_config(uri: str, name: str) -> dict[str, list]:
    """config_hash -> the experiment's trial runs of that config."""
    grouped: dict[str, list] = {}
    for run in tracking.child_runs(MlflowClient(uri), name):
        grouped.setdefault(run.data.tags["config_hash"], []).append(run)
    return grouped


def steps(uri: str, run_id: str, metric: str = "val_accuracy") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, metric))


def assert_one_finished_run_per_config(uri: str, spec) -> dict[str, object]:
    grouped = runs_by_config(uri, spec.name)
    expected = {tracking.config_hash(c) for c in spec.grid_configs()}
    assert set(grouped) == expected
    assert {h: [r.info.status for r in runs] for h, runs in grouped.items()} == {h: ["FINISHED"] for h in expected}
    return {h: runs[0] for h, runs in grouped.items()}


def wait_for(condition, what: str, seconds: float, every: float = 0.5):
    """Poll condition() until it returns something truthy; fail after `seconds` (a bounded loop, never a hang)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")


# --- a trial fails -------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_failed_trial_is_retried_from_its_checkpoint_in_its_own_run(local_ray, tmp_path, sqlite_uri, fail_once):
    uri = sqlite_uri
    # Both trials crash at the start of fine-tune epoch 2 on their first attempt (after epoch 1's checkpoint).
    # One also asks to prune 99 % of every layer: the pruner keeps min_channels per layer and the head whole.
    path = write_spec(tmp_path, "retried", max_failures=1, extra="""
checkpoint_every_s: 0
prune: {strategy: l1, min_channels: 2}
space:
  ratio: {grid: [0.5, 0.99]}
""")
    spec = load_spec(path)
    outcome = run_sweep(spec, tracking_uri=uri, storage=str(tmp_path / "results"), verbose=0,
                        on_epoch=fail_once(2))
    assert (outcome.ran, outcome.failed, outcome.interrupted) == (2, 0, 0)
    assert list(outcome.results["status"]) == ["FINISHED", "FINISHED"]

    client = MlflowClient(uri)
    runs = assert_one_finished_run_per_config(uri, spec)
    for run in runs.values():
        # Epoch 1 from the first attempt, 2 and 3 from the retry, which resumed from the epoch-1 checkpoint:
        # every epoch exactly once, nothing of the failed attempt counted twice.
        assert steps(uri, run.info.run_id) == [1, 2, 3]
        assert steps(uri, run.info.run_id, "train_loss") == [1, 2, 3]
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id

    # Tune saw each trial fail once and restored it (its error file records the injected fault).
    errors = sorted(Path(outcome.storage).glob("trial_*/error.txt"))
    assert len(errors) == 2 and all("injected failure in epoch 2" in e.read_text() for e in errors)

    # ratio 0.99 with min_channels 2: clamped, not crashed; every layer keeps 2 channels, the head all 10 outputs.
    [extreme] = [r for r in runs.values() if float(r.data.params["ratio"]) == 0.99]
    table = Path(client.download_artifacts(extreme.info.run_id, "channels.csv", str(tmp_path))).read_text()
    rows = [line.split(",") for line in table.strip().splitlines()[1:]]
    after = {layer: int(count) for layer, _, _, count in rows}
    assert after and min(after.values()) >= 2, after
    assert 0 < extreme.data.metrics["flops_reduction"] < 1 and 0 <= extreme.data.metrics["test_accuracy"] <= 1


# --- the driver is killed ---------------------------------------------------------------------------------------


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment carries marker: the driver and everything it (and Ray) started."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _kill_all(marker: str) -> None:
    for _ in range(20):  # bounded: Ray's processes may still be starting workers
        pids = _processes_with(marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@pytest.fixture
def driver_env(tmp_path):
    """Environment for `sweep run` subprocesses, tagged so that every process they start can be found and killed."""
    marker = f"SWEEP_TEST_DRIVER={uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), marker.split("=")[0]: marker.split("=")[1]}
    env.pop("MLFLOW_RUN_ID", None)
    yield env
    _kill_all(marker)
    subprocess.run(["rm", "-rf", ray_tmp], check=False)


def _sweep(args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", *args], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _one_trial_mid_fine_tune(tmp_path: Path, env: dict, uri: str, name: str, epochs: int):
    """`sweep run` of one long trial, returned once the trial has logged an epoch: (spec, args, log, driver)."""
    path = write_spec(tmp_path, name, epochs=epochs, limit=1000, batch=16,
                      extra="checkpoint_every_s: 0\nspace:\n  strategy: {grid: [l1]}\n")
    spec = load_spec(path)
    args = [str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet"]
    log = tmp_path / "driver.log"
    driver = _sweep(args, env, tmp_path, log)
    wait_for(lambda: [r for rs in runs_by_config(uri, spec.name).values() for r in rs
                      if r.info.status == "RUNNING" and steps(uri, r.info.run_id)],
             "a trial mid-fine-tune", seconds=150, every=0.3)
    return spec, args, log, driver


class TestKilledDriver:
    """A driver killed with SIGKILL, then resumed, relaunched, or still alive: a test class of its own, so that the
    two test processes each take part of this module's minutes (they schedule a module or a class at a time)."""

    @pytest.mark.timeout(300)
    def test_killed_driver_resumes_without_rerunning_finished_trials(self, tmp_path, driver_env, sqlite_uri):
        uri = sqlite_uri  # created beforehand: polling a store while the driver creates its schema would race it
        # Short trials (1 epoch) finish while long ones (8 epochs on all of digits) still run when the driver dies.
        path = write_spec(tmp_path, "killed", limit=1000, batch=16, max_failures=1, extra="""
checkpoint_every_s: 0
space:
  strategy: {grid: [l1, random]}
  finetune.epochs: {grid: [1, 8]}
""")
        spec = load_spec(path)
        args = [str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet"]
        log = tmp_path / "driver.log"
        driver = _sweep(args, driver_env, tmp_path, log)

        def mid_sweep():
            if driver.poll() is not None:
                pytest.fail(f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}")
            runs = [r for rs in runs_by_config(uri, spec.name).values() for r in rs]
            finished = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING" and steps(uri, r.info.run_id)]
            return (finished, running) if finished and running else None

        finished, running = wait_for(mid_sweep, "one finished trial and one mid-fine-tune", seconds=150, every=0.3)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's whole session: no cleanup, no `finally`
        driver.wait(timeout=30)
        _kill_all(next(k + "=" + v for k, v in driver_env.items() if k == "SWEEP_TEST_DRIVER"))
        logged = {r.info.run_id: steps(uri, r.info.run_id) for r in tracking.child_runs(MlflowClient(uri), spec.name)}

        resumed = _sweep([*args, "--resume"], driver_env, tmp_path, log)
        assert resumed.wait(timeout=200) == 0, log.read_text()[-3000:]
        assert "resuming the sweep" in log.read_text()

        runs = assert_one_finished_run_per_config(uri, spec)
        by_id = {r.info.run_id: r for r in runs.values()}
        for run in finished:  # not re-run: the same run, untouched
            assert run.info.run_id in by_id and by_id[run.info.run_id].info.end_time == run.info.end_time
            assert steps(uri, run.info.run_id) == logged[run.info.run_id]
        for run in running:  # resumed from its checkpoint in its own run
            assert run.info.run_id in by_id, "an interrupted trial started a new MLflow run"
            epochs = int(run.data.params["finetune.epochs"])
            history = Counter(steps(uri, run.info.run_id))
            assert set(history) == set(range(1, epochs + 1))
            # Each epoch once in the run's history, also the one in flight when the driver died.
            assert all(count == 1 for count in history.values()), history
        parents = tracking.all_runs(MlflowClient(uri), tracking.find_experiment_id(MlflowClient(uri), spec.name),
                                    "tags.`sweep.role` = 'parent'")
        assert [p.info.status for p in parents] == ["FINISHED"]  # the resumed launch closed the interrupted parent


    @pytest.mark.timeout(300)
    def test_a_new_launch_closes_a_dead_launchs_runs_and_reruns_them(self, tmp_path, driver_env, sqlite_uri):
        """Without --resume: the runs a killed driver left RUNNING are closed with the reason, then run afresh."""
        uri = sqlite_uri
        spec, args, log, driver = _one_trial_mid_fine_tune(tmp_path, driver_env, uri, "orphans", epochs=8)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        _kill_all(next(k + "=" + v for k, v in driver_env.items() if k == "SWEEP_TEST_DRIVER"))

        # at once, as a cron job restarted after a crash: whether or not the dead launch's leases lapsed while this one
        # started, it runs the config (test_claims: a launch waits out a dead launch's leases, not a live one's)
        again = _sweep(args, driver_env, tmp_path, log)
        assert again.wait(timeout=200) == 0, log.read_text()[-3000:]
        assert "closed 2 runs left RUNNING by a launch that died" in log.read_text()  # its trial and its parent
        client = MlflowClient(uri)
        experiment = tracking.find_experiment_id(client, spec.name)
        everything = tracking.all_runs(client, experiment)
        assert not [r for r in everything if r.info.status == "RUNNING"]
        dead = [r for r in everything if r.info.status in ("FAILED", "KILLED")]
        assert len(dead) == 2 and all("stopped renewing" in r.data.tags["sweep.closed_reason"] for r in dead)
        [run] = [r for r in runs_by_config(uri, spec.name).popitem()[1] if r.info.status == "FINISHED"]
        assert steps(uri, run.info.run_id) == list(range(1, 9))


    @pytest.mark.timeout(300)
    def test_resume_refuses_a_launch_whose_driver_is_alive(self, tmp_path, driver_env, sqlite_uri):
        """`--resume` in a second terminal while the first driver still runs: refused once the lease is seen renewed
        (two drivers would share one Tune folder and close each other's runs); the first launch is left as it was."""
        uri = sqlite_uri
        spec, args, log, driver = _one_trial_mid_fine_tune(tmp_path, driver_env, uri, "alive", epochs=500)
        second = subprocess.run([sys.executable, "-m", "sweep.cli", "run", *args, "--resume"], env=driver_env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"--resume: sweep {spec.name} is running in another process" in second.stderr
        assert driver.poll() is None, log.read_text()[-3000:]
        client = MlflowClient(uri)
        everything = tracking.all_runs(client, tracking.find_experiment_id(client, spec.name))
        assert sorted(r.info.status for r in everything) == ["RUNNING", "RUNNING"]  # its parent and its trial
        assert len({r.data.tags[claims.OWNER_TAG].split("/")[0] for r in everything}) == 1  # nobody took them over
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)


@pytest.mark.timeout(360)
def test_overlapping_launches_run_each_config_once(tmp_path, driver_env, sqlite_uri):
    """A nightly job still running when the next one starts: two launches of one spec, 5 s apart, one store."""
    uri = sqlite_uri
    path = write_spec(tmp_path, "overlap", epochs=3, extra="space:\n  strategy: {grid: [l1, random]}\n"
                                                      "  ratio: {grid: [0.3, 0.6]}\n")
    spec = load_spec(path)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    launches = []
    for i, log in enumerate(logs):
        launches.append(_sweep([str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet"],
                               driver_env, tmp_path, log))
        if i == 0:
            time.sleep(5)
    codes = [launch.wait(timeout=300) for launch in launches]
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    runs = assert_one_finished_run_per_config(uri, spec)
    for run in runs.values():
        history = steps(uri, run.info.run_id)
        assert history == sorted(set(history)) == [1, 2, 3]
    client = MlflowClient(uri)
    everything = tracking.all_runs(client, tracking.find_experiment_id(client, spec.name))
    assert not [r for r in everything if r.info.status == "RUNNING"]
    # Both launches ran, and between them every config exactly once: what one ran, the other skipped or left.
    text = "\n".join(log.read_text() for log in logs)
    ran = sum(int(n) for n in re.findall(r"(\d+) trials ran", text))
    assert ran == len(spec.grid_configs()), text[-2000:]


@pytest.mark.timeout(300)
def test_one_config_drawn_twice_in_one_launch_runs_once(tmp_path, driver_env, sqlite_uri):
    """A random search may draw the same config for two trials that run at once: each Tune trial claims under an
    owner of its own, so the second finds the first's claim and waits for its result or leaves it, never trains
    the same run beside it."""
    uri = sqlite_uri
    path = write_spec(tmp_path, "twice", epochs=3, extra="""
search: {algorithm: random, num_samples: 2}
space:
  strategy: {choice: [l1]}
""")
    spec = load_spec(path)
    log = tmp_path / "driver.log"
    driver = _sweep([str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet"],
                    driver_env, tmp_path, log)
    assert driver.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert re.search(r"1 trials ran, (1 skipped|0 skipped .*1 left to another trial)", text), text[-2000:]

    [(_, [run])] = runs_by_config(uri, spec.name).items()
    assert run.info.status == "FINISHED"
    assert steps(uri, run.info.run_id) == [1, 2, 3]
    owner, trial = run.data.tags["sweep.owner"], run.data.tags["ray.trial"]
    assert trial and owner.endswith("/" + trial)  # the Tune trial's id, not one id for the whole launch


# --- a node is lost ----------------------------------------------------------------------------------------------


@pytest.fixture
def two_nodes(own_ray):
    with two_node_cluster() as nodes:
        yield nodes


def lose_worker_mid_trial(cluster, worker, spec, uri: str, storage: str, wait_s: float):
    """Run a two-trial sweep in the background, remove the worker node once a trial there has logged an epoch, and
    wait for the sweep to finish both trials anyway; the trial run that was on the lost node."""
    outcome: dict = {}

    def sweep():
        try:
            outcome["value"] = run_sweep(spec, tracking_uri=uri, storage=storage, verbose=0)
        except BaseException as error:  # surfaced by the assertions below
            outcome["error"] = error

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()

    def on_worker():
        if not thread.is_alive():
            pytest.fail(f"the sweep ended before the node was removed: {outcome}")
        runs = [r for rs in runs_by_config(uri, spec.name).values() for r in rs]
        return [r for r in runs if r.data.tags.get("ray.node_id") == worker.node_id and steps(uri, r.info.run_id)]

    [victim] = wait_for(on_worker, "a trial mid-fine-tune on the worker node", seconds=wait_s)
    cluster.remove_node(worker)  # its disk goes with it: the trial continues from what its storage holds
    thread.join(timeout=240)
    assert not thread.is_alive(), "the sweep did not finish after the node was removed"
    assert "error" not in outcome, outcome.get("error")
    assert (outcome["value"].ran, outcome["value"].failed) == (2, 0)
    return victim


@pytest.mark.timeout(300)
def test_lost_node_trials_finish_on_the_remaining_node(two_nodes, tmp_path, sqlite_uri):
    uri = sqlite_uri
    cluster, worker = two_nodes
    path = write_spec(tmp_path, "lost_node", epochs=6, limit=1000, batch=16, max_failures=2, extra="""
checkpoint_every_s: 0
space:
  strategy: {grid: [l1, random]}
""")
    spec = load_spec(path)
    victim = lose_worker_mid_trial(cluster, worker, spec, uri, str(tmp_path / "results"), wait_s=150)

    runs = assert_one_finished_run_per_config(uri, spec)
    head = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert worker.node_id not in head
    rerun = next(r for r in runs.values() if r.info.run_id == victim.info.run_id)  # its own run, continued
    assert rerun.data.tags["ray.node_id"] in head  # ...on the node that is left
    assert set(steps(uri, rerun.info.run_id)) == set(range(1, 7))
