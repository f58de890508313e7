"""Ray Tune behaviour we correct: a trial worker killed by Ray's memory monitor must be a trial failure (in the
driver), and a reused worker must wait for its stopped trial to finish recording (in the worker, at the end). What
Ray 2.60 does without the fix, and why the patch is safe: docs/design.md, "Trials killed for memory".
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
_MARK = "_sweep_oom_is_actor_death"
# With reuse_actors, Tune hands a worker its next trial once the last trial's thread has ended, waiting
# TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s) and otherwise failing that next trial, with no retry. A trial that ASHA stopped
# spends that time logging its epochs and closing its run.
_TRIAL_END_S = 150
# Noise for a sweep's user, and the level it is kept from: the local Ray's notice that token authentication is on
# (a warning, and the right setting: it stays on), and every trial worker's per-epoch checkpoint chatter.
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
        from ray.air.execution._internal.actor_manager import RayActorManager
        from ray.exceptions import OutOfMemoryError, RayActorError

        original = RayActorManager._actor_task_failed
    except (ImportError, AttributeError):  # Ray's internals moved
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
    RayActorManager._actor_task_failed = _actor_task_failed
    return True
