"""The pods of this node and their IPs, from ONE list+watch (``fieldSelector=spec.nodeName``).

Volumes asking for ``${POD_IP}``/``${POD_IPS}`` get the addresses from here, and only from here:
the pod's own ``status.podIPs`` as the API server reports it, looked up by the pod's uid (which
kubelet passed with the volume). Host-network pods get nothing: their "pod IP" is the node's
address, shared by every host-network pod on the node, so it identifies none of them.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError, PermissionDenied, Unavailable
from agent.kube.informer import Informer, Obj, Snapshot
from agent.kube.rest import ApiClient

log = logging.getLogger(__name__)

RBAC_HINT = (
    "grant get, list and watch on pods to the agent (kubectl apply -k with the "
    "deploy/components/pod-info component)"
)


def pod_ips(pod: Obj) -> tuple[str, ...]:
    """The pod's own IPs, primary first, normalised; () without one or on the host network."""
    if (pod.get("spec") or {}).get("hostNetwork"):
        return ()
    status = pod.get("status") or {}
    raw = [entry.get("ip", "") for entry in status.get("podIPs") or [] if isinstance(entry, dict)]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    result: list[str] = []
    for text in raw:
        try:
            result.append(ipaddress.ip_address(text).compressed)
        except ValueError:
            log.warning("ignoring a pod IP that is not an address", extra={"ip": str(text)[:64]})
    return tuple(dict.fromkeys(result))


class PodIPWatch:
    """uid -> IPs of this node's pods; ``on_ips(uid, ips)`` when a pod's IPs appear or change.

    The watch starts on first use (``ensure_started``), or at once with ``--pod-watch=on``.
    """

    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        *,
        on_ips: Callable[[str, tuple[str, ...]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        informer_options: dict[str, Any] | None = None,
    ) -> None:
        self.node_name = node_name
        self.on_ips = on_ips
        self._clock = clock
        self._lock = threading.Lock()
        self._ips: dict[str, tuple[str, ...]] = {}
        self._seen: dict[str, float] = {}  # uid -> when its current IPs first showed in the watch
        self._informer = Informer(
            api,
            "/api/v1/pods",
            what=f"list and watch pods with fieldSelector spec.nodeName={node_name}",
            on_change=self._on_change,
            name="pod-watch",
            field_selector=f"spec.nodeName={node_name}",
            **(informer_options or {}),
        )
        self._started = False

    # ---- lifecycle

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        log.info("watching this node's pods for their IPs", extra={"node": self.node_name})
        self._informer.start()

    def stop(self) -> None:
        self._informer.stop()

    @property
    def informer(self) -> Informer:
        return self._informer

    def ensure_started(self, timeout: float) -> None:
        """Start the watch if needed and wait for its first list; raise what keeps it from it."""
        self.start()
        if self._informer.wait_first_list(timeout):
            return
        error = self._informer.last_error
        if isinstance(error, PermissionDenied):
            raise PermissionDenied(f"{error.message}; {RBAC_HINT}")
        detail = error.message if isinstance(error, AgentError) else "no answer yet"
        raise Unavailable(f"the agent cannot {self._informer.what} yet: {detail}")

    # ---- lookups

    def ips(self, uid: str) -> tuple[str, ...] | None:
        """The pod's IPs (primary first); None when the pod is unknown or has none yet."""
        with self._lock:
            return self._ips.get(uid) or None

    def seen_at(self, uid: str) -> float | None:
        """When (``clock``) the watch first reported the pod's current IPs."""
        with self._lock:
            return self._seen.get(uid)

    # ---- the watch's consumer

    def _on_change(self, snapshot: Snapshot) -> None:
        now = self._clock()
        current: dict[str, tuple[str, ...]] = {}
        for pod in snapshot.values():
            uid = (pod.get("metadata") or {}).get("uid")
            node = (pod.get("spec") or {}).get("nodeName")
            if uid and node == self.node_name:  # the field selector says so; never trust blindly
                current[uid] = pod_ips(pod)
        with self._lock:
            changed = [uid for uid, ips in current.items() if ips and self._ips.get(uid) != ips]
            for uid in changed:
                self._seen[uid] = now
            for uid in set(self._seen) - set(current):
                del self._seen[uid]
            self._ips = current
        if self.on_ips is None:
            return
        for uid in changed:
            self.on_ips(uid, current[uid])
