"""What `sweep run` shows while it runs: one line that a person can follow, updated in place on a terminal.

    [01:42] 7/12 done · 2 running · 0 failed · 1 skipped · about 1m10s left · best val_accuracy 0.953 (l1, ratio 0.3)
    [02:30] 7/12 done · 2 running · 0 failed · 1 skipped · tracking server unreachable for 40s; retrying · ...

Tune's own tables (one per 10 s, with every nested parameter) stay behind `sweep run --verbose`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

from ray.tune import ProgressReporter


def _span(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class CompactProgress(ProgressReporter):
    """Counts, elapsed time, a time-left estimate and the best trial so far by the spec's (validation) metric.

    outage(): seconds the tracking server has not answered, None while it does. It must pickle, as Tune pickles its
    reporter (a module-level function such as functools.partial(client.down_for, uri)); for the same reason there is
    no stream attribute: sys.stdout is looked up when written to."""

    def __init__(self, metric: str, mode: str, describe: Callable[[dict], str], every_s: float = 10.0,
                 outage: Callable[[], float | None] | None = None):
        self.metric, self.mode, self.describe, self.every_s, self.outage = metric, mode, describe, every_s, outage
        self.total = 0
        self.start, self.last_time, self.last_state = time.time(), 0.0, ""

    def setup(self, start_time: float | None = None, total_samples: int | None = None, **kwargs: Any) -> None:
        # the trials planned, from Tune: with --max-concurrent it creates them one at a time
        self.start, self.total = start_time or time.time(), total_samples or 0

    def line(self, trials: list) -> tuple[str, str]:
        """(the line, what it says apart from the clock: a change there is worth a new line in a log)."""
        ended = {"SKIPPED": 0, "HELD": 0, "FAILED": 0, "DONE": 0}
        running, best = 0, None
        for trial in trials:
            result = trial.last_result or {}
            if trial.status == "RUNNING":
                running += 1
            elif trial.status == "ERROR":
                ended["FAILED"] += 1
            elif trial.status == "TERMINATED":
                ended[result.get("trial_status") if result.get("trial_status") in ("SKIPPED", "HELD") else "DONE"] += 1
            value = result.get(self.metric)
            if isinstance(value, (int, float)) and math.isfinite(value) \
                    and (best is None or (value > best[0]) == (self.mode == "max")):  # NaN: a trial with no value
                best = (value, trial)
        finished, elapsed, planned = sum(ended.values()), time.time() - self.start, max(self.total, len(trials))
        state = [f"{finished}/{planned} done", f"{running} running", f"{ended['FAILED']} failed",
                 f"{ended['SKIPPED'] + ended['HELD']} skipped"]
        if best is not None:
            state.append(f"best {self.metric} {best[0]:.4g} ({self.describe(best[1].config)})")
        left = [f"about {_span(elapsed / finished * (planned - finished))} left"] \
            if ended["DONE"] and finished < planned else []
        down = self.outage() if self.outage is not None else None
        outage = [] if down is None else [f"tracking server unreachable for {_span(down)}; retrying"]
        minutes, seconds = divmod(int(elapsed), 60)
        clock = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes:02d}:{seconds:02d}"
        line = f"[{clock}] " + " · ".join(state[:4] + outage + left + state[4:])
        # the outage itself is news (a new line in a log); its growing duration is not
        return line, " · ".join(state + (["tracking server unreachable"] if outage else []))

    def should_report(self, trials: list, done: bool = False) -> bool:
        every = 1.0 if sys.stdout.isatty() else self.every_s
        return done or time.time() - self.last_time >= every or self.line(trials)[1] != self.last_state

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        line, self.last_state = self.line(trials)
        self.last_time = time.time()
        # a terminal: one line updated in place; a log file: a line per change, at most one per every_s otherwise
        tty = sys.stdout.isatty()
        sys.stdout.write(("\r\033[K" + line + ("\n" if done else "")) if tty else line + "\n")
        sys.stdout.flush()
