import os

# Ray binds loopback only in tests (and never asks for an external address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_RUN_ID", None)
# MLflow otherwise tries to reach its telemetry host from every process (offline here: slow timeouts).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
