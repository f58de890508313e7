"""`--storage s3://...`: Tune's state, checkpoints and the shared base network in a bucket, not a folder.

A real S3 API on loopback (moto's server), reached through the standard AWS variables (AWS_ENDPOINT_URL and dummy
credentials) as a real bucket would be; real Ray (a `sweep run` subprocess on a local Ray, and a two-node
`ray.cluster_utils.Cluster`), real MLflow (sqlite), real tiny trials (digits, small_cnn). And `cluster.yaml`, which
runs sweeps on a bucket: valid for Ray's cluster launcher, its storage and its nodes' credentials as its docs say.
"""

import logging
import os
import re
import shutil
import signal
import tempfile
import uuid
from collections import Counter

import pytest
from conftest import two_node_cluster
from mlflow.tracking import MlflowClient
from test_reliability import (
    REPO,
    _kill_all,
    _sweep,
    assert_one_finished_run_per_config,
    lose_worker_mid_trial,
    runs_by_config,
    steps,
    wait_for,
    write_spec,
)

from sweep.config.spec import load_spec
from sweep.store import claims, tracking
from sweep.worker.base import BASES_EXPERIMENT

BUCKET = "sweeps"


@pytest.fixture
def bucket(monkeypatch):
    """An empty bucket on a loopback S3 server; the AWS variables point this process and its children at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    try:
        yield s3
    finally:
        server.stop()


def keys(s3, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def assert_in_bucket(s3, uri: str, spec, runs: dict) -> None:
    """One base object, trained once (one claim run, FINISHED) and read by every trial; the trials' checkpoints
    and Tune's state under the launch folder."""
    objects = keys(s3, f"runs/{spec.name}/")
    [key] = {r.data.tags["base_key"] for r in runs.values()}  # every trial of the sweep needs the same base
    assert [k for k in objects if k.endswith("/base.pt")] == [f"runs/{spec.name}/bases/{key}/base.pt"]
    # trained once: one claim on the key, FINISHED (a run's base_cache tag is its last attempt's, so a retried
    # trial that trained the base says "hit" the second time)
    client = MlflowClient(uri)
    claim_runs = tracking.all_runs(client, tracking.find_experiment_id(client, BASES_EXPERIMENT.format(spec.name)))
    assert [(r.info.status, r.data.tags["base_key"]) for r in claim_runs] == [("FINISHED", key)]
    assert any("/checkpoint_" in k and k.endswith("/trial.pt") for k in objects), objects
    assert any(k.rsplit("/", 1)[-1].startswith("experiment_state-") for k in objects), objects


@pytest.fixture
def driver_env(tmp_path, bucket):
    """`sweep run` subprocess environment (the AWS variables included), tagged so its processes can be killed."""
    marker = f"SWEEP_TEST_DRIVER={uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), marker.split("=")[0]: marker.split("=")[1]}
    env.pop("MLFLOW_RUN_ID", None)
    yield env
    _kill_all(marker)
    shutil.rmtree(ray_tmp, ignore_errors=True)


# slow: the resume path is the one test_reliability's killed-driver test takes on a folder, and the bucket's own
# part (checkpoints read back from S3) is in the default suite's lost-node test below
@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_sweep_on_s3_survives_its_driver_killed_and_resumes_from_the_bucket(tmp_path, bucket, driver_env,
                                                                                sqlite_uri):
    uri = sqlite_uri
    # one trial, long enough to be killed mid-fine-tune (base sharing by several trials: the two-node test)
    path = write_spec(tmp_path, "on_s3", epochs=3, limit=1000, batch=16, max_failures=1, extra="""
checkpoint_every_s: 0
space:
  ratio: {grid: [0.5]}
""")
    spec = load_spec(path)
    args = [str(path), "--tracking-uri", uri, "--storage", f"s3://{BUCKET}/runs", "--quiet"]
    log = tmp_path / "driver.log"
    driver = _sweep(args, driver_env, tmp_path, log)

    def mid_fine_tune():
        if driver.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}")
        return [r for rs in runs_by_config(uri, spec.name).values() for r in rs
                if r.info.status == "RUNNING" and steps(uri, r.info.run_id)]

    running = wait_for(mid_fine_tune, "a trial mid-fine-tune", seconds=200, every=0.3)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver's whole session: no cleanup, no `finally`
    driver.wait(timeout=30)
    _kill_all(f"SWEEP_TEST_DRIVER={driver_env['SWEEP_TEST_DRIVER']}")  # its Ray and trial workers too
    assert not any((tmp_path / d).exists() for d in ("sweep_results", "runs")), "Tune wrote a local folder"

    resumed = _sweep([*args, "--resume"], driver_env, tmp_path, log)
    assert resumed.wait(timeout=200) == 0, log.read_text()[-3000:]
    assert "resuming the sweep at s3://" in log.read_text()

    runs = assert_one_finished_run_per_config(uri, spec)
    for run in running:  # continued from its checkpoint in the bucket, in its own run: each epoch once
        assert run.info.run_id in {r.info.run_id for r in runs.values()}, "an interrupted trial started a new run"
        assert Counter(steps(uri, run.info.run_id)) == dict.fromkeys(range(1, 4), 1)
    assert_in_bucket(bucket, uri, spec, runs)
    client = MlflowClient(uri)
    [parent] = tracking.all_runs(client, tracking.find_experiment_id(client, spec.name), "tags.`sweep.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    # closed as dead while its driver was gone, then resumed: the closer's tags would contradict FINISHED
    assert not {claims.CLOSED_BY_TAG, claims.CLOSED_REASON_TAG} & set(parent.data.tags)


@pytest.fixture
def two_nodes(bucket, own_ray):
    """Two Ray nodes on loopback, started after the AWS variables are set (their workers inherit them)."""
    with two_node_cluster() as nodes:
        yield nodes


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_two_nodes_share_one_base_and_a_lost_nodes_trial_resumes_from_the_bucket(two_nodes, bucket, tmp_path,
                                                                                 sqlite_uri):
    uri = sqlite_uri
    cluster, worker = two_nodes
    path = write_spec(tmp_path, "two_nodes_s3", epochs=4, limit=1000, batch=16, max_failures=2, extra="""
checkpoint_every_s: 0
space:
  ratio: {grid: [0.3, 0.5]}
""")
    spec = load_spec(path)
    # the worker's disk goes with it: only the bucket holds the trial's checkpoint
    victim = lose_worker_mid_trial(cluster, worker, spec, uri, f"s3://{BUCKET}/runs", wait_s=200)

    runs = assert_one_finished_run_per_config(uri, spec)
    rerun = next(r for r in runs.values() if r.info.run_id == victim.info.run_id)  # its own run, continued
    assert rerun.data.tags["ray.node_id"] != worker.node_id
    assert Counter(steps(uri, rerun.info.run_id)) == dict.fromkeys(range(1, 5), 1)
    assert_in_bucket(bucket, uri, spec, runs)


# --- cluster.yaml ------------------------------------------------------------------------------------------------


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))
    validate_config(prepare_config(config))  # Ray's own schema, as `ray up` applies it (no cloud call)


def test_cluster_yaml_and_its_docs_agree_on_the_bucket():
    import yaml

    text = (REPO / "cluster.yaml").read_text(encoding="utf-8")
    docs = (REPO / "docs" / "cluster.md").read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    # the usage line, and the docs' command, run on the bucket: the nodes it starts share no folder
    for where in (text, docs):
        runs = re.findall(r"sweep run \S+ --address auto \\?\s*#?\s*--storage (\S+)", where)
        assert runs and set(runs) == {"s3://YOUR-BUCKET/sweep"}, runs
    # every node that runs trials may read and write it: workers through their instance profile (the head has Ray's)
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers and all("IamInstanceProfile" in t["node_config"] for t in workers.values())
    assert "s3://YOUR-BUCKET/mlflow" in text  # MLflow's artifacts in the same bucket
    assert "ray submit" not in text  # `ray submit` runs a script file, not a command: `ray exec` does
