import os

# Ray binds loopback only in tests (and never asks for an external address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_RUN_ID", None)
# MLflow otherwise tries to reach its telemetry host from every process (offline here: slow timeouts).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Short claim leases: a test that kills a launch need not wait a minute for its trials' leases to lapse.
os.environ.setdefault("SWEEP_LEASE_SECONDS", "6")

pytest_plugins = ["analysis_data"]  # the analysis tests' specs and fixtures (storage, digits_spec, resnet20_spec)

# The longest modules first, by their time in the suite (`--durations=0` shows it; reorder when that changes). With
# two test processes (pytest-xdist, loadscope: a module or class at a time, in collection order, kept so by
# --no-loadscope-reorder in pyproject.toml) they start at once and the short modules fill the gaps, instead of one
# long module running alone at the end. The order inside a module is kept.
LONGEST_FIRST = ["test_reliability", "test_bench_smoke", "test_pruning", "test_sweep", "test_search_spaces",
                 "test_mlflow_ui", "test_object_storage", "test_plugins", "test_concurrency"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # a stable sort

import contextlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: extra OpenMP threads only spin against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    """An empty MLflow sqlite store. Creating the schema (alembic migrations) takes seconds: do it once."""
    from sweep.store import tracking

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.init_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_uri(tmp_path, template_db):
    """A fresh copy of the empty store for one test."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# Under pytest-xdist each test process has its own local Ray. One trial slot each: the processes already keep the
# cores busy, and every further slot starts a trial worker that imports torch and sweep again for tiny trials.
_UNDER_XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
_RAY_CPUS = 1 if _UNDER_XDIST else None
if _UNDER_XDIST:
    torch.set_num_threads(1)  # two test processes on two cores: more OpenMP threads only spin against each other


@pytest.fixture(scope="session")
def local_ray():
    """The local Ray that `sweep run` starts (loopback only), started once for the whole session: Ray takes
    seconds to start. A test that needs a cluster of its own uses `own_ray`, which gives this one back after."""
    import ray

    from sweep.driver.session import start_ray

    if not ray.is_initialized():
        start_ray(None, num_cpus=_RAY_CPUS)
    yield
    ray.shutdown()


@pytest.fixture
def own_ray():
    """For a test that starts its own Ray (a ray.cluster_utils.Cluster): the shared local Ray is stopped before
    and, if it was running, started again after."""
    import ray

    from sweep.driver.session import start_ray

    was_running = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if was_running:
        start_ray(None, num_cpus=_RAY_CPUS)


@contextlib.contextmanager
def two_node_cluster():
    """Two Ray nodes on loopback (ray.cluster_utils.Cluster), one CPU each, connected; yields (cluster, worker node).
    Node death is noticed within seconds, so a removed node's trial is failed (and retried) fast."""
    import ray
    from ray.cluster_utils import Cluster

    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "_system_config": system})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


class FailOnce:
    """A trial hook (SweepContext.on_epoch) that raises in one epoch of each config's first attempt: a crash mid
    fine-tune, after the previous epoch's checkpoint. A marker file per config remembers the first attempt, so the
    retry (another process, under Ray) runs through."""

    def __init__(self, epoch: int, marker_dir: Path):
        self.epoch, self.marker_dir = epoch, marker_dir

    def __call__(self, cfg, epoch: int) -> None:
        from sweep.store.tracking import config_hash
        from sweep.worker.identity import identity

        marker = self.marker_dir / config_hash(identity(cfg))
        if epoch == self.epoch and not marker.exists():
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            marker.touch()
            raise RuntimeError(f"injected failure in epoch {epoch}")


class Rendezvous:
    """A trial hook that holds each trial at the start of its first fine-tune epoch until `count` trials have got
    there (bounded by `seconds`): the trials then surely ran at the same time, whatever the scheduler's timing, so on
    nodes of one CPU each they ran on different nodes."""

    def __init__(self, count: int, marker_dir: Path, seconds: float = 90.0):
        self.count, self.marker_dir, self.seconds = count, marker_dir, seconds

    def __call__(self, cfg, epoch: int) -> None:
        from sweep.store.tracking import config_hash
        from sweep.worker.identity import identity

        if epoch != 1:
            return
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / config_hash(identity(cfg))).touch()
        deadline = time.monotonic() + self.seconds
        while len(list(self.marker_dir.iterdir())) < self.count and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def rendezvous(tmp_path):
    """rendezvous(count) -> a Rendezvous hook, pickled by value like fail_once's."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return lambda count: Rendezvous(count, tmp_path / "rendezvous")


@pytest.fixture
def fail_once(tmp_path):
    """fail_once(epoch) -> a FailOnce hook; pickled by value, so Ray workers need not import this file."""
    from ray import cloudpickle  # Ray's own copy serialises what travels to its workers

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return lambda epoch: FailOnce(epoch, tmp_path / "faults")
