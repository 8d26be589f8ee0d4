"""When certificates renew, and the one scheduler that renews them all.

One thread sleeps on a condition variable until the earliest due time in a heap; a bounded worker
pool runs the renewals. Nothing runs while nothing is due, so 1,000 idle volumes cost nothing
(cert-manager's csi-driver runs a 1 s ticker per volume instead).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The random spread is at most this share of the lifetime, and never more than MAX_SPREAD_SECONDS:
# enough to take pods started together apart, small next to any sensible renew-before window.
SPREAD_FRACTION = 0.05
MAX_SPREAD_SECONDS = 3600.0


@dataclass(frozen=True)
class RenewalPlan:
    """When to renew, and whether renew-before had to give way to the granted lifetime."""

    due: float
    # renew-before was not shorter than the lifetime the issuer granted (capped by the issuer's
    # maximum or by its CA's own notAfter): the certificate renews at 2/3 of its lifetime instead.
    renew_before_ignored: bool


def plan_renewal(
    not_before: float,
    not_after: float,
    renew_before_seconds: int | None,
    rng: random.Random,
    *,
    now: float | None = None,
    min_interval: float = 0.0,
) -> RenewalPlan:
    """When a certificate valid from ``not_before`` to ``not_after`` (epoch seconds, as issued)
    should renew.

    ``not_after - renew_before`` (default: a third of the lifetime), moved earlier by a random
    spread of up to 5 % of the lifetime (at most an hour), and never before ``not_before``. When
    renew-before is not shorter than the lifetime, a third of the lifetime is used instead (so a
    certificate never renews the moment it is issued). With ``now``, never before
    ``now + min_interval``: whatever the certificate says, a volume does not renew in a loop.
    """
    if renew_before_seconds is not None and renew_before_seconds < 0:
        raise ValueError(f"renew-before must not be negative, got {renew_before_seconds}")
    lifetime = max(0.0, not_after - not_before)
    ignored = renew_before_seconds is not None and renew_before_seconds >= lifetime
    if renew_before_seconds is None or ignored:
        renew_before = lifetime / 3
    else:
        renew_before = float(renew_before_seconds)
    spread = rng.uniform(0.0, min(lifetime * SPREAD_FRACTION, MAX_SPREAD_SECONDS))
    due = max(not_before, not_after - renew_before - spread)
    if now is not None:
        due = max(due, now + min_interval)
    return RenewalPlan(due=due, renew_before_ignored=ignored)


def renewal_due(
    not_before: float, not_after: float, renew_before_seconds: int | None, rng: random.Random
) -> float:
    """``plan_renewal(...).due`` without a floor (see there)."""
    return plan_renewal(not_before, not_after, renew_before_seconds, rng).due


def backoff_delay(attempt: int, rng: random.Random, base: float = 2.0, cap: float = 300.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...) of a failed renewal.

    Exponential (``base * 2**(attempt-1)``, capped at ``cap``) with "equal jitter": half of it is
    fixed and half random, so retries of many volumes spread out yet never collapse to zero.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    # min() on the exponent first: 2**attempt overflows a float for large attempt counts.
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 64))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


class RenewalScheduler:
    """One thread + a heap keyed on due time for all volumes; a bounded worker pool runs renewals.

    ``renew(volume_id)`` returns the next due time (scheduled), ``None`` (the volume is forgotten)
    or raises (retried after ``backoff_delay(attempt)``; the count resets after a success). A call
    to ``schedule`` or ``cancel`` for a volume while its renewal runs wins over that run's result.
    A volume is never renewed twice at the same time, and never started again less than
    ``min_interval`` seconds after its previous start (a later due time wins; this is the hard
    floor behind every due time, retries and CA-rotation reissues included).
    """

    # Longest single sleep: the condition's timeout runs on the monotonic clock while due times
    # are wall-clock, so after a clock jump or a suspend the thread looks again within this bound.
    max_sleep_seconds = 600.0

    def __init__(
        self,
        renew: Callable[[str], float | None],
        *,
        workers: int = 2,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_retry: Callable[[str, int, float], None] | None = None,
        min_interval: float = 0.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"renewal workers must be at least 1, got {workers}")
        if min_interval < 0:
            raise ValueError(f"the minimum renewal interval must not be negative: {min_interval}")
        self._min_interval = min_interval
        self._last_start: dict[str, float] = {}  # volume -> clock time its last run started
        self._renew = renew
        self._workers = workers
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._on_retry = on_retry
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []  # (due, generation, volume_id)
        self._entries: dict[str, tuple[int, float]] = {}  # volume -> (generation, due), not started
        self._running: set[str] = set()  # submitted to the pool, not finished
        self._touched: set[str] = set()  # scheduled/cancelled while running: the run's result loses
        self._attempts: dict[str, int] = {}  # consecutive failures
        self._generations = itertools.count()
        self._sleep_until = math.inf  # what the thread waits for; schedule() wakes it if earlier
        self._wakeups = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------------------- public

    def schedule(self, volume_id: str, due: float) -> None:
        """Renew ``volume_id`` at ``due`` (clock seconds), replacing any earlier schedule of it."""
        with self._cond:
            self._schedule_locked(volume_id, due)

    def cancel(self, volume_id: str) -> None:
        """Forget ``volume_id``; a queued run does not start, a running one finishes unheeded."""
        with self._cond:
            self._entries.pop(volume_id, None)
            self._attempts.pop(volume_id, None)
            self._last_start.pop(volume_id, None)
            if volume_id in self._running:
                self._touched.add(volume_id)

    def due_time(self, volume_id: str) -> float | None:
        """The scheduled due time, or None when none is pending (unknown, cancelled or running)."""
        with self._cond:
            entry = self._entries.get(volume_id)
            return None if entry is None else entry[1]

    def pending(self) -> int:
        """How many volumes have a renewal scheduled that has not started yet."""
        with self._cond:
            return len(self._entries)

    def running(self) -> int:
        """How many renewals are queued in or running on the worker pool."""
        with self._cond:
            return len(self._running)

    @property
    def wakeups(self) -> int:
        """How often the scheduler thread woke up (stays flat while nothing is due)."""
        with self._cond:
            return self._wakeups

    def wake(self) -> None:
        """Look at the heap now (after a wall-clock jump, or a fake clock moved in tests)."""
        with self._cond:
            self._cond.notify_all()

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the renewal scheduler was already started")
            self._pool = ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="cert-agent-renew"
            )
            self._thread = threading.Thread(
                target=self._loop, name="cert-agent-scheduler", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Stop dispatching and wait up to ``timeout`` seconds for running renewals to finish."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, pool = self._thread, self._pool
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        if pool is not None:
            # Queued runs see _stopping and return at once; running ones get the rest of timeout.
            pool.shutdown(wait=False)
            with self._cond:
                self._cond.wait_for(
                    lambda: not self._running, max(0.0, deadline - time.monotonic())
                )

    # ----------------------------------------------------------------------------- internal

    def _schedule_locked(self, volume_id: str, due: float) -> None:
        generation = next(self._generations)
        self._entries[volume_id] = (generation, due)
        heapq.heappush(self._heap, (due, generation, volume_id))
        if volume_id in self._running:
            self._touched.add(volume_id)
        # Replaced entries stay in the heap until popped; rebuild it when they dominate.
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(d, g, v) for v, (g, d) in self._entries.items()]
            heapq.heapify(self._heap)
        if due < self._sleep_until:
            self._cond.notify_all()

    def _is_current(self, generation: int, volume_id: str) -> bool:
        entry = self._entries.get(volume_id)
        return entry is not None and entry[0] == generation

    def _loop(self) -> None:
        with self._cond:
            while not self._stopping:
                # Drop stale heads (replaced or cancelled) without sleeping on them.
                while self._heap and not self._is_current(self._heap[0][1], self._heap[0][2]):
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wait(math.inf)
                    continue
                due, generation, volume_id = self._heap[0]
                now = self._clock()
                if due > now:
                    self._wait(due, due - now)
                    continue
                heapq.heappop(self._heap)
                if volume_id in self._running:
                    # Still renewing from before: the entry stays and is pushed again when the
                    # running renewal finishes, so the two never overlap.
                    continue
                earliest = self._last_start.get(volume_id, -math.inf) + self._min_interval
                if earliest > now:
                    # Too soon after the previous run: move it to the floor instead.
                    self._entries[volume_id] = (generation, earliest)
                    heapq.heappush(self._heap, (earliest, generation, volume_id))
                    continue
                del self._entries[volume_id]
                self._last_start[volume_id] = now
                self._running.add(volume_id)
                assert self._pool is not None
                try:
                    self._pool.submit(self._run, volume_id)
                except RuntimeError:  # the interpreter is shutting down
                    self._running.discard(volume_id)
                    log.warning("renewal scheduler stopped: cannot start workers")
                    break
            self._sleep_until = -math.inf

    def _wait(self, until: float, seconds: float | None = None) -> None:
        # Nothing scheduled: sleep until schedule() notifies; a clock jump cannot matter then.
        timeout = None if seconds is None else min(seconds, self.max_sleep_seconds)
        # When it looks at the heap again: the due time, or sooner when the sleep is capped.
        # schedule() wakes it only for a due time before that (a new volume's renewal, weeks
        # away, then costs the publish no wake-up of this thread).
        self._sleep_until = until if timeout is None else min(until, self._clock() + timeout)
        self._cond.wait(timeout)
        self._sleep_until = -math.inf  # awake: every schedule() until the next wait is seen anyway
        self._wakeups += 1

    def _run(self, volume_id: str) -> None:
        with self._cond:
            if self._stopping or volume_id in self._touched:
                self._finish_locked(volume_id)
                return
        retry: tuple[int, float] | None = None
        try:
            next_due = self._renew(volume_id)
            error: Exception | None = None
        except Exception as exc:
            next_due, error = None, exc
        with self._cond:
            touched = volume_id in self._touched
            self._finish_locked(volume_id)
            if error is None:
                self._attempts.pop(volume_id, None)
            if touched or self._stopping:
                pass  # a newer schedule (maybe by renew itself) or a cancel came in: it stands
            elif error is None:
                if next_due is not None:
                    self._schedule_locked(volume_id, next_due)
                else:
                    self._last_start.pop(volume_id, None)  # forgotten by the manager
            else:
                attempt = self._attempts.get(volume_id, 0) + 1
                self._attempts[volume_id] = attempt
                delay = backoff_delay(attempt, self._rng)
                self._schedule_locked(volume_id, self._clock() + delay)
                retry = (attempt, delay)
        if error is not None and retry is not None:
            log.warning(
                "renewal failed, retrying in %.1fs: %s",
                retry[1],
                error,
                extra={"volume_id": volume_id, "attempt": retry[0], "retry_in": retry[1]},
            )
            if self._on_retry is not None:
                try:
                    self._on_retry(volume_id, retry[0], retry[1])
                except Exception:
                    log.exception("on_retry callback failed", extra={"volume_id": volume_id})

    def _finish_locked(self, volume_id: str) -> None:
        self._running.discard(volume_id)
        self._touched.discard(volume_id)
        entry = self._entries.get(volume_id)
        if entry is not None:
            # A schedule() made while this run was queued or running was left in _entries (and
            # possibly popped from the heap already): put it back so the thread sees it.
            heapq.heappush(self._heap, (entry[1], entry[0], volume_id))
        self._cond.notify_all()
