"""The few API calls of the PodCertificateRequest signer, as plain JSON (no model classes).

``get_pod`` (one GET to check the requesting pod), and ``write_status``: a PUT to the ``status``
subresource with the object's resourceVersion, retried on 409 Conflict against a fresh copy as
long as the request is still unanswered. Transient failures (429, 5xx, dropped connections) are
retried with backoff by ``with_retries`` until the deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, cast

from agent.errors import Aborted, PermissionDenied
from agent.kube.client import NotFound, with_retries
from agent.kube.rest import ApiClient

log = logging.getLogger(__name__)

Obj = dict[str, Any]
TERMINAL_CONDITIONS = ("Issued", "Denied", "Failed")
CALL_SECONDS = 30.0  # how long one call keeps retrying transient failures
CONFLICT_RETRIES = 5


def is_pending(pcr: Obj) -> bool:
    """No ``Issued``, ``Denied`` or ``Failed`` condition yet (the API allows one, once)."""
    conditions = (pcr.get("status") or {}).get("conditions") or []
    return not any(
        c.get("type") in TERMINAL_CONDITIONS and c.get("status") == "True" for c in conditions
    )


def describe(pcr: Obj) -> str:
    meta = pcr.get("metadata") or {}
    return f"podcertificaterequests {meta.get('namespace')}/{meta.get('name')}"


class PcrClient:
    def __init__(self, api: ApiClient, *, clock: Callable[[], float] = time.monotonic):
        self.api = api
        self._clock = clock

    def get_pod(self, namespace: str, name: str) -> Obj | None:
        """The pod, or None when it does not exist."""
        try:
            return self._request(
                "GET",
                f"/api/v1/namespaces/{namespace}/pods/{name}",
                None,
                f'get pods "{name}" in namespace "{namespace}"',
            )
        except NotFound:
            return None

    def get(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._request(
                "GET",
                _path(namespace, name),
                None,
                f'get podcertificaterequests "{name}" in namespace "{namespace}"',
            )
        except NotFound:
            return None

    def write_status(self, pcr: Obj, status: Obj) -> Obj | None:
        """Put ``status`` on the PCR. None when the PCR is gone or already answered meanwhile
        (by another signer instance); raises the API's refusal (e.g. 422) otherwise."""
        meta = pcr["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        current = pcr
        for _attempt in range(CONFLICT_RETRIES):
            body = dict(current)
            body["status"] = status
            try:
                return self._request(
                    "PUT",
                    _path(namespace, name) + "/status",
                    body,
                    f"update {describe(pcr)}/status",
                )
            except NotFound:
                return None
            except PermissionDenied as exc:
                signer = (pcr.get("spec") or {}).get("signerName")
                raise PermissionDenied(
                    f"{exc.message}. Writing a PodCertificateRequest's status needs update on "
                    f'podcertificaterequests/status and "sign" on signers named "{signer}" '
                    "(apiGroup certificates.k8s.io): deploy/components/pod-certificates"
                ) from exc
            except Aborted:
                log.info("conflict writing PCR status, reading it again", extra={"pcr": name})
                fresh = self.get(namespace, name)
                if fresh is None or not is_pending(fresh):
                    return None
                current = fresh
        raise Aborted(f"update {describe(pcr)}/status kept conflicting; will retry")

    def _request(self, method: str, path: str, body: Obj | None, what: str) -> Obj:
        return with_retries(
            lambda: cast(Obj, self.api.request(method, path, body=body, timeout=CALL_SECONDS)),
            what=what,
            deadline=self._clock() + CALL_SECONDS,
        )


def _path(namespace: str, name: str) -> str:
    return f"/apis/certificates.k8s.io/v1beta1/namespaces/{namespace}/podcertificaterequests/{name}"
