"""The embedded issuer: signs CSRs with a CA the agent holds, in milliseconds, under its own policy.

Choices worth knowing:
- notBefore is the current time, not backdated. Nodes of one cluster are NTP-synchronised and the
  certificate is used right away by the pod that asked for it; a backdated notBefore would only
  hide clock problems (cert-manager does the same).
- The issued certificate copies the CSR's subject and SANs verbatim; usages and the CA flag come
  from the volume's spec, not from whatever the CSR requested.
- notAfter never passes the CA's own notAfter (the lifetime is capped rather than refused, so pods
  keep working as the CA nears its end; renewal happens on the shorter lifetime).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    IssuanceFailed,
    PermissionDenied,
)
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.pki.ca import CAProvider, CertificateAuthority, utcnow
from agent.pki.csr import requested_names, usages_to_extensions
from agent.pki.leaf import authority_key_id, sign_leaf
from agent.spec.model import DEFAULT_DURATION_SECONDS

DEFAULT_MAX_DURATION_SECONDS = 2160 * 3600


class LocalCAIssuer:
    """Signs with ``ca.current()``; thread-safe (no mutable state of its own)."""

    def __init__(
        self,
        ca: CAProvider,
        *,
        max_duration_seconds: int = DEFAULT_MAX_DURATION_SECONDS,
        allow_ca: bool = False,
        allowed_namespaces: frozenset[str] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        leaf_guard: Callable[[x509.Name, list[x509.GeneralName]], None] | None = None,
    ) -> None:
        if max_duration_seconds <= 0:
            raise ValueError("max_duration_seconds must be positive")
        self._ca = ca
        self._max_duration = max_duration_seconds
        self._allow_ca = allow_ca
        self._allowed_namespaces = allowed_namespaces
        self._clock = clock
        # Raises PermissionDenied for names the CA may not sign (the node CA's name constraints).
        self._leaf_guard = leaf_guard
        self._aki: tuple[CertificateAuthority, x509.AuthorityKeyIdentifier] | None = None

    @property
    def name(self) -> str:
        return "local"

    @property
    def max_duration_seconds(self) -> int:
        return self._max_duration

    # The key it signs for never leaves the agent's process: the manager passes the public key
    # itself and builds no CSR (see IssueRequest.public_key).
    signs_public_key = True

    def issue(self, request: IssueRequest, timeout_seconds: float) -> IssuedCertificate:
        """Sign ``request.public_key`` for the names the spec asks for, or ``request.csr_pem``.

        Either way the certificate is the same: the CSR the manager would build carries exactly
        ``requested_names(spec)``, and usages and the CA flag come from the spec. Local signing
        never waits, so ``timeout_seconds`` is unused."""
        spec = request.spec
        public_key = request.public_key
        if public_key is not None:
            # First, as build_csr would have refused them before the issuer was called.
            subject, sans = requested_names(spec)
        self._check_policy(request)
        duration = self._duration(spec.duration_seconds)
        if public_key is None:
            csr = _load_csr(request.csr_pem)
            subject, sans, public_key = csr.subject, _csr_sans(csr), csr.public_key()
        ca = self._ca.current()

        now = _aware(self._clock()).replace(microsecond=0)
        if ca.certificate.not_valid_before_utc > now:
            raise FailedPrecondition(
                "the local CA is not valid yet (check the node's clock): notBefore "
                f"{ca.certificate.not_valid_before_utc.isoformat()}"
            )
        not_after = min(now + dt.timedelta(seconds=duration), ca.not_after)
        if not_after <= now:
            raise FailedPrecondition(
                f"the local CA expired at {ca.not_after.isoformat()}; replace it to issue again"
            )
        if spec.is_ca:
            _check_path_length(ca)

        if not sans and len(subject) == 0:
            raise InvalidArgument(
                "the certificate would identify nothing: set common-name, literal-subject or at "
                "least one SAN",
                attribute="common-name",
            )
        if self._leaf_guard is not None:
            self._leaf_guard(subject, sans)
        key_usage, extended = usages_to_extensions(spec.key_usages, is_ca=spec.is_ca)
        try:
            leaf = sign_leaf(
                ca,
                public_key,
                subject,
                sans,
                now,
                not_after,
                key_usage=key_usage,
                extended_key_usage=extended,
                is_ca=spec.is_ca,
                aki=self._authority_key_id(ca),
            )
        except (ValueError, TypeError) as exc:
            raise IssuanceFailed(f"the local CA could not sign: {exc}", reason="sign") from exc

        return IssuedCertificate(
            chain_pem=leaf.public_bytes(serialization.Encoding.PEM) + ca.intermediates_pem,
            ca_pem=self._ca.trust_bundle_pem(),
            parsed_leaf=leaf,
        )

    def _authority_key_id(self, ca: CertificateAuthority) -> x509.AuthorityKeyIdentifier:
        """The CA's AKI extension, worked out once per CA object (a rotation makes a new one)."""
        cached = self._aki
        if cached is not None and cached[0] is ca:
            return cached[1]
        aki = authority_key_id(ca)
        self._aki = (ca, aki)  # one tuple, replaced whole: safe without a lock
        return aki

    def ready(self) -> tuple[bool, str]:
        try:
            ca = self._ca.current()
        except AgentError as exc:
            return False, exc.message
        except Exception as exc:  # any load failure means "cannot sign", reported, not raised
            return False, f"the local CA cannot be loaded: {exc}"
        if ca.not_after <= _aware(self._clock()):
            return False, f"the local CA expired at {ca.not_after.isoformat()}"
        return True, ""

    def ca_not_after(self) -> dt.datetime:
        """The signing CA's expiry (raises the provider's error when it cannot be loaded)."""
        return self._ca.current().not_after

    def _check_policy(self, request: IssueRequest) -> None:
        namespace = request.pod.namespace
        if self._allowed_namespaces is not None and namespace not in self._allowed_namespaces:
            raise PermissionDenied(
                f"the local CA issuer does not sign for namespace {namespace!r}; ask the cluster "
                "admin to allow it or name another issuer with issuer-name"
            )
        if request.spec.is_ca and not self._allow_ca:
            raise InvalidArgument(
                "is-ca: the local CA issuer does not sign CA certificates; remove is-ca or use an "
                "issuer that allows it",
                attribute="is-ca",
            )

    def _duration(self, requested: int | None) -> int:
        if requested is None:
            return min(DEFAULT_DURATION_SECONDS, self._max_duration)
        if requested <= 0:
            raise InvalidArgument(
                f"duration {format_duration(requested)} must be positive", attribute="duration"
            )
        if requested > self._max_duration:
            raise InvalidArgument(
                f"duration {format_duration(requested)} exceeds this issuer's maximum of "
                f"{format_duration(self._max_duration)}",
                attribute="duration",
            )
        return requested


def format_duration(seconds: int) -> str:
    """Go-style without zero parts: ``2160h``, ``1h30m``, ``90s``, ``0s``."""
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return sign + ("".join(parts) or "0s")


def _load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise IssuanceFailed(f"the CSR cannot be parsed: {exc}", reason="bad_csr") from exc
    if not csr.is_signature_valid:
        raise IssuanceFailed("the CSR's signature does not verify", reason="bad_csr")
    return csr


def _csr_sans(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def ca_child_problem(ca: CertificateAuthority) -> str | None:
    """Why ``ca`` cannot sign a CA certificate that verifies, or None: a certificate with
    pathLenConstraint n allows at most n CA certificates below it (the signing CA is 0 levels
    below itself)."""
    for depth, cert in enumerate((ca.certificate, *ca.chain)):
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue
        if basic.path_length is not None and basic.path_length <= depth:
            return (
                f"the pathLenConstraint {basic.path_length} of "
                f"{cert.subject.rfc4514_string()} forbids another CA below the local CA"
            )
    return None


def _check_path_length(ca: CertificateAuthority) -> None:
    """Refuse a CA child that a verifier would reject."""
    problem = ca_child_problem(ca)
    if problem is not None:
        raise InvalidArgument(
            f"is-ca: {problem}, so the certificate would not verify; configure a CA without "
            "that limit",
            attribute="is-ca",
        )


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
