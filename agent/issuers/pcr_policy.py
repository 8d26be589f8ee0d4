"""The issuance policy for PodCertificateRequests: the PCR signer's ``PolicyCheck`` hook.

The PCR signer decides the names itself (its templates, expanded for the verified pod), and the
same policy that governs CSI volumes decides whether that pod may have them: one engine for
every certificate the agent signs. A denial answers the request ``PolicyViolation`` with the
rule and the value; a rule's max-duration caps the lifetime instead of refusing it.
"""

from __future__ import annotations

from agent.issuers.pcr_signer import PolicyCheck
from agent.pki.policy import PolicyChecker, PolicyRequest
from agent.spec.model import KeyAlgorithm
from agent.spec.pcr import PcrIdentity, PcrNames

# The PodCertificateRequest API's key types, as the policy's algorithm and size.
_KEYS: dict[str, tuple[KeyAlgorithm, int | None]] = {
    "ECDSAP256": (KeyAlgorithm.ECDSA, 256),
    "ECDSAP384": (KeyAlgorithm.ECDSA, 384),
    "ECDSAP521": (KeyAlgorithm.ECDSA, 521),
    "ED25519": (KeyAlgorithm.ED25519, None),
    "RSA3072": (KeyAlgorithm.RSA, 3072),
    "RSA4096": (KeyAlgorithm.RSA, 4096),
}


def pcr_request(identity: PcrIdentity, names: PcrNames, key_type: str) -> PolicyRequest:
    """What a PCR asks for, in the policy's terms (the lifetime is capped, not checked)."""
    algorithm, size = _KEYS[key_type]
    return PolicyRequest(
        namespace=identity.namespace,
        pod_name=identity.pod_name,
        service_account=identity.service_account,
        pod_uid=identity.pod_uid,
        dns_names=names.dns_names,
        uris=names.uris,
        subject=(("common-name", names.common_name),) if names.common_name else (),
        key_algorithm=algorithm,
        key_size=size,
    )


def pcr_policy(checker: PolicyChecker) -> PolicyCheck:
    """The PCR signer's hook, backed by ``checker`` (the agent's PolicySource)."""

    def check(
        identity: PcrIdentity, names: PcrNames, key_type: str, lifetime_seconds: int
    ) -> int | None:
        # PolicyViolation is a PermissionDenied: the signer answers PolicyViolation with it.
        return checker.check(pcr_request(identity, names, key_type)).max_duration_seconds

    return check
