"""The cert-manager issuer: a CertificateRequest per issuance, waited for with a watch.

This module keeps the bookkeeping: find a volume's requests, reuse a pending one, create,
delete the failed and superseded ones. The object itself is built in ``cr_request``, read in
``cr_status`` and waited for in ``cr_wait``.

Only the CSR leaves the node. The request lives in the pod's namespace, is owned by the Pod (so
the garbage collector removes it with the pod) and is labelled with the volume, so a kubelet retry
after a timeout finds and reuses the request that is still pending instead of creating another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import cast

from agent.errors import AgentError, DeadlineExceeded, FailedPrecondition, Internal, Unavailable
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.issuers.cr_request import (
    ANNOTATION_VOLUME,
    GROUP,
    LABEL_NODE,
    LABEL_POD,
    LABEL_VOLUME,
    PLURAL,
    VERSION,
    Obj,
    build_request,
    collection_path,
    go_duration,
    volume_label,
)
from agent.issuers.cr_status import (
    annotation_volume,
    cr_name,
    issuer_ref,
    public_key_der,
    request_key,
    request_state,
    wanted_issuer_ref,
)
from agent.issuers.cr_wait import RequestWaiter
from agent.kube.client import NotFound, bearer_token_client, with_retries
from agent.kube.rest import ApiClient

__all__ = [  # tests and docs import these from here
    "ANNOTATION_VOLUME",
    "LABEL_NODE",
    "LABEL_POD",
    "LABEL_VOLUME",
    "CertManagerIssuer",
    "go_duration",
]

log = logging.getLogger(__name__)

# Deletions of superseded requests are best effort and get their own short budget.
CLEANUP_SECONDS = 5.0
PROBLEM_MEMORY_SECONDS = 120.0


class CertManagerIssuer:
    """Signs through cert-manager by creating CertificateRequests (implements ``Issuer``)."""

    def __init__(
        self,
        api: ApiClient,
        *,
        node_id: str,
        driver_name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._node_id = node_id
        self._driver_name = driver_name
        self._clock = clock
        self._waiter = RequestWaiter(api, clock)
        self._lock = threading.Lock()
        # volume id -> name of a request we stopped waiting for on timeout. Such a request may
        # become Ready before the retry; it is still ours to use (a Ready one is otherwise only
        # reused from memory, because with reuse-private-key an old Ready request of the same key
        # holds the certificate being renewed).
        self._abandoned: dict[str, str] = {}
        # The last API failure and when; it stops counting after PROBLEM_MEMORY_SECONDS so one
        # blip does not leave the issuer "not ready" while no volume needs it.
        self._api_problem: tuple[str, float] | None = None

    @property
    def name(self) -> str:
        return "cert-manager"

    def ready(self) -> tuple[bool, str]:
        with self._lock:
            problem = self._api_problem
        if problem and time.monotonic() - problem[1] < PROBLEM_MEMORY_SECONDS:
            return False, problem[0]
        return True, ""

    def forget(self, volume_id: str) -> None:
        """The volume is gone: drop what we remembered about its requests."""
        with self._lock:
            self._abandoned.pop(volume_id, None)

    # ---- issue

    def issue(self, request: IssueRequest, timeout_seconds: float) -> IssuedCertificate:
        ref = request.spec.issuer
        if ref.is_local or ref.name is None:
            raise Internal(f"the cert-manager issuer was asked to sign for {ref.describe()}")
        namespace = request.pod.namespace
        deadline = self._clock() + timeout_seconds
        try:
            existing, list_rv = self._list_volume_requests(namespace, request.volume_id, deadline)
            cr = self._find_reusable(existing, request)
            if cr is None:
                existing = self._delete_failed(namespace, existing)
                cr, list_rv = self._create(request, deadline)
            else:
                log.info(
                    "reusing pending CertificateRequest",
                    extra={"volume_id": request.volume_id, "request": cr_name(cr)},
                )
            name = cr["metadata"]["name"]
            try:
                issued = self._waiter.wait(cr, list_rv, request, deadline, timeout_seconds)
            except DeadlineExceeded:
                with self._lock:
                    self._abandoned[request.volume_id] = name
                raise
            except AgentError:
                with self._lock:
                    self._abandoned.pop(request.volume_id, None)
                raise
            finally:
                self._api_ok()
        except Unavailable as exc:
            with self._lock:
                self._api_problem = (exc.message, time.monotonic())
            raise
        with self._lock:
            self._abandoned.pop(request.volume_id, None)
        self._delete_superseded(namespace, existing, keep=name)
        return issued

    # ---- finding, creating and deleting requests

    def _list_volume_requests(
        self, namespace: str, volume_id: str, deadline: float
    ) -> tuple[list[Obj], str]:
        """The volume's requests, oldest first, and the list's resourceVersion to watch from."""
        selector = f"{LABEL_VOLUME}={volume_label(volume_id)}"
        try:
            result = with_retries(
                lambda: cast(
                    Obj, self._api.get(collection_path(namespace), {"labelSelector": selector})
                ),
                what=f'list certificaterequests.cert-manager.io in namespace "{namespace}"',
                deadline=deadline,
                clock=self._clock,
            )
        except NotFound as exc:
            raise FailedPrecondition(
                f"the Kubernetes API does not serve {PLURAL}.{GROUP}/{VERSION}: install "
                f"cert-manager (and its CRDs) to use cert-manager issuers ({exc.message})"
            ) from exc
        items = [i for i in result.get("items", []) if annotation_volume(i) in (None, volume_id)]
        items.sort(key=lambda i: i["metadata"].get("creationTimestamp", ""))
        return items, result.get("metadata", {}).get("resourceVersion", "")

    def _find_reusable(self, existing: list[Obj], request: IssueRequest) -> Obj | None:
        wanted = public_key_der(request.csr_pem)
        with self._lock:
            abandoned = self._abandoned.get(request.volume_id)
        for cr in reversed(existing):  # newest first
            if issuer_ref(cr) != wanted_issuer_ref(request) or request_key(cr) != wanted:
                continue
            state = request_state(cr)
            if state == "pending" or (state == "ready" and cr["metadata"]["name"] == abandoned):
                return cr
        return None

    def _create(self, request: IssueRequest, deadline: float) -> tuple[Obj, str]:
        """Create the request (or find the one a lost answer created), and a version to watch
        it from."""
        namespace = request.pod.namespace
        body = self.build_request(request)
        token = request.service_account_token
        api = bearer_token_client(self._api, token) if token else self._api
        attempts = 0

        def create() -> tuple[Obj, str]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                # The previous attempt may have succeeded with its answer lost: look first.
                again, rv = self._list_volume_requests(namespace, request.volume_id, deadline)
                found = self._find_reusable(again, request)
                if found is not None:
                    return found, rv
            created = cast(Obj, api.request("POST", collection_path(namespace), body=body))
            return created, created["metadata"]["resourceVersion"]

        who = "the pod's service account" if token else "the agent"
        cr, rv = with_retries(
            create,
            what=f'create certificaterequests.cert-manager.io in namespace "{namespace}" '
            f"(as {who})",
            deadline=deadline,
            clock=self._clock,
        )
        log.info(
            "created CertificateRequest",
            extra={"volume_id": request.volume_id, "request": cr_name(cr), "as": who},
        )
        return cr, rv

    def build_request(self, request: IssueRequest) -> Obj:
        """The CertificateRequest object for ``request`` (public for tests and docs)."""
        return build_request(request, node_id=self._node_id, driver_name=self._driver_name)

    def _delete_failed(self, namespace: str, existing: list[Obj]) -> list[Obj]:
        """Before a new attempt, drop denied/failed requests so retries do not pile them up.

        Returns the requests that are left."""
        left = []
        for cr in existing:
            if request_state(cr) == "failed":
                self._delete(namespace, cr)
            else:
                left.append(cr)
        return left

    def _delete_superseded(self, namespace: str, existing: list[Obj], keep: str) -> None:
        for cr in existing:
            if cr["metadata"]["name"] != keep:
                self._delete(namespace, cr)

    def _delete(self, namespace: str, cr: Obj) -> None:
        name = cr["metadata"]["name"]
        try:
            with_retries(
                lambda: self._api.request("DELETE", f"{collection_path(namespace)}/{name}"),
                what=f'delete certificaterequests.cert-manager.io "{name}" in namespace '
                f'"{namespace}"',
                deadline=self._clock() + CLEANUP_SECONDS,
                clock=self._clock,
            )
        except NotFound:
            pass
        except AgentError as exc:
            # Leftovers are harmless (the pod owns them); say so and go on.
            log.warning("could not delete old CertificateRequest", extra={"error": exc.message})

    def _api_ok(self) -> None:
        with self._lock:
            self._api_problem = None
