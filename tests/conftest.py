import os

# Ray binds loopback only in tests (and never asks for an external address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_RUN_ID", None)
# MLflow otherwise tries to reach its telemetry host from every process (offline here: slow timeouts).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import shutil  # noqa: E402

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
    from sweep import tracking

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.init_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_uri(tmp_path, template_db):
    """A fresh copy of the empty store for one test."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
