"""Progressive pod-IP SANs: which volumes wait for their pod's IP, and when to reissue.

kubelet mounts volumes before the pod sandbox has an IP, so a volume asking for
``${POD_IP}``/``${POD_IPS}`` gets a first certificate without them and waits here. When the pod
watch reports the pod's IPs, the volume is handed to the renewal scheduler at once: the normal
renewal path reissues with the IPs and swaps the files atomically. The IPs only ever come from
the watch (``PodIPSource``), looked up by the uid kubelet gave for the volume's pod.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from agent.errors import FailedPrecondition
from agent.observe.metrics import AgentMetrics
from agent.spec.model import CertificateSpec, PodInfo

log = logging.getLogger(__name__)


class PodIPSource(Protocol):
    """agent.kube.pods.PodIPWatch, as the volume manager uses it."""

    def start(self) -> None: ...

    def ensure_started(self, timeout: float) -> None: ...

    def ips(self, uid: str) -> tuple[str, ...] | None: ...

    def seen_at(self, uid: str) -> float | None: ...


class PodIPTracker:
    """Thread-safe; ``reissue(volume_id)`` hands a volume to the renewal path."""

    def __init__(
        self,
        metrics: AgentMetrics,
        *,
        disabled_reason: str = "this agent runs without Kubernetes (--standalone)",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.source: PodIPSource | None = None
        self.disabled_reason = disabled_reason
        self.reissue: Callable[[str], None] = lambda volume_id: None
        self.wait_timeout = 10.0
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._volumes: dict[str, tuple[str, tuple[str, ...]]] = {}  # id -> (pod uid, IPs carried)

    def spec_for_issue(
        self, spec: CertificateSpec, pod: PodInfo, attribute: str = "ip-sans"
    ) -> tuple[CertificateSpec, tuple[str, ...]]:
        """``spec`` with the pod's IPs when the watch knows them, and those IPs.

        Raises when the watch cannot run: PERMISSION_DENIED naming the verb when RBAC forbids
        it, FAILED_PRECONDITION when the feature is off.
        """
        if not spec.wants_pod_ips:
            return spec, ()
        source = self.source
        if source is None:
            raise FailedPrecondition(
                f"{attribute} uses ${{{spec.pod_ip_sans.value}}}, which needs the pod watch, but "
                f"{self.disabled_reason}"
            )
        source.ensure_started(self.wait_timeout)
        ips = source.ips(pod.uid) or ()
        return spec.with_pod_ips(ips), ips

    def committed(
        self, volume_id: str, spec: CertificateSpec, pod: PodInfo, ips: tuple[str, ...]
    ) -> None:
        """A certificate carrying ``ips`` (maybe none yet) is now in the volume."""
        if not spec.wants_pod_ips:
            return
        with self._lock:
            previous = self._volumes.get(volume_id)
            self._volumes[volume_id] = (pod.uid, ips)
            waiting = self._count_waiting()
            self._changed.notify_all()
        self.metrics.set_waiting_for_pod_ip(waiting)
        source = self.source
        if source is None:
            return
        if ips and previous is not None and not previous[1]:
            seen = source.seen_at(pod.uid)
            if seen is not None:
                self.metrics.observe_pod_ip_latency(self._clock() - seen)
            log.info(
                "certificate now carries the pod's IPs",
                extra={"volume_id": volume_id, "ips": list(ips)},
            )
        # The IPs may have shown up while this certificate was being issued.
        known = source.ips(pod.uid)
        if known and known != ips:
            self.reissue(volume_id)

    def recovered(
        self, volume_id: str, spec: CertificateSpec, pod: PodInfo, carried: tuple[str, ...]
    ) -> None:
        """A volume served before a restart: track it again (and start the watch it needs)."""
        if not spec.wants_pod_ips:
            return
        if self.source is not None:
            self.source.start()  # without waiting: its first list re-checks every pod
        self.committed(volume_id, spec, pod, carried)

    def on_pod_ips(self, uid: str, ips: tuple[str, ...]) -> None:
        """The pod watch saw ``uid`` get (new) IPs: reissue its volumes that lack them."""
        with self._lock:
            due = [
                vid
                for vid, (owner, carried) in self._volumes.items()
                if owner == uid and carried != ips
            ]
        for volume_id in due:
            log.info("pod got its IPs; reissuing", extra={"volume_id": volume_id, "ips": list(ips)})
            self.reissue(volume_id)

    def forget(self, volume_id: str) -> None:
        with self._lock:
            self._volumes.pop(volume_id, None)
            waiting = self._count_waiting()
        self.metrics.set_waiting_for_pod_ip(waiting)

    def carried(self, volume_id: str) -> tuple[str, ...]:
        """The pod IPs the volume's current certificate carries."""
        with self._lock:
            return self._volumes.get(volume_id, ("", ()))[1]

    def wait_carried(self, volume_id: str, timeout: float) -> bool:
        """Block until the volume's certificate carries pod IPs (tests and benchmarks)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: bool(self._volumes.get(volume_id, ("", ()))[1]), timeout
            )

    def waiting(self) -> list[str]:
        with self._lock:
            return sorted(vid for vid, (_uid, carried) in self._volumes.items() if not carried)

    def _count_waiting(self) -> int:
        return sum(1 for _uid, carried in self._volumes.values() if not carried)
