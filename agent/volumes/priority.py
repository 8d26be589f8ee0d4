"""Kubelet first: renewals give way to publishes and unpublishes in flight.

A pod waits on NodePublishVolume; a renewal due now can as well run a few milliseconds later.
With thousands of volumes due at once (a CA rotation, a node back from a long sleep) the renewal
workers would otherwise keep the interpreter busy while kubelet's calls queue behind them. Each
renewal waits, before it starts, until no kubelet call is in flight and none ended in the last
``quiet_seconds`` (kubelet mounts a pod's volumes, and a node's pods, one call after another:
a renewal squeezed into the gap between two calls would compete with the next one for the
interpreter), for at most ``max_wait_seconds`` (so a node that publishes without pause still
renews).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class KubeletFirst:
    def __init__(
        self,
        max_wait_seconds: float = 0.5,
        quiet_seconds: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_wait_seconds = max_wait_seconds
        self.quiet_seconds = quiet_seconds
        self._clock = clock
        self._cond = threading.Condition()
        self._in_flight = 0
        self._last_end = -float("inf")
        self.waited = 0  # renewals that found kubelet calls in flight (for tests and the bench)

    @contextmanager
    def kubelet_call(self) -> Iterator[None]:
        with self._cond:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._last_end = self._clock()
                if not self._in_flight:
                    self._cond.notify_all()

    def before_renewal(self) -> None:
        """Wait for ``quiet_seconds`` without kubelet calls (``max_wait_seconds`` at most)."""
        with self._cond:
            now = self._clock()
            deadline = now + self.max_wait_seconds
            if not self._in_flight and now - self._last_end >= self.quiet_seconds:
                return
            self.waited += 1
            while now < deadline:
                if self._in_flight:
                    self._cond.wait(deadline - now)
                else:
                    quiet_at = self._last_end + self.quiet_seconds
                    if now >= quiet_at:
                        return
                    self._cond.wait(min(quiet_at, deadline) - now)
                now = self._clock()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight
