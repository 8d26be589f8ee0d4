"""The certificate a PodCertificateRequest gets: built from the signer's expanded names.

No subject unless the signer sets a common name (the SAN extension is then critical, RFC 5280
4.2.1.6), key usage digital signature (plus key encipherment for RSA keys), extended key usage
server and client auth, CA:FALSE, subject and authority key identifiers.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.pki.ca import CertificateAuthority
from agent.pki.keys import signing_hash
from agent.spec.pcr import PcrNames

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def build_leaf(
    ca: CertificateAuthority,
    public_key: PublicKey,
    names: PcrNames,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    subject, sans = leaf_subject(names), leaf_sans(names)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    if sans:
        # RFC 5280 4.2.1.6: with an empty subject the SAN extension is critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=not names.common_name
        )
    return builder.sign(ca.private_key, signing_hash(ca.private_key))


def leaf_subject(names: PcrNames) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, names.common_name)] if names.common_name else []
    )


def leaf_sans(names: PcrNames) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in names.uris]
    return sans + [x509.DNSName(d) for d in names.dns_names]


def _authority_key_id(ca: CertificateAuthority) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
