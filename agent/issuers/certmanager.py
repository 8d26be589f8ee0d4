"""The cert-manager issuer: a CertificateRequest per issuance, waited for with a watch.

Only the CSR leaves the node. The request lives in the pod's namespace, is owned by the Pod (so
the garbage collector removes it with the pod) and is labelled with the volume, so a kubelet retry
after a timeout finds and reuses the request that is still pending instead of creating another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, cast

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from agent.errors import (
    AgentError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    IssuanceFailed,
    PermissionDenied,
    Unavailable,
)
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.kube.client import (
    NotFound,
    backoff_delay,
    bearer_token_client,
    is_retryable,
    map_api_error,
    with_retries,
)

log = logging.getLogger(__name__)

GROUP = "cert-manager.io"
VERSION = "v1"
PLURAL = "certificaterequests"
GENERATE_NAME = "cert-agent-"

LABEL_VOLUME = "cert-agent.io/volume-id"
LABEL_NODE = "cert-agent.io/node"
LABEL_POD = "cert-agent.io/pod-name"
ANNOTATION_VOLUME = "cert-agent.io/volume-id"
ANNOTATION_NODE = "cert-agent.io/node"
ANNOTATION_POD = "cert-agent.io/pod-name"

# Deletions of superseded requests are best effort and get their own short budget.
CLEANUP_SECONDS = 5.0
PROBLEM_MEMORY_SECONDS = 120.0
WATCH_CONNECT_TIMEOUT = 10.0

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

Obj = dict[str, Any]


def volume_label(volume_id: str) -> str:
    """A label value for a volume id (68 chars, over the 63 a label allows): sha256, 63 hex."""
    return hashlib.sha256(volume_id.encode()).hexdigest()[:63]


def label_value(value: str) -> tuple[str, bool]:
    """``value`` if it is a valid label value, else its sha256 prefix; and whether it was hashed."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value, False
    return hashlib.sha256(value.encode()).hexdigest()[:63], True


def go_duration(seconds: int) -> str:
    """Go's time.Duration.String() for whole seconds: ``2160h0m0s``, ``5m0s``, ``30s``."""
    if seconds == 0:
        return "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class CertManagerIssuer:
    """Signs through cert-manager by creating CertificateRequests (implements ``Issuer``)."""

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        node_id: str,
        driver_name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._objects = k8s.CustomObjectsApi(api)
        self._node_id = node_id
        self._driver_name = driver_name
        self._clock = clock
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
                    extra={"volume_id": request.volume_id, "request": _ref(cr)},
                )
            name = cr["metadata"]["name"]
            try:
                issued = self._wait(cr, list_rv, request, deadline, timeout_seconds)
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
                    Obj,
                    self._objects.list_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, label_selector=selector
                    ),
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
        items = [i for i in result.get("items", []) if _annotation_volume(i) in (None, volume_id)]
        items.sort(key=lambda i: i["metadata"].get("creationTimestamp", ""))
        return items, result.get("metadata", {}).get("resourceVersion", "")

    def _find_reusable(self, existing: list[Obj], request: IssueRequest) -> Obj | None:
        wanted = _public_key_der(request.csr_pem)
        with self._lock:
            abandoned = self._abandoned.get(request.volume_id)
        for cr in reversed(existing):  # newest first
            if _issuer_ref(cr) != _wanted_issuer_ref(request) or _request_key(cr) != wanted:
                continue
            state = _state(cr)
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
        objects = k8s.CustomObjectsApi(api) if token else self._objects
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
            created = cast(
                Obj,
                objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body),
            )
            return created, created["metadata"]["resourceVersion"]

        who = "the pod's service account" if token else "the agent"
        try:
            cr, rv = with_retries(
                create,
                what=f'create certificaterequests.cert-manager.io in namespace "{namespace}" '
                f"(as {who})",
                deadline=deadline,
                clock=self._clock,
            )
        finally:
            if token:
                api.close()  # type: ignore[no-untyped-call]
        log.info(
            "created CertificateRequest",
            extra={"volume_id": request.volume_id, "request": _ref(cr), "as": who},
        )
        return cr, rv

    def build_request(self, request: IssueRequest) -> Obj:
        """The CertificateRequest object for ``request`` (public for tests and docs)."""
        spec = request.spec
        ref = spec.issuer
        node_id = request.node_id or self._node_id
        node_label, node_hashed = label_value(node_id)
        pod_label, pod_hashed = label_value(request.pod.name)
        annotations = dict(spec.annotations)
        annotations[ANNOTATION_VOLUME] = request.volume_id
        if node_hashed:
            annotations[ANNOTATION_NODE] = node_id
        if pod_hashed:
            annotations[ANNOTATION_POD] = request.pod.name
        usages = [u.lower() for u in spec.key_usages]
        if spec.is_ca and "cert sign" not in usages:
            usages.append("cert sign")  # the CSR carries keyCertSign for a CA; keep them equal
        cr_spec: Obj = {
            "request": base64.b64encode(request.csr_pem).decode("ascii"),
            "issuerRef": {"name": ref.name, "kind": ref.kind, "group": ref.group},
            "isCA": spec.is_ca,
            "usages": usages,
        }
        if spec.duration_seconds is not None:
            cr_spec["duration"] = go_duration(spec.duration_seconds)
        body: Obj = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CertificateRequest",
            "metadata": {
                "generateName": GENERATE_NAME,
                "namespace": request.pod.namespace,
                "labels": {
                    LABEL_VOLUME: volume_label(request.volume_id),
                    LABEL_NODE: node_label,
                    LABEL_POD: pod_label,
                    "app.kubernetes.io/managed-by": self._driver_name,
                },
                "annotations": annotations,
            },
            "spec": cr_spec,
        }
        if request.pod.uid:
            # The garbage collector needs only the uid; blockOwnerDeletion would need
            # permission on pods/finalizers and would hold up pod deletion for nothing.
            body["metadata"]["ownerReferences"] = [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": request.pod.name,
                    "uid": request.pod.uid,
                    "controller": False,
                    "blockOwnerDeletion": False,
                }
            ]
        return body

    def _delete_failed(self, namespace: str, existing: list[Obj]) -> list[Obj]:
        """Before a new attempt, drop denied/failed requests so retries do not pile them up.

        Returns the requests that are left."""
        left = []
        for cr in existing:
            if _state(cr) == "failed":
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
                lambda: self._objects.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name
                ),
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

    # ---- waiting

    def _wait(
        self, cr: Obj, rv: str, request: IssueRequest, deadline: float, timeout_seconds: float
    ) -> IssuedCertificate:
        """Watch ``cr`` from resourceVersion ``rv`` until it is Ready, failed, or the deadline."""
        namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
        what = f'watch certificaterequests.cert-manager.io "{name}" in namespace "{namespace}"'
        obj = cr
        failures = 0
        while True:
            issued = _outcome(obj, request.csr_pem)
            if issued is not None:
                return issued
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise _timeout(obj, timeout_seconds)
            events = self._watch(namespace, name, rv, remaining)
            try:
                for event in events:
                    if event["type"] == "DELETED":
                        raise IssuanceFailed(
                            f"CertificateRequest {namespace}/{name} was deleted while the agent "
                            "waited for it; the next mount attempt creates a new one",
                            reason="request_deleted",
                        )
                    if event["type"] in ("ADDED", "MODIFIED"):
                        obj = event["raw_object"]
                        rv = obj["metadata"].get("resourceVersion", rv)
                        issued = _outcome(obj, request.csr_pem)
                        if issued is not None:
                            return issued
                failures = 0
            except ApiException as exc:
                if exc.status != 410:
                    failures = self._watch_failed(exc, what, deadline, failures)
            except urllib3.exceptions.HTTPError as exc:
                failures = self._watch_failed(exc, what, deadline, failures)
            finally:
                events.close()
            # The stream ended, dropped or expired (410): list again, then watch from the list.
            obj, rv = self._relist(namespace, name, deadline)

    def _watch(
        self, namespace: str, name: str, rv: str, remaining: float
    ) -> Generator[Obj, None, None]:
        watcher = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        stream: Generator[Obj, None, None] = watcher.stream(  # type: ignore[no-untyped-call]
            self._objects.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=rv,
            # Server-side timeout ends the stream at our deadline; the read timeout is a backstop.
            timeout_seconds=max(1, math.ceil(remaining)),
            _request_timeout=(WATCH_CONNECT_TIMEOUT, remaining + 5),
        )
        try:
            yield from stream
        finally:
            stream.close()

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
                self._objects.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, field_selector=f"metadata.name={name}"
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

    def _api_ok(self) -> None:
        with self._lock:
            self._api_problem = None


# ---- reading CertificateRequests


def _ref(cr: Obj) -> str:
    return f"{cr['metadata'].get('namespace')}/{cr['metadata'].get('name')}"


def _annotation_volume(cr: Obj) -> str | None:
    annotations: dict[str, str] = cr["metadata"].get("annotations") or {}
    return annotations.get(ANNOTATION_VOLUME)


def _issuer_ref(cr: Obj) -> tuple[str, str, str]:
    ref = cr.get("spec", {}).get("issuerRef", {})
    return (ref.get("name", ""), ref.get("kind", "Issuer"), ref.get("group", GROUP))


def _wanted_issuer_ref(request: IssueRequest) -> tuple[str, str, str]:
    ref = request.spec.issuer
    return (ref.name or "", ref.kind, ref.group)


def _public_key_der(csr_pem: bytes) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem)
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _request_key(cr: Obj) -> bytes | None:
    try:
        return _public_key_der(base64.b64decode(cr["spec"]["request"]))
    except (KeyError, ValueError, binascii.Error):
        return None


def _conditions(cr: Obj) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in (cr.get("status") or {}).get("conditions") or []}


def _state(cr: Obj) -> str:
    """``ready``, ``failed`` (denied, failed, invalid) or ``pending``."""
    conds = _conditions(cr)
    ready = conds.get("Ready", {})
    if ready.get("status") == "True" and (cr.get("status") or {}).get("certificate"):
        return "ready"
    if (
        conds.get("Denied", {}).get("status") == "True"
        or conds.get("InvalidRequest", {}).get("status") == "True"
        or conds.get("Failed", {}).get("status") == "True"
        or (ready.get("status") == "False" and ready.get("reason") in ("Failed", "Denied"))
    ):
        return "failed"
    return "pending"


def _outcome(cr: Obj, csr_pem: bytes) -> IssuedCertificate | None:
    """The certificate when ``cr`` is Ready, ``None`` while pending; raises when it failed."""
    ref = _ref(cr)
    conds = _conditions(cr)
    denied = conds.get("Denied", {})
    ready = conds.get("Ready", {})
    if denied.get("status") == "True" or (
        ready.get("status") == "False" and ready.get("reason") == "Denied"
    ):
        cond = denied if denied.get("status") == "True" else ready
        raise PermissionDenied(
            f"CertificateRequest {ref} was denied ({cond.get('reason', 'Denied')}): "
            f"{cond.get('message', 'no message')}. Check the approval policy for this "
            "issuer, namespace and service account"
        )
    for kind in ("InvalidRequest", "Failed"):
        cond = conds.get(kind, {})
        if cond.get("status") == "True":
            raise IssuanceFailed(
                f"CertificateRequest {ref} failed: {kind} ({cond.get('reason', kind)}): "
                f"{cond.get('message', 'no message')}",
                reason="invalid_request" if kind == "InvalidRequest" else "failed",
            )
    if ready.get("status") == "False" and ready.get("reason") == "Failed":
        raise IssuanceFailed(
            f"CertificateRequest {ref} failed (Failed): {ready.get('message', 'no message')}",
            reason="failed",
        )
    status = cr.get("status") or {}
    if ready.get("status") != "True" or not status.get("certificate"):
        return None
    try:
        chain_pem = base64.b64decode(status["certificate"])
        chain = x509.load_pem_x509_certificates(chain_pem)
        ca_pem = base64.b64decode(status["ca"]) if status.get("ca") else b""
        if ca_pem:
            x509.load_pem_x509_certificates(ca_pem)
    except (ValueError, binascii.Error) as exc:
        raise IssuanceFailed(
            f"CertificateRequest {ref} is Ready but its status.certificate or status.ca is not "
            f"PEM: {exc}",
            reason="malformed_certificate",
        ) from exc
    leaf_key = (
        chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if leaf_key != _public_key_der(csr_pem):
        raise IssuanceFailed(
            f"CertificateRequest {ref} returned a certificate for a different key than the CSR",
            reason="key_mismatch",
        )
    if not ca_pem:
        # cert-manager sets status.ca on a best-effort basis; the chain's top is what we have.
        ca_pem = chain[-1].public_bytes(serialization.Encoding.PEM)
    return IssuedCertificate(chain_pem=chain_pem, ca_pem=ca_pem, request=ref)


def _timeout(cr: Obj, timeout_seconds: float) -> DeadlineExceeded:
    conds = _conditions(cr)
    ready = conds.get("Ready")
    if ready:
        detail = (
            f" (Ready={ready.get('status')}, {ready.get('reason', '')}: {ready.get('message', '')})"
        )
    elif "Approved" not in conds:
        detail = (
            " (not approved yet: is cert-manager's approver or approver-policy running and does "
            "a policy match this request?)"
        )
    else:
        detail = ""
    return DeadlineExceeded(
        f"CertificateRequest {_ref(cr)} is not ready after {timeout_seconds:g}s{detail}; it stays "
        "pending and the next mount attempt picks it up"
    )
