"""Kubelet first: renewals give way to publishes and unpublishes in flight.

A pod waits on NodePublishVolume; a renewal due now can as well run a few milliseconds later.
With thousands of volumes due at once (a CA rotation, a node back from a long sleep) the renewal
workers would otherwise keep the interpreter busy while kubelet's calls queue behind them. Each
renewal waits, before it starts, until no kubelet call is in flight, for at most
``max_wait_seconds`` (so a node that publishes without pause still renews).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KubeletFirst:
    def __init__(self, max_wait_seconds: float = 0.5) -> None:
        self.max_wait_seconds = max_wait_seconds
        self._cond = threading.Condition()
        self._in_flight = 0
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
                if not self._in_flight:
                    self._cond.notify_all()

    def before_renewal(self) -> None:
        """Wait until no kubelet call is in flight (at most ``max_wait_seconds``)."""
        with self._cond:
            if self._in_flight:
                self.waited += 1
                self._cond.wait_for(lambda: not self._in_flight, self.max_wait_seconds)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight
