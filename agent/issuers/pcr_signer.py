"""Answers this node's pending PodCertificateRequests for one signer name: Issued, Denied or Failed.

For each pending request (no Issued/Denied/Failed condition), in this order:
1. ``spec.unverifiedUserAnnotations`` must be empty (the agent understands none; the API asks
   signers to deny keys they do not know);
2. the subject key: the stub PKCS#10 request's signature, or the proof of possession, and a key
   type this signer allows (else Denied/UnsupportedKeyType, as the API asks);
3. the pod: one GET; it must exist on this node with the request's UID and service account;
4. the names from the signer's templates (``spec/pcr.py``) and the issuance policy, if any;
5. in node CA mode, the node CA's name constraints (else Denied/NameConstraints);
6. the lifetime: the smallest of ``spec.maxExpirationSeconds``, the signer's maximum, the policy's
   cap and what the CA has left; under the API's one-hour minimum it is Failed/CAExpiring.
Then the local CA signs and the status goes through the ``status`` subresource (kube/pcr_client).
A transient problem (API unreachable, CA not loaded) leaves the request pending and retries it.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import AgentError, PermissionDenied
from agent.issuers.pcr_keys import PcrFailed, PcrRefused, SubjectKey, subject_key
from agent.kube.client import backoff_delay
from agent.kube.pcr_client import describe, is_pending
from agent.observe.pcr_metrics import PcrMetrics
from agent.pki.ca import CAProvider, utcnow
from agent.pki.pcr_leaf import build_leaf, leaf_sans, leaf_subject
from agent.spec.pcr import (
    DEFAULT_MAX_DURATION_SECONDS,
    MIN_LIFETIME_SECONDS,
    PcrIdentity,
    PcrNames,
    PcrSignerConfig,
    dns_name_problem,
    expand,
)

log = logging.getLogger(__name__)

Obj = dict[str, Any]
# kubelet starts refreshing at beginRefreshAt: somewhere in [50%, 75%] of the lifetime, so the
# pods of a node that all started together do not all come back in the same second.
REFRESH_AT = (0.5, 0.75)
REFRESH_MARGIN = dt.timedelta(minutes=10)  # the API wants beginRefreshAt 10 min inside the cert
LOUD_EVERY = 8  # a request that keeps failing is logged as an error every 8th attempt


class StatusWriter(Protocol):
    def get_pod(self, namespace: str, name: str) -> Obj | None: ...

    def get(self, namespace: str, name: str) -> Obj | None: ...

    def write_status(self, pcr: Obj, status: Obj) -> Obj | None: ...


class PolicyCheck(Protocol):
    """The issuance policy for PCRs: raise ``PermissionDenied`` (naming the rule) to refuse;
    return a lifetime cap in seconds, or None for no cap."""

    def __call__(
        self, identity: PcrIdentity, names: PcrNames, key_type: str, lifetime_seconds: int
    ) -> int | None: ...


class PcrSigner:
    """Thread-safe; one per signer name, fed by that signer's ``PcrWatch``."""

    def __init__(
        self,
        config: PcrSignerConfig,
        *,
        node: str,
        api: StatusWriter,
        ca: CAProvider,
        metrics: PcrMetrics | None = None,
        policy: PolicyCheck | None = None,
        leaf_guard: Callable[[x509.Name, list[x509.GeneralName]], None] | None = None,
        wall_clock: Callable[[], dt.datetime] = utcnow,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self._api = api
        self._ca = ca
        self._metrics = metrics
        self._policy = policy
        # Node CA mode: the node CA's name constraints (a leaf outside them would not verify).
        self._leaf_guard = leaf_guard
        self._wall_clock = wall_clock
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._answered: set[str] = set()  # UIDs whose status this agent wrote
        self._retries: dict[str, threading.Timer] = {}
        self._stopped = False

    @property
    def signer(self) -> str:
        return self.config.signer_name

    # ---- events

    def on_object(self, pcr: Obj, arrived: float) -> None:
        """A PCR from the watch (or list): answer it if it is pending and ours."""
        spec = pcr.get("spec") or {}
        uid = str((pcr.get("metadata") or {}).get("uid") or "")
        if spec.get("signerName") != self.signer or spec.get("nodeName") != self.node:
            return  # the field selector keeps these away; never touch another's request
        if not is_pending(pcr):
            self._forget(uid)
            return
        with self._lock:
            if uid in self._answered:
                return  # our status write is on its way through the watch
        self._handle(pcr, arrived, attempt=0)

    def on_deleted(self, pcr: Obj) -> None:
        self._forget(str((pcr.get("metadata") or {}).get("uid") or ""))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            timers, self._retries = list(self._retries.values()), {}
        for timer in timers:
            timer.cancel()

    # ---- one request

    def _handle(self, pcr: Obj, arrived: float, attempt: int) -> None:
        try:
            status, outcome, reason = self._decide(pcr)
        except AgentError as exc:
            self._retry(pcr, arrived, attempt, exc.message)
            return
        try:
            written = self._api.write_status(pcr, status)
        except AgentError as exc:
            self._retry(pcr, arrived, attempt, exc.message)
            return
        if written is None:
            log.info("PCR gone or answered elsewhere", extra={"pcr": describe(pcr)})
            return
        with self._lock:
            self._answered.add(str(pcr["metadata"].get("uid") or ""))
        seconds = self._clock() - arrived
        if self._metrics is not None:
            self._metrics.answered(self.signer, outcome, reason, seconds)
        level = logging.INFO if outcome == "issued" else logging.WARNING
        message = status["conditions"][0]["message"]
        log.log(
            level,
            f"PodCertificateRequest {outcome}",
            extra={"pcr": describe(pcr), "signer": self.signer, "reason": reason,
                   "detail": message, "seconds": round(seconds, 4)},
        )  # fmt: skip

    def _decide(self, pcr: Obj) -> tuple[Obj, str, str]:
        """The status to write, the outcome and the reason. Raises AgentError when the answer
        has to wait (the API or the CA is not available)."""
        try:
            return self._issue(pcr), "issued", "Issued"
        except PcrRefused as refused:
            kind = "Failed" if isinstance(refused, PcrFailed) else "Denied"
            status = {"conditions": [self._condition(pcr, kind, refused.reason, refused.message)]}
            return status, refused.outcome, refused.reason

    def _issue(self, pcr: Obj) -> Obj:
        spec = pcr["spec"]
        namespace = pcr["metadata"]["namespace"]
        if spec.get("unverifiedUserAnnotations"):
            keys = ", ".join(sorted(spec["unverifiedUserAnnotations"]))
            raise PcrRefused(
                "InvalidUnverifiedUserAnnotations",
                f"this signer understands no userAnnotations; remove {keys} from the pod's "
                "podCertificate projection",
            )
        key = subject_key(spec, self.config.key_types)
        identity = self._verify_pod(namespace, spec)
        names = expand(self.config, identity)
        for name in names.dns_names:
            problem = dns_name_problem(name)
            if problem:
                raise PcrRefused(
                    "InvalidName",
                    f"the signer's template gives DNS name {name!r} for this pod, which is "
                    f"{problem}; shorten the pod name or change the signer's dns-names",
                )
        lifetime = min(
            int(spec.get("maxExpirationSeconds") or DEFAULT_MAX_DURATION_SECONDS),
            self.config.max_duration_seconds,
        )
        if self._policy is not None:
            try:
                cap = self._policy(identity, names, key.key_type, lifetime)
            except PermissionDenied as exc:
                raise PcrRefused("PolicyViolation", exc.message) from exc
            if cap is not None:
                lifetime = min(lifetime, cap)
        return self._sign(pcr, key, names, lifetime)

    def _verify_pod(self, namespace: str, spec: Obj) -> PcrIdentity:
        pod_name = str(spec.get("podName") or "")
        pod = self._api.get_pod(namespace, pod_name)
        if pod is None:
            raise PcrRefused(
                "PodNotFound",
                f"pod {namespace}/{pod_name} does not exist; a request for a deleted pod is "
                "never signed",
            )
        meta, pod_spec = pod.get("metadata") or {}, pod.get("spec") or {}
        checks = (
            ("UID", meta.get("uid"), spec.get("podUID")),
            ("node", pod_spec.get("nodeName"), self.node),
            ("service account", pod_spec.get("serviceAccountName") or "default",
             spec.get("serviceAccountName")),
        )  # fmt: skip
        for what, actual, requested in checks:
            if actual != requested:
                raise PcrRefused(
                    "PodMismatch",
                    f"pod {namespace}/{pod_name} has {what} {actual!r}, the request says "
                    f"{requested!r}: it was not made for this pod as it runs on this node",
                )
        return PcrIdentity(
            namespace=namespace,
            pod_name=pod_name,
            pod_uid=str(spec.get("podUID")),
            service_account=str(spec.get("serviceAccountName")),
            node_name=self.node,
        )

    # ---- signing

    def _sign(self, pcr: Obj, key: SubjectKey, names: PcrNames, lifetime: int) -> Obj:
        ca = self._ca.current()  # AgentError: not loaded yet, retried
        now = self._wall_clock().astimezone(dt.UTC).replace(microsecond=0)
        not_after = min(now + dt.timedelta(seconds=lifetime), _floor(ca.not_after))
        if (not_after - now).total_seconds() < MIN_LIFETIME_SECONDS:
            raise PcrFailed(
                "CAExpiring",
                f"the signer's CA expires at {ca.not_after.isoformat()}, less than the one hour "
                "a pod certificate must last; the cluster admin must replace the CA",
            )
        if self._leaf_guard is not None:
            try:
                self._leaf_guard(leaf_subject(names), leaf_sans(names))
            except PermissionDenied as exc:
                raise PcrRefused("NameConstraints", exc.message) from exc
        leaf = build_leaf(ca, key.public_key, names, now, not_after)
        pem = serialization.Encoding.PEM
        chain = b"".join(c.public_bytes(pem) for c in (leaf, *ca.intermediates()))
        span = (not_after - now).total_seconds()
        refresh = now + dt.timedelta(seconds=span * self._rng.uniform(*REFRESH_AT))
        refresh = max(now + REFRESH_MARGIN, min(refresh, not_after - REFRESH_MARGIN))
        message = (
            f"signed by {self.signer} on node {self.node} for "
            f"{', '.join((*names.uris, *names.dns_names)) or names.common_name}"
        )
        return {
            "conditions": [self._condition(pcr, "Issued", "Issued", message)],
            "certificateChain": chain.decode(),
            "notBefore": _rfc3339(now),
            "beginRefreshAt": _rfc3339(refresh.replace(microsecond=0)),
            "notAfter": _rfc3339(not_after),
        }

    def _condition(self, pcr: Obj, kind: str, reason: str, message: str) -> Obj:
        condition: Obj = {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message[:32768],
            "lastTransitionTime": _rfc3339(self._wall_clock()),
        }
        generation = (pcr.get("metadata") or {}).get("generation")
        if isinstance(generation, int):
            condition["observedGeneration"] = generation
        return condition

    # ---- bookkeeping

    def _retry(self, pcr: Obj, arrived: float, attempt: int, error: str) -> None:
        # Retried for as long as the request exists and is pending (each retry reads it
        # first), at most every BACKOFF_CAP_SECONDS: kubelet waits for an answer meanwhile.
        uid = str(pcr["metadata"].get("uid") or "")
        delay = backoff_delay(attempt + 2)
        level = logging.ERROR if attempt and attempt % LOUD_EVERY == 0 else logging.INFO
        log.log(
            level,
            "PCR answer postponed",
            extra={"pcr": describe(pcr), "error": error, "delay": round(delay, 3),
                   "attempt": attempt + 1},
        )  # fmt: skip

        def again() -> None:
            with self._lock:
                self._retries.pop(uid, None)
            try:
                fresh = self._api.get(pcr["metadata"]["namespace"], pcr["metadata"]["name"])
            except AgentError as exc:
                self._retry(pcr, arrived, attempt + 1, exc.message)
                return
            if fresh is not None and is_pending(fresh):
                self._handle(fresh, arrived, attempt + 1)

        timer = threading.Timer(delay, again)
        timer.daemon = True
        with self._lock:
            if self._stopped:
                return
            old = self._retries.pop(uid, None)
            self._retries[uid] = timer
        if old is not None:
            old.cancel()
        timer.start()

    def _forget(self, uid: str) -> None:
        with self._lock:
            self._answered.discard(uid)
            timer = self._retries.pop(uid, None)
        if timer is not None:
            timer.cancel()


def _floor(moment: dt.datetime) -> dt.datetime:
    return moment.replace(microsecond=0)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
