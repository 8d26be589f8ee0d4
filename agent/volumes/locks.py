"""Per-volume locks that are created on demand and dropped when nobody holds or waits on them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.errors import Aborted


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock of ``key``; ``timeout=None`` waits, else ABORTED when it is taken."""
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            acquired = lock.acquire(timeout=-1 if timeout is None else timeout)
            if not acquired:
                raise Aborted(f"another operation on volume {key} is in progress; retry later")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)


class ConcurrencyLimit:
    """At most ``limit`` holders at once; others wait their turn (counted, for tests and logs).

    Key generation is pure CPU (RSA-8192 takes seconds): bounding it keeps a burst of publishes
    and renewals from taking every core of the node.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the limit must be at least 1, got {limit}")
        self.limit = limit
        self._cond = threading.Condition()
        self._running = 0
        self._waiting = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._running < self.limit)
            self._waiting -= 1
            self._running += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @property
    def running(self) -> int:
        with self._cond:
            return self._running

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    def wait_until(self, predicate: Callable[[int, int], bool], timeout: float) -> bool:
        """Block until ``predicate(running, waiting)`` holds (or ``timeout``); for tests."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._running, self._waiting), timeout)
