"""One list+watch of this node's PodCertificateRequests for one signer name.

``fieldSelector=spec.nodeName=<node>,spec.signerName=<signer>`` across all namespaces, so the
API server sends each node only its own requests (no leader election, load per node). List, then
watch from the list's resourceVersion; a dropped watch resumes from the last version seen; 410 Gone
lists again (requests that arrived meanwhile come with that list); other failures back off with
full jitter. Each ADDED/MODIFIED object (and each listed one) goes to ``on_object`` with the
monotonic time it arrived, DELETED ones to ``on_deleted``; the consumer decides what is pending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError
from agent.kube.client import backoff_delay, is_retryable, map_api_error
from agent.kube.rest import ApiClient, KubeApiError, KubeUnreachable, Watch

log = logging.getLogger(__name__)

Obj = dict[str, Any]
WATCH_SECONDS = 300  # server-side timeout of one watch; then we simply watch again
# Across namespaces; the field selector narrows it to this node and signer.
PCR_LIST_PATH = "/apis/certificates.k8s.io/v1beta1/podcertificaterequests"


def pcr_field_selector(node: str, signer: str) -> str:
    return f"spec.nodeName={node},spec.signerName={signer}"


class PcrWatch:
    """Delivers this node's PCRs of one signer to callbacks, from one thread."""

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
        self._api = api
        self.field_selector = pcr_field_selector(node, signer)
        self.what = f"list podcertificaterequests with fieldSelector {self.field_selector}"
        self.signer = signer
        self._on_object = on_object
        self._on_deleted = on_deleted
        self._watch_seconds = watch_seconds
        self._backoff = backoff
        self._clock = clock
        self._resource_version: str | None = None
        self._stop = threading.Event()
        self._listed = threading.Event()
        self._watcher: Watch | None = None
        self._thread: threading.Thread | None = None
        self.lists = 0  # for tests and logs: 1 + relists after 410 or errors
        self.last_error: AgentError | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pcr-{self.signer}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            watcher = self._watcher
            if watcher is not None:
                watcher.stop()
            thread.join(0.05)

    def wait_listed(self, timeout: float) -> bool:
        return self._listed.wait(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            listed = False
            try:
                if self._resource_version is None:
                    self._list()
                    listed = True
                self._watch()
                failures = 0
                continue
            except KubeApiError as exc:
                if exc.status == 410:
                    self._resource_version = None
                    if not listed:
                        log.info("PCR watch expired, listing again", extra={"what": self.what})
                        continue
                    # Gone even from the version a list just gave: listing again at once would
                    # loop as fast as the server answers (as kube/informer.py), so back off.
                error = map_api_error(exc, self.what)
                if exc.status == 404:
                    error.message += (
                        "; is the PodCertificateRequest API on? kube-apiserver needs "
                        "--feature-gates=PodCertificateRequest=true and "
                        "--runtime-config=certificates.k8s.io/v1beta1=true"
                    )
                self._fail(error, retryable=is_retryable(exc) or exc.status == 410)
            except (KubeUnreachable, ConnectionError, TimeoutError) as exc:
                log.info("PCR watch dropped", extra={"what": self.what, "error": str(exc)[:200]})
            except AgentError as exc:
                self._fail(exc, retryable=True)
            except Exception:
                log.exception("PCR watch failed", extra={"what": self.what})
            if self._stop.wait(self._backoff(failures)):
                return
            failures += 1

    def _fail(self, error: AgentError, *, retryable: bool) -> None:
        self.last_error = error
        level = logging.INFO if retryable else logging.ERROR
        log.log(level, "PCR list/watch failed", extra={"what": self.what, "error": error.message})

    def _list(self) -> None:
        body = self._api.get(PCR_LIST_PATH, {"fieldSelector": self.field_selector})
        arrived = self._clock()
        self.lists += 1
        self.last_error = None
        for obj in body.get("items") or []:
            if self._stop.is_set():
                return
            self._deliver(obj, arrived)
        self._resource_version = (body.get("metadata") or {}).get("resourceVersion")
        self._listed.set()

    def _watch(self) -> None:
        watcher = self._api.watch(
            PCR_LIST_PATH,
            params={"fieldSelector": self.field_selector},
            resource_version=self._resource_version,
            timeout_seconds=self._watch_seconds,
        )
        self._watcher = watcher
        try:
            if self._stop.is_set():
                return
            for event in watcher:
                arrived = self._clock()
                if self._stop.is_set():
                    return
                kind, obj = event.get("type"), event.get("object") or {}
                if kind in ("ADDED", "MODIFIED"):
                    self._deliver(obj, arrived)
                elif kind == "DELETED":
                    self._call(self._on_deleted, obj)
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self._resource_version = version
        finally:
            self._watcher = None

    def _deliver(self, obj: Obj, arrived: float) -> None:
        self._call(lambda o: self._on_object(o, arrived), obj)

    def _call(self, callback: Callable[[Obj], None], obj: Obj) -> None:
        try:
            callback(obj)
        except Exception:
            log.exception("PCR handler failed", extra={"what": self.what})
