"""Where start-up time goes: a timeline of steps from the first import of the ``agent`` package
until the CSI socket serves, logged once with "agent serving" (``startup_ms``).

One timeline per process (a process starts once); the steps are marked by ``cli`` (imports,
configuration) and the agent's assembly (data root, CA, manager, gRPC).
"""

from __future__ import annotations

import threading
import time

import agent


class StartupTimeline:
    """Milliseconds spent in each named step, in the order they ended."""

    def __init__(self, origin: float) -> None:
        self._lock = threading.Lock()
        self._origin = self._last = origin
        self._steps: dict[str, float] = {}

    def mark(self, step: str) -> None:
        """``step`` ended now: it took the time since the previous mark (or the origin)."""
        with self._lock:
            now = time.monotonic()
            self._steps[step] = self._steps.get(step, 0.0) + (now - self._last) * 1000
            self._last = now

    def report(self) -> dict[str, float]:
        """The steps so far and ``total`` (from the origin to the last mark), in ms."""
        with self._lock:
            steps = {name: round(ms, 1) for name, ms in self._steps.items()}
            steps["total"] = round((self._last - self._origin) * 1000, 1)
            return steps


# From the first import of the package: the first thing a `cert-agent` process does after the
# interpreter itself has started.
TIMELINE = StartupTimeline(agent.IMPORTED_AT)
