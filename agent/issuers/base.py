"""The issuer interface every signing backend implements."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from agent.pki.serials import format_serial
from agent.spec.model import CertificateSpec, PodInfo


@dataclass(frozen=True)
class IssueRequest:
    """What the agent asks an issuer to sign. Only the CSR leaves the node, never the key."""

    volume_id: str
    node_id: str
    pod: PodInfo
    spec: CertificateSpec
    csr_pem: bytes
    # A token of the pod's service account (CSIDriver tokenRequests), so cert-manager can create
    # the request as that account. Held in memory only, never written to the metadata.
    service_account_token: str | None = field(default=None, repr=False)
    # Set instead of a CSR (``csr_pem`` empty) for an issuer with ``signs_public_key``: the agent's
    # own CA signs the public key of a key that never left this process, so a CSR built and
    # verified within the same call would prove nothing (docs/benchmarks.md, section 9).
    public_key: CertificatePublicKeyTypes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed certificate: ``chain_pem`` is the leaf then intermediates, ``ca_pem`` the CA(s)."""

    chain_pem: bytes
    ca_pem: bytes
    # Where it came from, for logs and messages: ``namespace/name`` of a CertificateRequest.
    request: str = ""
    # The leaf, parsed once: an issuer that built it passes it, otherwise the first use parses.
    parsed_leaf: x509.Certificate | None = field(default=None, repr=False, compare=False)

    @property
    def leaf(self) -> x509.Certificate:
        if self.parsed_leaf is None:
            # Frozen, but a cache of what chain_pem already says changes nothing observable.
            object.__setattr__(
                self, "parsed_leaf", x509.load_pem_x509_certificates(self.chain_pem)[0]
            )
        assert self.parsed_leaf is not None
        return self.parsed_leaf

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial_hex(self) -> str:
        """The leaf's serial as ``openssl x509 -serial`` prints it."""
        return format_serial(self.leaf.serial_number)


class Issuer(Protocol):
    """A signing backend. Implementations are thread-safe: publishes and renewals call concurrently.

    ``issue`` blocks until the certificate exists, the issuer refuses, or ``timeout_seconds`` pass.
    It raises ``agent.errors.AgentError`` subclasses: ``InvalidArgument`` for a request the issuer's
    policy forbids (duration over its maximum, is-ca not allowed, namespace not allowed),
    ``PermissionDenied`` for a denial, ``DeadlineExceeded`` for a timeout (work in flight is kept so
    a retry can pick it up), ``Unavailable`` for an unreachable dependency, ``IssuanceFailed``
    otherwise.
    """

    @property
    def name(self) -> str:
        """A stable label for metrics and logs (``local``, ``cert-manager``)."""
        ...

    def issue(self, request: IssueRequest, timeout_seconds: float) -> IssuedCertificate: ...

    def ready(self) -> tuple[bool, str]:
        """Whether the issuer can sign now, and a short human reason when it cannot."""
        ...
