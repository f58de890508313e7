"""Trial claims in the MLflow tracking store: two launches (or two machines) never run the same config at once.

A claim is the trial's RUNNING child run tagged ``config_hash=H`` with a lease its holder renews (:class:`Lease`);
`claim_trial` answers *claimed* (train, then ``result.lease.release(status)``), *finished* or *held*. The protocol,
and why two owners never both proceed on one config: docs/design.md, "The claim protocol".
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from mlflow.entities import Run, RunTag

from sweep.store import tracking
from sweep.store.store import Store, StoreLike

log = logging.getLogger(__name__)

LEASE_TAG = "sweep.lease_until"
OWNER_TAG = "sweep.owner"
CLOSED_BY_TAG = "sweep.closed_by"
CLOSED_REASON_TAG = "sweep.closed_reason"
ADOPT_PREFIX = "sweep.adopt."
DEFAULT_LEASE_S = 60.0
MAX_ATTEMPTS = 20
BACKOFF_S = 0.5  # a yielded claim sleeps uniform(0, BACKOFF_S * 2**k), k = yields so far (at most 4)


class LeaseLost(RuntimeError):
    """Our claim was closed by someone else (our lease lapsed): stop and record nothing as a result."""


def new_owner_id(prefix: str) -> str:
    """A launch/worker id unique across machines: host, pid and a random suffix (tag-key safe)."""
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _key_part(owner: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", owner)[:200]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _seconds(tag: str | None) -> float | None:
    """A time tag's unix seconds; None if it is missing or not a number."""
    try:
        return float(tag)
    except (TypeError, ValueError):
        return None


def _lease_until(run: Run) -> float | None:
    return _seconds(run.data.tags.get(LEASE_TAG))


def _running_live(run: Run, now: float, lease_s: float) -> bool:
    """RUNNING with a future lease, or (no lease tag: an older release) started less than lease_s ago."""
    if run.info.status != "RUNNING":
        return False
    until = _lease_until(run)
    return (run.info.start_time or 0) / 1000 + lease_s > now if until is None else until > now


def _adopted(run: Run, now: float, except_owner: str | None = None) -> bool:
    """Whether run carries a live adopt tag (of an owner other than except_owner)."""
    skip = None if except_owner is None else ADOPT_PREFIX + _key_part(except_owner)
    return any(key.startswith(ADOPT_PREFIX) and key != skip and (_seconds(value) or 0) > now
               for key, value in run.data.tags.items())


def _close(store: StoreLike, run: Run, status: str, closer: str, reason: str) -> bool:
    """End a dead run with the reason tags; re-read first so a holder that just finished or renewed, or a resumer
    that is adopting it, is left alone."""
    store = Store.of(store)
    fresh = store.get_run(run.info.run_id)
    if fresh.info.status != "RUNNING" or _lease_until(fresh) != _lease_until(run) or _adopted(fresh, time.time()):
        return False
    run_id = run.info.run_id
    store.log_batch(run_id, tags=[RunTag(CLOSED_BY_TAG, closer), RunTag(CLOSED_REASON_TAG, reason)])
    store.set_terminated(run_id, status=status)
    log.warning("closed run %s as %s: %s", run_id, status, reason)
    return True


def _dead_reason(run: Run, lease_s: float) -> str:
    until = _lease_until(run)
    if until is None:
        return (f"no lease (started {_iso((run.info.start_time or 0) / 1000)} by an older release) and not finished "
                f"after {lease_s:g} s; presumed dead")
    return f"lease expired at {_iso(until)}; owner {run.data.tags.get(OWNER_TAG, 'unknown')} stopped renewing"


class Lease:
    """Keeps a claim alive: rewrites ``sweep.lease_until = now + lease_s`` every ``lease_s / 3`` from a daemon thread
    while the run is RUNNING and ours; once it is not (closed after our lease lapsed), sets ``lost`` and stops."""

    def __init__(self, store: StoreLike, run_id: str, owner: str, lease_s: float = DEFAULT_LEASE_S):
        self.store, self.run_id, self.owner, self.lease_s = Store.of(store), run_id, owner, float(lease_s)
        self.until = time.time() + self.lease_s
        self.lost, self._stop = threading.Event(), threading.Event()
        self.renewals = 0
        self._thread = threading.Thread(target=self._loop, name=f"lease-{run_id[:8]}", daemon=True)

    @classmethod
    def acquire(cls, store: StoreLike, run_id: str, owner: str, lease_s: float = DEFAULT_LEASE_S) -> Lease:
        """Put a lease on a run we own outright (the driver's parent run) and start renewing it."""
        lease = cls(store, run_id, owner, lease_s)
        lease._write()
        return lease.start()

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _write(self) -> None:
        until = time.time() + self.lease_s
        self.store.bounded(3, self.lease_s / 3).log_batch(
            self.run_id, tags=[RunTag(OWNER_TAG, self.owner), RunTag(LEASE_TAG, f"{until:.3f}")])
        self.until = until

    def _loop(self) -> None:
        while not self.lost.is_set() and not self._stop.wait(self.lease_s / 3):
            try:
                run = self.store.bounded(3, self.lease_s / 6).get_run(self.run_id)
                if run.info.status != "RUNNING" or run.data.tags.get(OWNER_TAG) != self.owner:
                    reason = run.data.tags.get(CLOSED_REASON_TAG, f"status {run.info.status}")
                    log.error("lease on run %s lost: %s", self.run_id, reason)
                    self.lost.set()
                else:
                    self._write()
                    self.renewals += 1
            except Exception as error:  # a store hiccup: try again next period; lapse only when the lease runs out
                log.warning("renewing the lease on run %s failed: %s", self.run_id, error)
                if time.time() > self.until:
                    self.lost.set()

    def check(self) -> None:
        """Raise LeaseLost if the claim was taken from us: call before recording a result."""
        if self.lost.is_set():
            raise LeaseLost(f"run {self.run_id}: the claim was closed by another process after its lease lapsed")

    def release(self, status: str | None = None) -> None:
        """Stop renewing; with a status (FINISHED, FAILED, KILLED) also end the run with it, if it is still ours:
        a run closed or taken over after our lease lapsed is its closer's or new holder's to end."""
        self._stop.set()
        self._thread.join(timeout=self.lease_s)
        if status is None or self.lost.is_set():
            return
        run = self.store.get_run(self.run_id)
        if run.info.status == "RUNNING" and run.data.tags.get(OWNER_TAG) == self.owner:
            self.store.set_terminated(self.run_id, status=status)
        else:
            log.error("run %s was not ended %s: it is %s, owner %s (closed or taken over after our lease lapsed)",
                      self.run_id, status, run.info.status, run.data.tags.get(OWNER_TAG))


@dataclass
class ClaimResult:
    kind: Literal["claimed", "finished", "held"]
    run_id: str | None          # claimed: our run; finished: the FINISHED run; held: the live rival's run
    lease: Lease | None = None  # claimed only: renewing; release it when the trial ends
    closed: list[str] = field(default_factory=list)  # dead runs of this config closed on the way
    attempts: int = 0           # registrations made (1 when there was no race)


def claim_tags(config_hash: str, owner: str, lease_s: float) -> dict[str, str]:
    """The tags a new claim run must be created with (in the create request itself, so rivals see a live lease)."""
    return {"config_hash": config_hash, OWNER_TAG: owner, LEASE_TAG: f"{time.time() + lease_s:.3f}"}


def child_run_creator(store: StoreLike, experiment_id: str, parent_run_id: str | None,
                      tags: dict[str, str] | None = None, run_name: str | None = None) -> Callable[[dict], str]:
    """A create_run for claim_trial: a child run of parent_run_id with our tags plus the claim's; returns its id."""
    store = Store.of(store)
    parent = {} if parent_run_id is None else {"mlflow.parentRunId": parent_run_id}
    return lambda claim: store.create_run(experiment_id, {**(tags or {}), **claim, **parent}, run_name).info.run_id


def _rivals(runs: list[Run], owner: str, now: float, lease_s: float,
            ignore_finished_before: float | None = None) -> tuple[list[Run], list[Run]]:
    """(FINISHED runs, other owners' live claims) among one config's runs. Our own registrations (a new run's owner
    tag, our adopt tag) never count, nor FINISHED runs that ended before ignore_finished_before (a forced rerun)."""
    finished = [run for run in runs if run.info.status == "FINISHED" and (
        ignore_finished_before is None or (run.info.end_time or 0) / 1000 >= ignore_finished_before)]
    live = [run for run in runs if run.info.status != "FINISHED" and (_adopted(run, now, except_owner=owner) or (
        _running_live(run, now, lease_s) and run.data.tags.get(OWNER_TAG) != owner))]
    return finished, live


def claim_trial(store: StoreLike, experiment_id: str, config_hash: str, owner: str,
                create_run: Callable[[dict[str, str]], str], lease_s: float = DEFAULT_LEASE_S,
                resume_run_id: str | None = None, wait_s: float = 0.0, max_attempts: int = MAX_ATTEMPTS,
                backoff_s: float = BACKOFF_S, ignore_finished_before: float | None = None) -> ClaimResult:
    """Claim config_hash for owner (docs/design.md, "The claim protocol"), in at most max_attempts registrations.

    create_run(tags): creates the RUNNING child run with `tags` in the create request, returns its id (see
    `child_run_creator`). resume_run_id: the run this caller continues (its checkpoint names it). wait_s: how long a
    live holder may take to finish or die before the answer is "held". ignore_finished_before: `sweep run --force`'s
    start, so runs that finished before it run again while one that another launch finishes meanwhile still counts.
    """
    if lease_s <= 0:
        raise ValueError(f"lease_s: {lease_s} must be positive")
    store = Store.of(store)
    deadline = time.monotonic() + max(0.0, wait_s)
    poll = min(max(lease_s / 6, 0.2), 5.0)
    adopt_key = ADOPT_PREFIX + _key_part(owner)
    closed: list[str] = []
    attempts, rival = 0, None
    mine, resume = None, None  # the run we registered on, until its re-check; the run we resume, if we do
    for _ in range(max_attempts * 4 + int(wait_s / poll) + 2):  # every pass registers, sleeps or returns
        now = time.time()
        runs = store.runs(experiment_id, tracking.hash_filter(config_hash))
        finished, live = _rivals(runs, owner, now, lease_s, ignore_finished_before)
        if mine is not None:  # the re-check after registering: ours unless a rival is visible now
            if not finished and not live:
                lease = Lease(store, mine, owner, lease_s)
                if resume is not None:
                    lease._write()  # owner and lease first, RUNNING next, the adopt tag last: visible throughout
                    store.update_run(mine, status="RUNNING")
                    clear_closed_tags(store, mine, resume)  # it was closed as dead; it lives again
                    store.delete_tag(mine, adopt_key)
                return ClaimResult("claimed", mine, lease.start(), closed, attempts)
            rival = (finished or live)[0].info.run_id  # yield to it
            if resume is None:  # ended KILLED, then deleted (it never ran anything)
                store.set_tag(mine, CLOSED_REASON_TAG, f"yielded to {rival}")
                store.set_terminated(mine, status="KILLED")
                store.delete_run(mine)
            else:
                store.delete_tag(mine, adopt_key)
            mine = None
            if not finished:
                time.sleep(random.uniform(0, backoff_s * 2 ** min(attempts, 4)))
                continue
        if finished:
            return ClaimResult("finished", finished[0].info.run_id, None, closed, attempts)
        # close the dead: RUNNING, lease lapsed; ours from an earlier attempt when it is not the run we resume
        live_ids = {r.info.run_id for r in live}
        for run in runs:
            rid = run.info.run_id
            if rid == resume_run_id or run.info.status != "RUNNING" or rid in live_ids:
                continue
            if not _running_live(run, now, lease_s):
                reason = _dead_reason(run, lease_s)
            elif run.data.tags.get(OWNER_TAG) == owner:
                reason = f"superseded: owner {owner} started this config again"
            else:
                continue
            if _close(store, run, "FAILED", owner, reason):
                closed.append(rid)
        if live:
            rival = live[0].info.run_id
            if time.monotonic() + poll > deadline:
                return ClaimResult("held", rival, None, closed, attempts)
            time.sleep(poll)
            continue
        if attempts >= max_attempts:
            break
        attempts += 1
        # register: a new run, or our adopt tag on the run we resume (it cannot be created again)
        resume = next((r for r in runs if r.info.run_id == resume_run_id), None)
        if resume is None:
            mine = create_run(claim_tags(config_hash, owner, lease_s))
        else:
            mine = resume.info.run_id
            store.set_tag(mine, adopt_key, f"{time.time() + lease_s:.3f}")
    return ClaimResult("held", rival, None, closed, attempts)


def clear_closed_tags(store: StoreLike, run_id: str, run: Run | None = None) -> None:
    """Remove the tags a closer left on a run that lives again (adopted, or a resumed launch's parent)."""
    store = Store.of(store)
    run = run or store.get_run(run_id)
    for stale in (CLOSED_BY_TAG, CLOSED_REASON_TAG):
        if stale in run.data.tags:
            store.delete_tag(run_id, stale)


def holder_alive(store: StoreLike, run_id: str, lease_s: float) -> bool:
    """Whether a RUNNING run's holder renews its lease: answers within about lease_s / 3 for a live holder, and once
    the lease lapses (at most lease_s) for a dead one; a holder that neither renews nor lapses counts as alive."""
    store = Store.of(store)
    first = None
    deadline = time.time() + 1.5 * lease_s
    while time.time() < deadline:
        run = store.get_run(run_id)
        if not _running_live(run, time.time(), lease_s):
            return False
        until = _lease_until(run)
        if first is None:
            first = until
        elif until is not None and until > first:
            return True
        time.sleep(1.0)
    return True


def outlive_dead_launches(store: StoreLike, experiment_id: str, lease_s: float) -> None:
    """Wait out the leases of launches whose driver died moments ago, and of their trials' runs: a new launch would
    otherwise find those configs held and skip them. A live (overlapping) launch is left to its runs."""
    store = Store.of(store)
    for parent in tracking.running_parents(store, experiment_id):
        if not _running_live(parent, time.time(), lease_s):
            continue  # lapsed already: close_dead_runs closes it and its trials' runs
        log.warning("another launch of this experiment holds its lease (run %s); checking whether its driver is "
                    "alive (at most %.0f s)", parent.info.run_id, lease_s)
        if holder_alive(store, parent.info.run_id, lease_s):
            continue
        trials = store.runs(experiment_id, "attributes.status = 'RUNNING' and "
                            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        for run in trials:  # the driver's workers died with it: their leases lapse within lease_s
            holder_alive(store, run.info.run_id, lease_s)


def close_dead_runs(store: StoreLike, experiment_id: str, closer: str | None = None,
                    lease_s: float = DEFAULT_LEASE_S) -> list[str]:
    """Close every RUNNING run of the experiment whose holder is dead (`_running_live`); return their ids. Trial
    runs are ended FAILED (a later launch reruns the config), parent runs KILLED (as an interrupted launch is)."""
    store = Store.of(store)
    now = time.time()
    closer = closer or new_owner_id("closer")
    closed = []
    for run in store.runs(experiment_id, "attributes.status = 'RUNNING'"):
        if _running_live(run, now, lease_s) or _adopted(run, now):
            continue
        status = "KILLED" if run.data.tags.get("sweep.role") == tracking.PARENT_ROLE else "FAILED"
        if _close(store, run, status, closer, _dead_reason(run, lease_s)):
            closed.append(run.info.run_id)
    return closed
