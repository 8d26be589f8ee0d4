"""The manager never publishes a certificate that belongs to another key than the one it holds.

``check_issued_for_key`` compares the certificate's public key with the key's own (a key
comparison, not an encoding of both): the same key passes, another key of the same type or a key
of another type is refused as ``key_mismatch``.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from agent.errors import IssuanceFailed
from agent.issuers.base import IssuedCertificate
from agent.pki.keys import PrivateKey
from agent.volumes.issue import check_issued_for_key

CA_KEY = ec.generate_private_key(ec.SECP256R1())


def _issued_for(public_key: object, parsed: bool) -> IssuedCertificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pod")])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(CA_KEY, hashes.SHA256())
    )
    pem = leaf.public_bytes(serialization.Encoding.PEM)
    # Parsed by the issuer (the local CA) or from the PEM an external issuer returned.
    return IssuedCertificate(chain_pem=pem, ca_pem=b"", parsed_leaf=leaf if parsed else None)


@pytest.mark.parametrize("parsed", [True, False])
def test_a_certificate_for_the_key_held_passes(parsed: bool) -> None:
    for key in (ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)):
        check_issued_for_key(_issued_for(key.public_key(), parsed), key)


@pytest.mark.parametrize("parsed", [True, False])
@pytest.mark.parametrize(
    ("held", "other"),
    [
        (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())),
        (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())),
        (ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)),
        (rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)),
        (ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())),
    ],
    ids=["ecdsa-other-ecdsa", "p256-p384", "ecdsa-rsa", "rsa-other-rsa", "ed25519-ecdsa"],
)
def test_a_certificate_for_another_key_is_refused(
    held: PrivateKey, other: PrivateKey, parsed: bool
) -> None:
    issued = _issued_for(other.public_key(), parsed)
    with pytest.raises(IssuanceFailed, match="a certificate for a different key") as raised:
        check_issued_for_key(issued, held)
    assert raised.value.reason == "key_mismatch"
