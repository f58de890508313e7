"""Ray Tune behaviour we correct: a trial worker killed by Ray's memory monitor must be a trial failure (in the
driver), and a reused worker must wait for its stopped trial to finish recording (in the worker, at the end).

What Ray 2.60 does (tests/test_oom.py shows it): when the raylet's memory monitor kills a trial's worker (node memory
above RAY_memory_usage_threshold, default 0.95), the pending actor task (the trial's `train`) resolves to
``ray.exceptions.OutOfMemoryError``. That is a ``RayError`` but neither a ``RayActorError`` nor a ``RayTaskError``,
the two kinds Tune's ``RayActorManager._actor_task_failed`` handles; anything else is re-raised as
``RuntimeError("Caught unexpected exception: 1 worker(s) were killed due to the node running low on memory ...")``
out of the Tune controller. ``Tuner.fit()`` raises, FailureConfig(max_failures) is never consulted, every other
running trial is abandoned, and `sweep run` exits 1 with its runs marked KILLED. reuse_actors does not matter: the
task fails the same way whether the actor is fresh or reused.

``retry_oom_killed_trials()`` makes Tune see what really happened: the trial's actor process is dead, which is a
``RayActorError``. Tune then fails that trial alone and restarts it from its last checkpoint up to max_failures
times, like a crashed or lost worker. It patches one private method, so it checks that the method still exists and
does nothing (returning False) on a Ray where it does not; the test fails loudly if the patch stops working.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
_MARK = "_sweep_oom_is_actor_death"
# With reuse_actors, Tune hands a worker its next trial once the last trial's thread has ended, waiting
# TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s) and otherwise failing that next trial, with no retry. A trial that ASHA stopped
# spends that time logging its epochs and closing its run .
_TRIAL_END_S = 150


# Log lines that are noise for a sweep's user, and the level they are kept from: the local Ray's notice that token
# authentication is on (a warning, and the right setting: it stays on), and every trial worker's per-epoch
# checkpoint chatter.
QUIET_LOGGERS = {"ray._private.authentication.authentication_token_setup": logging.ERROR,
                 "ray.train._internal.storage": logging.WARNING,
                 "ray.train.v2._internal.execution.storage": logging.WARNING}


def quiet_ray_logs() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def allow_stopped_trials_to_record() -> None:
    """In a trial's worker: give a stopped trial time to record before the worker takes its next trial."""
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(_TRIAL_END_S)


def retry_oom_killed_trials() -> bool:
    """Install the fix in this (driver) process; True if installed now or before, False if Ray's internals moved."""
    try:
        from ray.air.execution._internal import actor_manager
        from ray.exceptions import OutOfMemoryError, RayActorError
    except ImportError:  # pragma: no cover - another Ray layout
        return False
    manager = getattr(actor_manager, "RayActorManager", None)
    original = getattr(manager, "_actor_task_failed", None)
    if original is None:
        log.warning("ray.air RayActorManager._actor_task_failed is gone: OOM-killed trials may stop the sweep")
        return False
    if getattr(original, _MARK, False):
        return True

    class TrialWorkerOutOfMemory(RayActorError):
        """The trial's worker process was killed by Ray's memory monitor (the message says why and how much)."""

    def _actor_task_failed(self, tracked_actor_task, exception):
        if isinstance(exception, OutOfMemoryError):
            exception = TrialWorkerOutOfMemory(
                error_msg=f"the trial's worker was killed by Ray's memory monitor: {exception}")
        return original(self, tracked_actor_task, exception)

    setattr(_actor_task_failed, _MARK, True)
    manager._actor_task_failed = _actor_task_failed
    return True
