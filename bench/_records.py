"""A sweep launch's wall time split into phases by what the launch itself records (shared by the benches that time
`run_sweep`; nothing in sweep is patched or wrapped to get it). Not a bench: the smoke test skips `_` files."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from sweep.driver.launch import SweepOutcome
from sweep.store import tracking


def launch_phases(outcome: SweepOutcome, uri: str, called: float, returned: float) -> dict[str, float]:
    """Seconds of each phase of a launch that was called and returned at these wall-clock times (time.time()):

    before Tune        the call to the parent run's start (preflight, the store's pending-grid and dead-run queries,
                       and Ray's start when run_sweep starts it)
    Tune fit           to the last write into the launch's Tune folder (Tune saves its experiment state as fit ends)
    latency phase      to the last latency metric logged on a trial run
    report             to the parent run's end (the report, then the parent's status)
    after the report   to the return (the summary table, and Ray's shutdown when run_sweep started it)
    """
    client = MlflowClient(uri)
    parent = client.get_run(outcome.parent_run_id).info
    fit_end = max(p.stat().st_mtime for p in Path(outcome.storage).rglob("*") if p.is_file())
    own = tracking.child_runs(client, outcome.experiment, f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    measured = [m.timestamp for r in own for m in client.get_metric_history(r.info.run_id, "latency_ms")]
    latency_end = max(measured) / 1e3 if measured else fit_end
    marks = [("before Tune", called), ("Tune fit", parent.start_time / 1e3), ("latency phase", fit_end),
             ("report", latency_end), ("after the report", parent.end_time / 1e3), ("", returned)]
    return {name: marks[i + 1][1] - at for i, (name, at) in enumerate(marks[:-1])}
