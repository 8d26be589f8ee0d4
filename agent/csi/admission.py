"""Admission control: volume operations never take the gRPC workers that Probe needs.

gRPC's synchronous server runs every call on one thread pool. If publishes (key generation,
issuance that may wait for cert-manager) could fill it, kubelet's livenessprobe sidecar would
wait behind them for its Probe, time out after 3 s and have the agent restarted. So the pool has
``limit + RESERVED_WORKERS`` threads and at most ``limit`` volume operations run at once; one more
is answered RESOURCE_EXHAUSTED at once (kubelet retries with backoff) instead of queueing. The
calls that are always answered at once (Identity, NodeGetCapabilities, NodeGetInfo) then always
find a free worker.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from agent.errors import ResourceExhausted

# Workers kept for the calls that answer at once: the livenessprobe's Probe, the registrar's
# GetPluginInfo and kubelet's NodeGetCapabilities/NodeGetInfo, plus rejections beyond the limit.
RESERVED_WORKERS = 2


class VolumeOperationSlots:
    """At most ``limit`` volume operations at once; one more is refused, never queued."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the volume operation limit must be at least 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._in_use = 0

    @property
    def pool_size(self) -> int:
        """Threads the gRPC server needs so that the reserved calls always find one."""
        return self.limit + RESERVED_WORKERS

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._in_use

    @contextlib.contextmanager
    def hold(self, method: str) -> Iterator[None]:
        with self._lock:
            if self._in_use >= self.limit:
                raise ResourceExhausted(
                    f"{method}: the agent is busy with {self.limit} volume operations "
                    "(--grpc-workers); kubelet retries shortly"
                )
            self._in_use += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use -= 1
