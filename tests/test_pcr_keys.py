"""The subject key of a PodCertificateRequest: both request forms, every key type the API allows,
and each way a request can lie about its key."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.issuers.pcr_keys import PcrRefused, subject_key
from agent.spec.pcr import KEY_TYPES
from tests.fake_pcr import KEY_MAKERS, pcr_body, sign_uid, validate_create

POD = {
    "metadata": {
        "name": "web-0",
        "namespace": "apps",
        "uid": "6d1f3c1e-0000-4000-8000-000000000001",
    },
    "spec": {"nodeName": "node-1", "serviceAccountName": "web"},
}
ALL = frozenset(KEY_TYPES)


def spec(**kwargs: Any) -> dict[str, Any]:
    body = pcr_body(name="r", pod=POD, signer="cert-agent.io/pod-identity", **kwargs).body
    return body["spec"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("key_type", [k for k in KEY_TYPES if k != "RSA4096"])
@pytest.mark.parametrize("form", ["stub", "pkix"])
def test_every_key_type_in_both_forms(key_type: str, form: str) -> None:
    s = spec(key_type=key_type, form=form, max_expiration=3600)
    assert validate_create({"spec": s}) == []  # what the API server accepts at creation
    key = subject_key(s, ALL)
    assert key.key_type == key_type


def test_a_key_type_the_signer_does_not_allow_is_unsupported_key_type() -> None:
    with pytest.raises(PcrRefused) as err:
        subject_key(spec(key_type="ECDSAP384"), frozenset({"ED25519", "ECDSAP256"}))
    assert err.value.reason == "UnsupportedKeyType"
    assert "ECDSAP384" in err.value.message and "ECDSAP256, ED25519" in err.value.message


def test_rsa_2048_is_unsupported_key_type() -> None:
    key = rsa.generate_private_key(65537, 2048)
    with pytest.raises(PcrRefused) as err:
        subject_key(spec(key=key), ALL)
    assert err.value.reason == "UnsupportedKeyType"
    assert "RSA 2048-bit" in err.value.message


def test_a_stub_request_signed_by_another_key_is_refused() -> None:
    s = spec()
    csr = x509.load_der_x509_csr(base64.b64decode(str(s["stubPKCS10Request"])))
    # Same public key, signature from another key: rebuild the DER with a foreign signature.
    other = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(other, hashes.SHA256())
    )
    der = csr.tbs_certrequest_bytes
    raw = forged.public_bytes(serialization.Encoding.DER)
    # Splice: our TBS with the other request's signature algorithm and value.
    tail = raw[raw.index(forged.tbs_certrequest_bytes) + len(forged.tbs_certrequest_bytes) :]
    body = der + tail
    s["stubPKCS10Request"] = base64.b64encode(_sequence(body)).decode()
    assert validate_create({"spec": s}) != []  # the API server refuses it too
    with pytest.raises(PcrRefused) as err:
        subject_key(s, ALL)
    assert err.value.reason == "InvalidProofOfPossession"


@pytest.mark.parametrize("key_type", ["ECDSAP256", "ED25519", "RSA3072"])
def test_a_proof_over_another_uid_is_refused(key_type: str) -> None:
    request = pcr_body(name="r", pod=POD, signer="a.io/x", key_type=key_type, form="pkix")
    s = request.body["spec"]
    s["proofOfPossession"] = base64.b64encode(sign_uid(request.key, "another-pod-uid")).decode()
    assert validate_create({"spec": s}) != []
    with pytest.raises(PcrRefused) as err:
        subject_key(s, ALL)
    assert err.value.reason == "InvalidProofOfPossession"


def test_pkix_key_that_differs_from_the_stub_is_refused() -> None:
    s = spec()
    s["pkixPublicKey"] = spec(form="pkix")["pkixPublicKey"]
    with pytest.raises(PcrRefused, match=r"not the key of spec\.stubPKCS10Request"):
        subject_key(s, ALL)


def test_no_key_and_garbage_are_refused() -> None:
    with pytest.raises(PcrRefused, match="neither"):
        subject_key({"podUID": "x"}, ALL)
    with pytest.raises(PcrRefused, match="not a DER PKCS#10"):
        subject_key({"stubPKCS10Request": base64.b64encode(b"junk").decode()}, ALL)
    with pytest.raises(PcrRefused, match="not base64"):
        subject_key({"pkixPublicKey": "%%%"}, ALL)


def test_rsa4096_stub() -> None:
    key = KEY_MAKERS["RSA4096"]()
    assert subject_key(spec(key=key), ALL).key_type == "RSA4096"


def _sequence(content: bytes) -> bytes:
    """DER SEQUENCE around ``content``."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return b"\x30" + length + content
