"""The subject key of a PodCertificateRequest, verified, and its key type.

Kubernetes 1.36+ kubelets send ``spec.stubPKCS10Request``: an empty DER PKCS#10 request signed
with the pod's key, whose signature proves possession. Older ones send ``spec.pkixPublicKey`` with
``spec.proofOfPossession``, a signature over the ASCII pod UID (RSASSA-PSS/SHA-256, ECDSA ASN.1 over
SHA-256, or Ed25519). kube-apiserver checks both at creation; the agent checks again (it costs one
signature verification) so a bug or a bypass there cannot get a key certified without its owner.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.spec.pcr import KEY_TYPES

Obj = dict[str, Any]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

UNSUPPORTED_KEY_TYPE = "UnsupportedKeyType"  # the reason the API asks signers to use
INVALID_PROOF = "InvalidProofOfPossession"
_CURVES = {"secp256r1": "ECDSAP256", "secp384r1": "ECDSAP384", "secp521r1": "ECDSAP521"}


class PcrRefused(Exception):
    """The request cannot be signed; ``reason`` and ``message`` go into its condition."""

    outcome = "denied"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class PcrFailed(PcrRefused):
    """The signer could not sign a request that is fine (the CA cannot cover an hour, ...)."""

    outcome = "failed"


@dataclass(frozen=True)
class SubjectKey:
    public_key: PublicKey
    key_type: str  # one of spec.pcr.KEY_TYPES


def subject_key(spec: Obj, allowed: frozenset[str]) -> SubjectKey:
    """The verified subject key of a PCR spec, or ``PcrRefused`` saying what is wrong."""
    stub = _bytes(spec, "stubPKCS10Request")
    pkix = _bytes(spec, "pkixPublicKey")
    if stub:
        key = _from_stub(stub)
        if pkix and _spki(key) != pkix:
            raise PcrRefused(
                INVALID_PROOF,
                "spec.pkixPublicKey is not the key of spec.stubPKCS10Request; the request was "
                "not made by one kubelet for one key",
            )
    elif pkix:
        key = _load_public_key(pkix)
        _check_proof(key, str(spec.get("podUID") or ""), _bytes(spec, "proofOfPossession"))
    else:
        raise PcrRefused(
            INVALID_PROOF,
            "the request carries neither spec.stubPKCS10Request nor spec.pkixPublicKey",
        )
    key_type = key_type_of(key)
    if key_type is None or key_type not in allowed:
        have = key_type or _describe(key)
        raise PcrRefused(
            UNSUPPORTED_KEY_TYPE,
            f"this signer does not issue for {have} keys; set keyType to one of "
            f"{', '.join(k for k in KEY_TYPES if k in allowed)} in the pod's podCertificate "
            "projection",
        )
    return SubjectKey(key, key_type)


def key_type_of(key: PublicKey) -> str | None:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ED25519"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVES.get(key.curve.name)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size in (3072, 4096):
        return f"RSA{key.key_size}"
    return None


def _describe(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}-bit"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__


def _bytes(spec: Obj, name: str) -> bytes:
    value = spec.get(name)
    if not value:
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise PcrRefused(INVALID_PROOF, f"spec.{name} is not base64: {exc}") from exc


def _from_stub(der: bytes) -> PublicKey:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise PcrRefused(
            INVALID_PROOF, f"spec.stubPKCS10Request is not a DER PKCS#10 request: {exc}"
        ) from exc
    try:
        key = csr.public_key()
        valid = csr.is_signature_valid
    except UnsupportedAlgorithm as exc:
        raise PcrRefused(
            UNSUPPORTED_KEY_TYPE,
            f"the key type of spec.stubPKCS10Request is not supported ({exc}); use one of "
            f"{', '.join(KEY_TYPES)}",
        ) from exc
    if not isinstance(key, PublicKey):
        raise PcrRefused(UNSUPPORTED_KEY_TYPE, f"{type(key).__name__} keys are not supported")
    if not valid:
        raise PcrRefused(
            INVALID_PROOF,
            "the signature of spec.stubPKCS10Request does not verify with its own key: no "
            "proof that the requester holds the private key",
        )
    return key


def _load_public_key(der: bytes) -> PublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except UnsupportedAlgorithm as exc:
        raise PcrRefused(
            UNSUPPORTED_KEY_TYPE, f"the key type of spec.pkixPublicKey is not supported ({exc})"
        ) from exc
    except ValueError as exc:
        raise PcrRefused(
            INVALID_PROOF, f"spec.pkixPublicKey is not a PKIX public key: {exc}"
        ) from exc
    if not isinstance(key, PublicKey):
        raise PcrRefused(UNSUPPORTED_KEY_TYPE, f"{type(key).__name__} keys are not supported")
    return key


def _check_proof(key: PublicKey, pod_uid: str, proof: bytes) -> None:
    data = pod_uid.encode("ascii", "replace")
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(proof, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(proof, data, ec.ECDSA(hashes.SHA256()))
        else:
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            key.verify(proof, data, pss, hashes.SHA256())
    except (InvalidSignature, ValueError) as exc:
        raise PcrRefused(
            INVALID_PROOF,
            "spec.proofOfPossession does not verify: it must be the signature of the pod UID "
            "with the key of spec.pkixPublicKey",
        ) from exc


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
