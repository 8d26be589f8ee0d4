"""Waiting for one CertificateRequest: watch it until Ready, failed, deleted or the deadline.

A dropped or expired (410) watch lists the request again and watches from the list's
resourceVersion, which is current, never from the object's own, which may be compacted away.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import cast

from agent.errors import IssuanceFailed
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.issuers.cr_request import Obj, collection_path
from agent.issuers.cr_status import not_ready_error, outcome
from agent.kube.client import backoff_delay, is_retryable, map_api_error, with_retries
from agent.kube.rest import ApiClient, KubeApiError, KubeUnreachable, Watch

# The cert-manager issuer's logger: waiting logs as part of it, as before the split.
log = logging.getLogger("agent.issuers.certmanager")


class RequestWaiter:
    """Watches CertificateRequests through ``objects`` (the agent's rate-limited client)."""

    def __init__(self, api: ApiClient, clock: Callable[[], float]) -> None:
        self._api = api
        self._clock = clock

    def wait(
        self, cr: Obj, rv: str, request: IssueRequest, deadline: float, timeout_seconds: float
    ) -> IssuedCertificate:
        """Watch ``cr`` from resourceVersion ``rv`` until it is Ready, failed, or the deadline."""
        namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
        what = f'watch certificaterequests.cert-manager.io "{name}" in namespace "{namespace}"'
        obj = cr
        failures = 0
        while True:
            issued = outcome(obj, request.csr_pem)
            if issued is not None:
                return issued
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise not_ready_error(obj, timeout_seconds)
            watch = self._watch(namespace, name, rv, remaining)
            try:
                for event in watch:
                    if event["type"] == "DELETED":
                        raise IssuanceFailed(
                            f"CertificateRequest {namespace}/{name} was deleted while the agent "
                            "waited for it; the next mount attempt creates a new one",
                            reason="request_deleted",
                        )
                    if event["type"] in ("ADDED", "MODIFIED"):
                        obj = event["object"]
                        rv = obj["metadata"].get("resourceVersion", rv)
                        issued = outcome(obj, request.csr_pem)
                        if issued is not None:
                            return issued
                failures = 0
            except KubeApiError as exc:
                if exc.status != 410:
                    failures = self._watch_failed(exc, what, deadline, failures)
            except KubeUnreachable as exc:
                failures = self._watch_failed(exc, what, deadline, failures)
            # The stream ended, dropped or expired (410): list again, then watch from the list.
            obj, rv = self._relist(namespace, name, deadline)

    def _watch(self, namespace: str, name: str, rv: str, remaining: float) -> Watch:
        return self._api.watch(
            collection_path(namespace),
            params={"fieldSelector": f"metadata.name={name}"},
            resource_version=rv,
            # Server-side timeout ends the stream at our deadline; the read timeout is a backstop.
            timeout_seconds=max(1, math.ceil(remaining)),
            read_timeout=remaining + 5,
        )

    def _watch_failed(self, exc: BaseException, what: str, deadline: float, failures: int) -> int:
        if not is_retryable(exc):
            raise map_api_error(exc, what) from exc
        delay = min(backoff_delay(failures), max(0.0, deadline - self._clock()))
        log.info("watch failed, re-watching", extra={"what": what, "error": str(exc)[:200]})
        time.sleep(delay)
        return failures + 1

    def _relist(self, namespace: str, name: str, deadline: float) -> tuple[Obj, str]:
        """The request and the list's resourceVersion (an object's own version may be older
        than the server's watch window; the list's is current)."""
        result = with_retries(
            lambda: cast(
                Obj,
                self._api.get(
                    collection_path(namespace), {"fieldSelector": f"metadata.name={name}"}
                ),
            ),
            what=f'list certificaterequests.cert-manager.io in namespace "{namespace}"',
            deadline=deadline,
            clock=self._clock,
        )
        items = result.get("items") or []
        if not items:
            raise IssuanceFailed(
                f"CertificateRequest {namespace}/{name} was deleted while the agent waited for "
                "it; the next mount attempt creates a new one",
                reason="request_deleted",
            )
        return items[0], result.get("metadata", {}).get("resourceVersion", "")
