"""Reading a CertificateRequest: its state, the certificate when Ready, why it failed or waits."""

from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import DeadlineExceeded, IssuanceFailed, PermissionDenied
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.issuers.cr_request import ANNOTATION_VOLUME, GROUP, Obj


def cr_name(cr: Obj) -> str:
    return f"{cr['metadata'].get('namespace')}/{cr['metadata'].get('name')}"


def annotation_volume(cr: Obj) -> str | None:
    annotations: dict[str, str] = cr["metadata"].get("annotations") or {}
    return annotations.get(ANNOTATION_VOLUME)


def issuer_ref(cr: Obj) -> tuple[str, str, str]:
    ref = cr.get("spec", {}).get("issuerRef", {})
    return (ref.get("name", ""), ref.get("kind", "Issuer"), ref.get("group", GROUP))


def wanted_issuer_ref(request: IssueRequest) -> tuple[str, str, str]:
    ref = request.spec.issuer
    return (ref.name or "", ref.kind, ref.group)


def public_key_der(csr_pem: bytes) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem)
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def request_key(cr: Obj) -> bytes | None:
    try:
        return public_key_der(base64.b64decode(cr["spec"]["request"]))
    except (KeyError, ValueError, binascii.Error):
        return None


def _conditions(cr: Obj) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in (cr.get("status") or {}).get("conditions") or []}


def request_state(cr: Obj) -> str:
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


def outcome(cr: Obj, csr_pem: bytes) -> IssuedCertificate | None:
    """The certificate when ``cr`` is Ready, ``None`` while pending; raises when it failed."""
    ref = cr_name(cr)
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
    if leaf_key != public_key_der(csr_pem):
        raise IssuanceFailed(
            f"CertificateRequest {ref} returned a certificate for a different key than the CSR",
            reason="key_mismatch",
        )
    if not ca_pem:
        # cert-manager sets status.ca on a best-effort basis; the chain's top is what we have.
        ca_pem = chain[-1].public_bytes(serialization.Encoding.PEM)
    return IssuedCertificate(chain_pem=chain_pem, ca_pem=ca_pem, request=ref)


def not_ready_error(cr: Obj, timeout_seconds: float) -> DeadlineExceeded:
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
        f"CertificateRequest {cr_name(cr)} is not ready after {timeout_seconds:g}s{detail}; it "
        "stays pending and the next mount attempt picks it up"
    )
