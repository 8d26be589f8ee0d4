"""PKCS#12 keystores with modern encryption (PBES2 + AES-256-CBC, SHA-256 MAC).

cert-manager's csi-driver writes RC2/3DES keystores that OpenSSL 3 refuses without ``-legacy``;
these open with any current OpenSSL and Java 8u301+ / 11+.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from agent.errors import InvalidArgument
from agent.pki.keys import PrivateKey

DEFAULT_FRIENDLY_NAME = "tls"
# Java keytool's PBES2 default; a few milliseconds per keystore.
KDF_ROUNDS = 10_000


def build_keystore(
    key: PrivateKey,
    chain: list[x509.Certificate],
    ca: list[x509.Certificate],
    password: str,
    *,
    friendly_name: str = DEFAULT_FRIENDLY_NAME,
) -> bytes:
    """A DER PKCS#12 holding ``key`` with ``chain[0]`` as its certificate, then the rest of
    ``chain`` and the ``ca`` certificates (duplicates dropped), encrypted under ``password``."""
    if not password:
        raise InvalidArgument(
            "pkcs12-password must not be empty when pkcs12-enable is true",
            attribute="pkcs12-password",
        )
    if not chain:
        raise ValueError("build_keystore needs at least the leaf certificate")
    leaf, rest = chain[0], chain[1:]
    extra: list[x509.Certificate] = []
    for cert in [*rest, *ca]:
        if cert != leaf and cert not in extra:
            extra.append(cert)
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode("utf-8"))
    )
    return pkcs12.serialize_key_and_certificates(
        friendly_name.encode("utf-8"), key, leaf, extra or None, encryption
    )
