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
from agent.pki.leaf import sign_leaf
from agent.spec.pcr import PcrNames

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def build_leaf(
    ca: CertificateAuthority,
    public_key: PublicKey,
    names: PcrNames,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    return sign_leaf(
        ca,
        public_key,
        leaf_subject(names),
        leaf_sans(names),
        not_before,
        not_after,
        key_usage=x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        ),
        extended_key_usage=x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        ),
    )


def leaf_subject(names: PcrNames) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, names.common_name)] if names.common_name else []
    )


def leaf_sans(names: PcrNames) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in names.uris]
    return sans + [x509.DNSName(d) for d in names.dns_names]
