"""Per-volume locks that are created on demand and dropped when nobody holds or waits on them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
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
