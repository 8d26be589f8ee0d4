"""Node CA mode: the node's own intermediate CA, issued by cert-manager, renewed ahead of expiry.

The agent makes a node key (ECDSA P-256, on its own tmpfs only), sends one CertificateRequest with
``isCA: true`` through the cert-manager issuer machinery (create, watch, reuse a pending request
after a restart), and then signs pod certificates locally with the node CA: no API call per pod,
and a compromised node leaks a short-lived CA limited by name constraints instead of the root key.

- ``current()`` raises ``Unavailable`` naming the issuer and the request until a node CA exists,
  so publishes fail clearly and readiness says why; the agent becomes ready once it arrives.
- One thread requests the first node CA, then sleeps until its renewal point (``renew_before``
  ahead, default a third of the lifetime, moved earlier by a small random spread) and renews it.
  Failures retry with backoff; the old node CA keeps signing meanwhile.
- ``on_renewed`` tells the server to move every pod certificate to the new node CA in time.
- ``check_leaf`` refuses any name outside the constraints before signing, whether or not the
  issuer kept them in the certificate.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import AgentError, FailedPrecondition, PermissionDenied, Unavailable
from agent.issuers.base import IssuedCertificate, Issuer
from agent.issuers.node_ca_plan import (
    NodeCASettings,
    node_ca_issue_request,
    reissue_due,
    renewal_time,
)
from agent.issuers.node_ca_store import NodeCAStore, StoredNodeCA
from agent.observe.metrics import AgentMetrics
from agent.pki.ca import CAError, CertificateAuthority, is_self_signed
from agent.pki.intermediate import (
    build_node_ca_csr,
    encode_key,
    generate_node_ca_key,
    node_ca_common_name,
    node_ca_from_issued,
)
from agent.pki.keys import PrivateKey, load_private_key
from agent.pki.name_constraints import carries, constraints_of, violations

__all__ = ["NodeCAProvider", "NodeCASettings", "reissue_due", "renewal_time"]

log = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 5.0
RETRY_CAP_SECONDS = 300.0
MAX_SLEEP_SECONDS = 600.0  # look at the (wall) clock again at least this often


class NodeCAProvider:
    """A ``CAProvider`` whose CA is this node's intermediate, kept current by one thread."""

    def __init__(
        self,
        settings: NodeCASettings,
        requester: Issuer,
        store: NodeCAStore,
        *,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._requester = requester
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self.on_renewed = on_renewed
        self._constraints = settings.permitted.extension()
        self._cond = threading.Condition()
        self._ca: CertificateAuthority | None = None
        self._trust_pem = b""
        self._renew_at = 0.0
        self._enforced_by_agent = False
        self._said_enforced = False
        self._problem: str | None = None
        self._woken = False
        self._stopping = False
        self.attempts = 0  # finished requests, successful or not (tests wait on it)
        self._thread: threading.Thread | None = None

    @property
    def issuer(self) -> str:
        return self.settings.issuer.describe()

    # ---- lifecycle

    def start(self) -> None:
        """Reuse a stored node CA that is valid beyond its renewal point, else request one in
        the background; never blocks on the API."""
        self._store.prepare()
        self._load_stored()
        self._thread = threading.Thread(target=self._run, name="node-ca", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(0.5)  # a request in flight cannot be cut; the thread is a daemon

    def wake(self) -> None:
        """Look again now: after a retry-worthy change (tests, ``make bench``), or a clock jump."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def wait_for_attempts(self, count: int, timeout: float = 30) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.attempts >= count, timeout):
                raise TimeoutError(f"node CA: {count} request(s) did not finish in {timeout}s")

    # ---- CAProvider

    def current(self) -> CertificateAuthority:
        with self._cond:
            ca, problem = self._ca, self._problem
        if ca is None:
            raise Unavailable(
                f"the node CA from {self.issuer} is not available yet: "
                f"{problem or self._waiting_message()}"
            )
        if ca.not_after.timestamp() <= self._clock():
            raise Unavailable(
                f"the node CA from {self.issuer} expired at {ca.not_after.isoformat()} and was "
                f"not renewed: {problem or self._waiting_message()}"
            )
        return ca

    def trust_bundle_pem(self) -> bytes:
        self.current()
        with self._cond:
            return self._trust_pem

    @property
    def enforced_by_agent(self) -> bool:
        """True when the issuer dropped the name constraints and only the agent enforces them."""
        with self._cond:
            return self._enforced_by_agent

    @property
    def renew_at(self) -> float:
        with self._cond:
            return self._renew_at

    def check_leaf(self, subject: x509.Name, sans: list[x509.GeneralName]) -> None:
        """Refuse a leaf outside the name constraints, before anything is signed."""
        found = violations(self._constraints, subject, sans)
        if found:
            raise PermissionDenied(
                "the node CA signs only names inside its name constraints (--node-ca-permitted-"
                f"dns/-uri/-email/-ip: {self.settings.permitted.describe()}); outside them: "
                f"{', '.join(found)}"
            )

    # ---- the thread

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                if self._stopping:
                    return
                due = self._renew_at if self._ca is not None else 0.0
            wait = due - self._clock()
            if wait > 0:
                self._sleep(wait)
                continue
            try:
                self._obtain()
                failures = 0
            except Exception as exc:
                failures += 1
                message = exc.message if isinstance(exc, AgentError) else f"{exc}"
                reason = exc.reason if isinstance(exc, AgentError) else "error"
                if not isinstance(exc, AgentError):
                    log.exception("node CA request failed unexpectedly")
                self._failed(reason, message, failures)
            finally:
                with self._cond:
                    self.attempts += 1
                    self._cond.notify_all()
            if failures:
                ceiling = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2 ** min(failures - 1, 16))
                self._sleep(ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(
                lambda: self._woken or self._stopping, min(seconds, MAX_SLEEP_SECONDS)
            )
            self._woken = False

    def _failed(self, reason: str, message: str, failures: int) -> None:
        with self._cond:
            self._problem = message
            renewing = self._ca is not None
        if self._metrics is not None:
            self._metrics.node_ca_request(reason)
        log.error(
            "node CA renewal failed; still signing with the current node CA"
            if renewing
            else "node CA request failed; local signing waits for it",
            extra={"issuer": self.issuer, "error": message, "attempt": failures},
        )

    def _waiting_message(self) -> str:
        return (
            f"waiting for the CertificateRequest of node {self.settings.node_id} in namespace "
            f"{self.settings.namespace!r}"
        )

    # ---- requesting

    def _obtain(self) -> None:
        key = self._pending_key()
        csr_pem = build_node_ca_csr(
            key, node_ca_common_name(self.settings.node_id), self._constraints
        )
        log.info(
            "requesting the node CA",
            extra={"issuer": self.issuer, "namespace": self.settings.namespace},
        )
        issued = self._requester.issue(
            node_ca_issue_request(self.settings, csr_pem), self.settings.request_timeout_seconds
        )
        with self._cond:
            if self._stopping:
                return  # a stopped agent leaves the tmpfs to its successor
        ca, trust = self._validate(key, issued)
        self._store.save(
            StoredNodeCA(
                key_pem=encode_key(key),
                chain_pem=issued.chain_pem,
                ca_pem=trust,
                request=issued.request,
                issuer=self.issuer,
            )
        )
        self._store.clear_pending_key()
        if self._metrics is not None:
            self._metrics.node_ca_request("issued")
        self._install(ca, trust, issued.request)

    def _pending_key(self) -> PrivateKey:
        """The key of a request in flight (a restart reuses its request), else a new one."""
        pending = self._store.load_pending_key()
        if pending is not None:
            try:
                key = load_private_key(pending)
                if isinstance(key, ec.EllipticCurvePrivateKey):
                    return key
            except ValueError:
                log.warning("discarding an unreadable pending node CA key")
        key = generate_node_ca_key()
        self._store.save_pending_key(encode_key(key))
        return key

    def _validate(
        self, key: PrivateKey, issued: IssuedCertificate
    ) -> tuple[CertificateAuthority, bytes]:
        source = f"the node CA from {self.issuer} (CertificateRequest {issued.request or '?'})"
        ca = node_ca_from_issued(key, issued.chain_pem, issued.ca_pem, source, self._now())
        dropped = not carries(ca.certificate, self._constraints)
        if dropped and self.settings.require_name_constraints:
            # A new request next time: this one is Ready and would only give the same answer.
            self._store.clear_pending_key()
            raise FailedPrecondition(
                f"{source} does not carry the requested name constraints, and "
                "--node-ca-require-name-constraints refuses such a CA; configure the issuer to "
                "keep them (cert-manager: the NameConstraints feature gate) or drop the flag"
            )
        # ca.crt is the root workloads already trust; without status.ca, the top of the chain.
        trust = _pem(ca.root) if is_self_signed(ca.root) else issued.ca_pem
        return ca, trust

    def _install(self, ca: CertificateAuthority, trust_pem: bytes, request: str) -> None:
        enforced = not carries(ca.certificate, self._constraints)
        renew_at = renewal_time(
            ca.certificate.not_valid_before_utc.timestamp(),
            ca.not_after.timestamp(),
            self.settings.renew_before_seconds,
            self._rng,
        )
        with self._cond:
            old = self._ca
            self._ca, self._trust_pem = ca, trust_pem
            self._renew_at, self._enforced_by_agent = renew_at, enforced
            self._problem = None
            say_enforced = enforced and not self._said_enforced
            self._said_enforced = self._said_enforced or enforced
        log.info(
            "node CA installed",
            extra={
                "issuer": self.issuer,
                "request": request,
                "not_after": ca.not_after.isoformat(),
                "renews_at": dt.datetime.fromtimestamp(renew_at, dt.UTC).isoformat(),
                "name_constraints": "agent" if enforced else "certificate",
            },
        )
        if say_enforced:
            log.warning(
                "the issuer dropped the node CA's name constraints: the agent enforces them "
                "itself on every certificate it signs (relying parties cannot); set "
                "--node-ca-require-name-constraints to refuse such a CA instead",
                extra={"issuer": self.issuer, "permitted": self.settings.permitted.describe()},
            )
        if self._metrics is not None:
            self._metrics.set_node_ca(
                self.issuer, ca.not_after.timestamp(), renew_at, enforced_by_agent=enforced
            )
        if old is not None and self.on_renewed is not None:
            try:
                self.on_renewed()
            except Exception:
                log.exception("moving pod certificates to the new node CA failed")

    def _load_stored(self) -> None:
        stored = self._store.load()
        if stored is None:
            return
        if stored.issuer != self.issuer:
            log.info("stored node CA is from another issuer; requesting a new one")
            return
        try:
            key = load_private_key(stored.key_pem)
            ca = node_ca_from_issued(
                key, stored.chain_pem, stored.ca_pem, "the stored node CA", self._now()
            )
        except (CAError, ValueError) as exc:
            log.info("stored node CA unusable; requesting a new one", extra={"error": f"{exc}"})
            return
        have = constraints_of(ca.certificate)
        if have is not None and not carries(ca.certificate, self._constraints):
            log.info("stored node CA has other name constraints; requesting a new one")
            return
        if have is None and self.settings.require_name_constraints:
            return
        # Still valid: sign with it now; the thread renews it at once if it is already due.
        self._install(ca, stored.ca_pem, stored.request)
        if self.renew_at > self._clock():
            log.info("reusing the node CA from the tmpfs", extra={"request": stored.request})

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
