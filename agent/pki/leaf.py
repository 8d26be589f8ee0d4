"""One builder for the end-entity (and path-length-0 CA) certificates the agent signs itself.

The local CA's issue (issuers/local.py) and the PodCertificateRequest signer (pki/pcr_leaf.py)
differ only in their inputs: the subject, the SANs, the usages and whether it is a CA.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from agent.pki.ca import CertificateAuthority
from agent.pki.csr import key_usage_is_empty
from agent.pki.keys import signing_hash


def authority_key_id(ca: CertificateAuthority) -> x509.AuthorityKeyIdentifier:
    """The AKI for certificates ``ca`` signs: its SKI, or one derived from its public key."""
    try:
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def sign_leaf(
    ca: CertificateAuthority,
    public_key: CertificatePublicKeyTypes,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    key_usage: x509.KeyUsage,
    extended_key_usage: x509.ExtendedKeyUsage | None,
    is_ca: bool = False,
    aki: x509.AuthorityKeyIdentifier | None = None,
) -> x509.Certificate:
    """Sign ``public_key`` with ``ca``: CA:FALSE (or CA:TRUE with pathlen 0), SKI and AKI, the key
    usage (critical, left out when no bit is set), the extended key usage, and the SANs (critical
    when the subject is empty, RFC 5280 4.2.1.6). ``aki`` spares working it out again."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki or authority_key_id(ca), critical=False)
    )
    if not key_usage_is_empty(key_usage):
        builder = builder.add_extension(key_usage, critical=True)
    if extended_key_usage is not None:
        builder = builder.add_extension(extended_key_usage, critical=False)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=len(subject) == 0
        )
    return builder.sign(ca.private_key, signing_hash(ca.private_key))
