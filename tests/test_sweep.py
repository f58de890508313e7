"""Sweeps end to end on real Ray (local on loopback, and a 2-node fake cluster), real MLflow (sqlite), real torch.

Tiny trials (digits, small_cnn, one epoch each) keep the file to a couple of minutes on 2 cores.
"""

import shutil
import socket
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from sweep.cli import main
from sweep.config.spec import SpecError, load_spec
from sweep.driver.launch import measures_in_driver, run_sweep
from sweep.driver.session import cache_dir
from sweep.errors import InputError
from sweep.store import tracking

pytestmark = pytest.mark.e2e  # starts Ray and runs real sweeps (`-m 'not e2e'` leaves them out)

TINY = """
name: {name}
dataset: {{name: digits, limit: 120}}
model: {{name: small_cnn}}
base: {{epochs: 1, batch_size: 32}}
finetune: {{epochs: {epochs}, batch_size: 32}}
measure: {{batch_size: 1, warmup: 1, runs: 2}}
space:
  strategy: {{grid: {strategies}}}
  ratio: {{grid: {ratios}}}
resources: {{cpu: 1, gpu: {gpu}{memory}}}
max_failures: {max_failures}
{extra}
"""

OPTUNA_ASHA = """
name: {name}
dataset: {{name: digits, limit: 120}}
model: {{name: small_cnn}}
base: {{epochs: 1, batch_size: 32}}
finetune: {{epochs: 2, batch_size: 32}}
measure: {{batch_size: 1, warmup: 1, runs: 2}}
metric: {metric}
space:
  strategy: {{choice: [l1, l2]}}
  ratio: {{uniform: [0.2, 0.7]}}
search: {{algorithm: optuna, num_samples: {samples}}}
scheduler: {{name: asha, grace_period: 1, reduction_factor: 2}}
resources: {{cpu: 1}}
"""


def write_spec(folder: Path, name: str, strategies=("l1", "random"), ratios=(0.3, 0.6), gpu=0, epochs=1,
               max_failures=2, extra="", memory: float | None = None) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(TINY.format(name=name, strategies=list(strategies), ratios=list(ratios), gpu=gpu, epochs=epochs,
                                max_failures=max_failures, extra=extra,
                                memory=f", memory: {memory}" if memory else ""), encoding="utf-8")
    return path


def children(uri: str, experiment: str) -> list:
    return tracking.child_runs(MlflowClient(uri), experiment)


def parents(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    experiment_id = tracking.find_experiment_id(client, experiment)
    return tracking.all_runs(client, experiment_id, "tags.`sweep.role` = 'parent'")


class TestLocalSweep:
    @pytest.fixture(scope="class")
    def store(self, tmp_path_factory, template_db):
        root = tmp_path_factory.mktemp("sweep")
        shutil.copy(template_db, root / "mlflow.db")  # an empty store (creating one is tested in test_store_init)
        return {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}", "storage": str(root / "results")}

    @pytest.fixture(scope="class")
    def first(self, local_ray, store):
        spec = load_spec(write_spec(store["root"], "local_sweep"))
        threads = torch.get_num_threads()
        outcome = run_sweep(spec, tracking_uri=store["uri"], storage=store["storage"], verbose=0)
        # the latency phase ran in this process (one local node): it left the driver's thread count as it was
        assert measures_in_driver() and torch.get_num_threads() == threads
        return spec, outcome

    @pytest.mark.timeout(240)
    def test_grid_runs_every_trial_nested_under_one_parent(self, first, store):
        spec, outcome = first
        assert (outcome.ran, outcome.skipped, outcome.failed) == (4, 0, 0)
        assert list(outcome.results["status"]) == ["FINISHED"] * 4

        runs = children(store["uri"], "local_sweep")
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {outcome.parent_run_id}
        assert {(r.data.params["strategy"], float(r.data.params["ratio"])) for r in runs} == {
            ("l1", 0.3), ("l1", 0.6), ("random", 0.3), ("random", 0.6)}
        assert {r.data.tags["config_hash"] for r in runs} == {tracking.config_hash(c) for c in spec.grid_configs()}
        for run in runs:
            metrics = run.data.metrics
            assert 0 <= metrics["test_accuracy"] <= 1 and 0 < metrics["flops_reduction"] < 1
            assert metrics["params"] < metrics["base_params"]
        # Results as Tune saw them agree with what MLflow recorded.
        recorded = sorted(r.data.metrics["val_accuracy"] for r in runs)
        assert sorted(outcome.results["val_accuracy"]) == pytest.approx(recorded)

        # One base for the whole sweep, trained by exactly one trial.
        assert len(list(Path(cache_dir(store["storage"], "local_sweep")).iterdir())) == 1
        assert sorted(r.data.tags["base_cache"] for r in runs) == ["hit", "hit", "hit", "miss"]
        # every trial read its images from the copy the driver put in the object store
        assert {r.data.tags["data.shared"] for r in runs} == {"true"}

        client = MlflowClient(store["uri"])
        parent = client.get_run(outcome.parent_run_id)
        assert parent.info.status == "FINISHED" and parent.data.tags["sweep.role"] == "parent"
        assert Path(client.download_artifacts(parent.info.run_id, "spec.yaml")).read_text() == spec.source_text
        report = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
        assert {"summary.md", "summary.csv", "runs.csv", "paired.csv", "pareto.png"} <= report
        # the measurement phase timed every trial after Tune returned (in this process: see `first`), and said how
        for run in children(store["uri"], "local_sweep"):
            assert {"latency_ms", "latency_iqr_ms", "base_latency_ms", "speedup"} <= set(run.data.metrics)
            assert run.data.metrics["latency_ms"] > 0
            tags = run.data.tags
            assert (tags["latency.device"], tags["latency.threads"], tags["latency.batch_size"], tags["latency.runs"],
                    tags["latency.warmup"], tags["latency.host"]) == ("cpu", "1", "1", "2", "1", socket.gethostname())
            assert float(tags["latency.load_1min"]) >= 0

    @pytest.mark.timeout(120)
    def test_same_spec_again_runs_nothing(self, first, store, capsys):
        spec_path = store["root"] / "local_sweep.yaml"
        assert main(["run", str(spec_path), "--tracking-uri", store["uri"], "--storage", store["storage"]]) == 0
        assert ("nothing to run: all 4 trials already finished in experiment local_sweep (use --force to rerun)"
                in capsys.readouterr().out)
        assert len(children(store["uri"], "local_sweep")) == 4
        assert len(parents(store["uri"], "local_sweep")) == 1  # an empty launch leaves no parent run behind

    @pytest.mark.timeout(240)
    def test_added_strategy_runs_only_its_trials(self, first, store, capsys):
        spec = load_spec(write_spec(store["root"], "local_sweep", strategies=("l1", "random", "l2")))
        outcome = run_sweep(spec, tracking_uri=store["uri"], storage=store["storage"])
        assert (outcome.ran, outcome.skipped, outcome.failed) == (2, 4, 0)
        out = capsys.readouterr().out
        assert "skipping 4 trials already finished" in out
        progress = [line for line in out.splitlines() if line.startswith("[")]  # the one-line progress display
        assert progress and "2/2 done" in progress[-1] and "best val_accuracy" in progress[-1]
        assert "sweep local_sweep: 2 trials ran, 4 skipped" in out  # the summary

        runs = children(store["uri"], "local_sweep")
        new = [r for r in runs if r.data.tags["mlflow.parentRunId"] == outcome.parent_run_id]
        assert len(runs) == 6 and len(new) == 2
        assert {(r.data.params["strategy"], float(r.data.params["ratio"])) for r in new} == {("l2", 0.3), ("l2", 0.6)}
        assert {r.data.tags["base_cache"] for r in new} == {"hit"}  # same base settings: the cached base
        assert len(parents(store["uri"], "local_sweep")) == 2

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("ask, error", [({"gpu": 1}, "resources.gpu: 1 GPU per trial"),
                                            ({"memory": 100000}, "resources.memory: 100000 GiB per trial")])
    def test_what_no_node_has_is_refused_before_any_run(self, local_ray, tmp_path, capsys, ask, error):
        """Ray would wait for such a node forever, and Tune says nothing of memory."""
        path = write_spec(tmp_path, "gpu_sweep", **ask)
        db = tmp_path / "store" / "mlflow.db"
        db.parent.mkdir()  # sqlite makes the file, not its folder: a missing folder is an error of its own
        args = ["run", str(path), "--tracking-uri", f"sqlite:///{db}", "--storage", str(tmp_path / "results")]
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {error}")
        with pytest.raises(SpecError, match=error.split(":")[0]):
            run_sweep(load_spec(path), tracking_uri=f"sqlite:///{db}", storage=str(tmp_path / "results"))
        assert not db.exists() and not (tmp_path / "results").exists()

    @pytest.mark.timeout(240)
    def test_failed_trial_fails_the_launch_and_resume_finishes_it(self, local_ray, tmp_path, fail_once, sqlite_uri):
        uri = sqlite_uri  # a copy of the session's empty store
        failing = load_spec(write_spec(tmp_path, "fails", strategies=["l1"], ratios=[0.5], epochs=2,
                                       max_failures=0, extra="checkpoint_every_s: 0"))
        storage = str(tmp_path / "results")
        outcome = run_sweep(failing, tracking_uri=uri, storage=storage, verbose=0, on_epoch=fail_once(2))
        assert outcome.failed == 1  # `sweep run` exits 1
        [run] = children(uri, "fails")
        [parent] = parents(uri, "fails")
        assert run.info.status == "FAILED" and parent.info.status == "FAILED"

        # Tune would restore the launch as it was: a spec edited since is refused before anything runs
        (tmp_path / "edited").mkdir()
        edited = load_spec(write_spec(tmp_path / "edited", "fails", strategies=["l1"], ratios=[0.5], epochs=3,
                                      max_failures=0, extra="checkpoint_every_s: 0"))
        with pytest.raises(InputError, match="--resume: the spec's finetune changed since the launch being resumed"):
            run_sweep(edited, tracking_uri=uri, storage=storage, verbose=0, resume=True)
        assert [r.info.status for r in children(uri, "fails")] == ["FAILED"]

        # --resume restores the launch: the errored trial restarts from its epoch-1 checkpoint, continuing its own
        # MLflow run under the same parent run.
        assert run_sweep(failing, tracking_uri=uri, storage=storage, verbose=0, resume=True).failed == 0
        [run] = children(uri, "fails")
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        history = MlflowClient(uri).get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2]
        [parent] = parents(uri, "fails")
        assert parent.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id

    @pytest.mark.timeout(240)
    def test_optuna_with_asha(self, local_ray, tmp_path, sqlite_uri):
        uri = sqlite_uri  # a copy of the session's empty store
        path = tmp_path / "optuna.yaml"
        path.write_text(OPTUNA_ASHA.format(name="optuna_sweep", metric="val_accuracy", samples=3))
        outcome = run_sweep(load_spec(path), tracking_uri=uri, storage=str(tmp_path / "results"), verbose=0)
        assert (outcome.ran, outcome.failed, outcome.interrupted) == (3, 0, 0)
        statuses = list(outcome.results["status"])
        assert set(statuses) <= {"FINISHED", "STOPPED"} and "FINISHED" in statuses

        runs = children(uri, "optuna_sweep")
        assert len(runs) == 3
        for run in runs:
            assert run.data.params["strategy"] in ("l1", "l2") and 0.2 <= float(run.data.params["ratio"]) <= 0.7
        # Trials ASHA stopped never logged their end: the orchestrator closes their runs as KILLED.
        ended = sorted(r.info.status for r in runs)
        assert ended == sorted("FINISHED" if s == "FINISHED" else "KILLED" for s in statuses)
        assert parents(uri, "optuna_sweep")[0].info.status == "FINISHED"

    def test_a_metric_recorded_at_pruning_drives_the_search_and_the_scheduler(self, local_ray, tmp_path, sqlite_uri):
        """metric: params_reduction is known once a trial has pruned, not per epoch: every report to Tune carries
        it, so Optuna and ASHA read the values MLflow records (Tune once ended the sweep on the first epoch)."""
        uri = sqlite_uri
        path = tmp_path / "by_params.yaml"
        path.write_text(OPTUNA_ASHA.format(name="by_params", metric="params_reduction", samples=2))
        outcome = run_sweep(load_spec(path), tracking_uri=uri, storage=str(tmp_path / "results"), verbose=0)
        assert (outcome.ran, outcome.failed, outcome.interrupted) == (2, 0, 0)
        recorded = sorted(r.data.metrics["params_reduction"] for r in children(uri, "by_params"))
        assert sorted(outcome.results["params_reduction"]) == recorded and 0 < recorded[0] < 1


class TestCluster:
    @pytest.fixture
    def cluster(self, own_ray):
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
        ray.shutdown()
        cluster.shutdown()

    @pytest.mark.timeout(240)
    def test_two_nodes_share_one_base(self, cluster, tmp_path, sqlite_uri, rendezvous):
        uri = sqlite_uri  # a copy of the session's empty store
        storage = str(tmp_path / "results")  # one filesystem: stands in for the NFS mount a real cluster needs
        spec = load_spec(write_spec(tmp_path, "two_nodes", strategies=["l1", "random"], ratios=[0.5]))
        # held together after epoch 1, so the first cannot finish (freeing its node) before the second is placed
        outcome = run_sweep(spec, address=cluster.address, tracking_uri=uri, storage=storage, verbose=0,
                            on_epoch=rendezvous(2))
        assert (outcome.ran, outcome.failed) == (2, 0)
        assert not ray.is_initialized()  # run_sweep disconnects what it connected

        ray.init(address=cluster.address)
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert len(nodes) == 2
        assert not measures_in_driver()  # two nodes: the latency phase ran as a Ray task, on a worker
        runs = children(uri, "two_nodes")
        assert {r.info.status for r in runs} == {"FINISHED"}
        assert all("latency_ms" in r.data.metrics and r.data.tags["latency.device"] == "cpu" for r in runs)
        # One CPU per node and per trial: the two trials ran at the same time, one on each node.
        assert {r.data.tags["ray.node_id"] for r in runs} == nodes
        # both nodes read the data the driver put in the object store (the second node fetched its own copy)
        assert {r.data.tags["data.shared"] for r in runs} == {"true"}
        # ...and the base was trained once, by one of them, the other waiting for it.
        assert sorted(r.data.tags["base_cache"] for r in runs) == ["hit", "miss"]
        assert len(list(Path(cache_dir(storage, "two_nodes")).iterdir())) == 1
