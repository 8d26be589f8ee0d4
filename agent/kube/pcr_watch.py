"""One list+watch of this node's PodCertificateRequests for one signer name.

``fieldSelector=spec.nodeName=<node>,spec.signerName=<signer>`` across all namespaces, so the
API server sends each node only its own requests (no leader election, load per node). The loop is
``kube/list_watch.ListWatch`` (410 Gone lists again: requests that arrived meanwhile come with that
list). Each ADDED/MODIFIED object (and each listed one) goes to ``on_object`` with the
monotonic time it arrived, DELETED ones to ``on_deleted``; the consumer decides what is pending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError
from agent.kube.client import backoff_delay, map_api_error
from agent.kube.list_watch import WATCH_SECONDS, ListWatch
from agent.kube.rest import ApiClient, KubeApiError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
# Across namespaces; the field selector narrows it to this node and signer.
PCR_LIST_PATH = "/apis/certificates.k8s.io/v1beta1/podcertificaterequests"


def pcr_field_selector(node: str, signer: str) -> str:
    return f"spec.nodeName={node},spec.signerName={signer}"


class PcrWatch(ListWatch):
    """Delivers this node's PCRs of one signer to callbacks, from one thread."""

    stop_wait_seconds = 10.0

    def __init__(
        self,
        api: ApiClient,
        *,
        node: str,
        signer: str,
        on_object: Callable[[Obj, float], None],
        on_deleted: Callable[[Obj], None],
        watch_seconds: int = WATCH_SECONDS,
        backoff: Callable[[int], float] = backoff_delay,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.field_selector = pcr_field_selector(node, signer)
        super().__init__(
            api,
            PCR_LIST_PATH,
            params={"fieldSelector": self.field_selector},
            what=f"list podcertificaterequests with fieldSelector {self.field_selector}",
            name=f"pcr-{signer}",
            watch_seconds=watch_seconds,
            backoff=backoff,
            clock=clock,
        )
        self.signer = signer
        self._on_object = on_object
        self._on_deleted = on_deleted
        self._listed = threading.Event()

    def wait_listed(self, timeout: float) -> bool:
        return self._listed.wait(timeout)

    # ---- what the loop hands over

    def _api_error(self, exc: KubeApiError) -> AgentError:
        error = map_api_error(exc, self.what)
        if exc.status == 404:
            error.message += (
                "; is the PodCertificateRequest API on? kube-apiserver needs "
                "--feature-gates=PodCertificateRequest=true and "
                "--runtime-config=certificates.k8s.io/v1beta1=true"
            )
        return error

    def _dropped(self, exc: Exception) -> None:
        # A dropped watch is routine (the server's timeout, a restart): not an error to keep.
        log.info("PCR watch dropped", extra={"what": self.what, "error": str(exc)[:200]})

    def _take_list(self, items: list[Obj], arrived: float) -> None:
        for obj in items:
            if self._stop.is_set():
                return
            self._call(lambda o: self._on_object(o, arrived), obj)
        self._listed.set()

    def _take_event(self, kind: str, obj: Obj, arrived: float) -> None:
        if kind in ("ADDED", "MODIFIED"):
            self._call(lambda o: self._on_object(o, arrived), obj)
        elif kind == "DELETED":
            self._call(self._on_deleted, obj)

    def _call(self, callback: Callable[[Obj], None], obj: Obj) -> None:
        try:
            callback(obj)
        except Exception:
            log.exception("PCR handler failed", extra={"what": self.what})
