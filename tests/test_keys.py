"""Key generation/encoding, CSR building and PKCS#12, checked with the real openssl CLI."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import InvalidArgument
from agent.issuers.base import IssueRequest
from agent.issuers.local import LocalCAIssuer
from agent.pki.ca import StaticCAProvider, ensure_self_signed_ca
from agent.pki.csr import (
    KNOWN_USAGES,
    build_csr,
    der_utf8_string,
    usages_to_extensions,
)
from agent.pki.keys import (
    encode_private_key,
    generate_private_key,
    key_matches_spec,
    load_private_key,
)
from agent.pki.pkcs12 import build_keystore
from agent.spec.model import (
    CertificateSpec,
    KeyAlgorithm,
    KeyEncoding,
    KeySpec,
    OtherName,
    PodInfo,
    SubjectSpec,
)

RSA, EC, ED = KeyAlgorithm.RSA, KeyAlgorithm.ECDSA, KeyAlgorithm.ED25519
PKCS1, PKCS8 = KeyEncoding.PKCS1, KeyEncoding.PKCS8


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args],
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        check=False,
    )


# --- keys -------------------------------------------------------------------------------------

KEY_CASES = [
    (KeySpec(RSA, 2048, PKCS1), "BEGIN RSA PRIVATE KEY", "Private-Key: (2048 bit"),
    (KeySpec(RSA, 2048, PKCS8), "BEGIN PRIVATE KEY", "Private-Key: (2048 bit"),
    (KeySpec(RSA, 3072, PKCS1), "BEGIN RSA PRIVATE KEY", "Private-Key: (3072 bit"),
    (KeySpec(EC, 256, PKCS8), "BEGIN PRIVATE KEY", "NIST CURVE: P-256"),
    (KeySpec(EC, 384, PKCS8), "BEGIN PRIVATE KEY", "NIST CURVE: P-384"),
    (KeySpec(EC, 521, PKCS8), "BEGIN PRIVATE KEY", "NIST CURVE: P-521"),
    (KeySpec(ED, None, PKCS8), "BEGIN PRIVATE KEY", "ED25519 Private-Key"),
]


@pytest.mark.parametrize(("spec", "header", "text"), KEY_CASES, ids=lambda v: str(v)[:40])
def test_generated_key_is_accepted_by_openssl(
    tmp_path: Path, spec: KeySpec, header: str, text: str
) -> None:
    key = generate_private_key(spec)
    pem = encode_private_key(key, spec.encoding)
    assert pem.decode().splitlines()[0] == f"-----{header}-----"
    path = tmp_path / "tls.key"
    path.write_bytes(pem)

    assert openssl("pkey", "-in", str(path), "-noout").returncode == 0
    shown = openssl("pkey", "-in", str(path), "-noout", "-text")
    assert shown.returncode == 0, shown.stderr
    assert text in shown.stdout

    loaded = load_private_key(pem)
    assert encode_private_key(loaded, KeyEncoding.PKCS8) == encode_private_key(key, PKCS8)
    assert key_matches_spec(loaded, spec)


def test_key_matches_spec_rejects_other_algorithm_or_size() -> None:
    rsa_key = generate_private_key(KeySpec(RSA, 2048, PKCS1))
    ec_key = generate_private_key(KeySpec(EC, 256, PKCS8))
    ed_key = generate_private_key(KeySpec(ED, None, PKCS8))
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)

    assert not key_matches_spec(rsa_key, KeySpec(RSA, 3072, PKCS1))
    assert not key_matches_spec(rsa_key, KeySpec(EC, 256, PKCS8))
    assert not key_matches_spec(ec_key, KeySpec(EC, 384, PKCS8))
    assert not key_matches_spec(ec_key, KeySpec(ED, None, PKCS8))
    assert not key_matches_spec(ed_key, KeySpec(RSA, 2048, PKCS1))
    # Encoding and reuse do not matter for reuse: the same key can be re-encoded.
    assert key_matches_spec(rsa_key, KeySpec(RSA, 2048, PKCS8, reuse=True))
    assert key_matches_spec(ec_key, KeySpec(EC, None, PKCS8))  # None is the default 256


@pytest.mark.parametrize(
    "spec", [KeySpec(RSA, 1024, PKCS1), KeySpec(RSA, 8200, PKCS1), KeySpec(EC, 255, PKCS8)]
)
def test_unsupported_key_size_names_key_size(spec: KeySpec) -> None:
    with pytest.raises(InvalidArgument) as err:
        generate_private_key(spec)
    assert err.value.attribute == "key-size"
    assert str(spec.size) in err.value.message


def test_pkcs1_is_refused_for_non_rsa_keys() -> None:
    key = generate_private_key(KeySpec(EC, 256, PKCS8))
    with pytest.raises(InvalidArgument) as err:
        encode_private_key(key, PKCS1)
    assert err.value.attribute == "key-encoding"


def test_load_private_key_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


# --- CSR --------------------------------------------------------------------------------------

FULL_SPEC = CertificateSpec(
    subject=SubjectSpec(
        common_name="es-0.es.search.svc",
        organizations=("Example Org",),
        organizational_units=("Search",),
        countries=("DE",),
        provinces=("Berlin",),
        localities=("Berlin",),
        street_addresses=("Main St 1",),
        postal_codes=("10115",),
        serial_number="1234",
    ),
    dns_names=("es-0.es.search.svc", "*.es.search.svc"),
    ip_addresses=("10.0.0.7", "fd00::1"),
    uris=("spiffe://cluster.local/ns/search/sa/es",),
    emails=("ops@example.com",),
    other_names=(OtherName("2.5.4.3", "es-0.node.prod.search.es.local"),),
    key_usages=("digital signature", "key encipherment", "server auth", "client auth"),
)


def test_csr_carries_subject_sans_and_requested_extensions(tmp_path: Path) -> None:
    key = generate_private_key(KeySpec(EC, 256, PKCS8))
    path = tmp_path / "req.csr"
    path.write_bytes(build_csr(key, FULL_SPEC))

    verified = openssl("req", "-in", str(path), "-noout", "-verify")
    assert verified.returncode == 0, verified.stderr
    shown = openssl("req", "-in", str(path), "-noout", "-text", "-nameopt", "RFC2253")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert (
        "Subject: serialNumber=1234,CN=es-0.es.search.svc,OU=Search,O=Example Org,"
        "postalCode=10115,street=Main St 1,L=Berlin,ST=Berlin,C=DE" in text
    )
    assert (
        "DNS:es-0.es.search.svc, DNS:*.es.search.svc, IP Address:10.0.0.7, "
        "IP Address:FD00:0:0:0:0:0:0:1, URI:spiffe://cluster.local/ns/search/sa/es, "
        "email:ops@example.com, othername: commonName::es-0.node.prod.search.es.local" in text
    )
    key_usage = "X509v3 Key Usage: critical\n" + " " * 20 + "Digital Signature, Key Encipherment"
    assert key_usage in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "X509v3 Basic Constraints: critical\n                    CA:FALSE" in text


def test_csr_with_literal_subject_and_ed25519(tmp_path: Path) -> None:
    key = generate_private_key(KeySpec(ED, None, PKCS8))
    spec = CertificateSpec(
        subject=SubjectSpec(literal_subject="CN=node-1,OU=ops+OU=dev,O=Acme\\, Inc."),
        dns_names=("node-1.example",),
    )
    pem = build_csr(key, spec)
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert csr.subject == x509.Name.from_rfc4514_string("CN=node-1,OU=ops+OU=dev,O=Acme\\, Inc.")
    path = tmp_path / "req.csr"
    path.write_bytes(pem)
    assert openssl("req", "-in", str(path), "-noout", "-verify").returncode == 0


def test_csr_with_empty_subject_has_critical_san() -> None:
    key = generate_private_key(KeySpec(EC, 256, PKCS8))
    csr = x509.load_pem_x509_csr(build_csr(key, CertificateSpec(uris=("spiffe://td/w",))))
    assert len(csr.subject) == 0
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_csr_without_any_identity_is_refused() -> None:
    key = generate_private_key(KeySpec(EC, 256, PKCS8))
    with pytest.raises(InvalidArgument) as err:
        build_csr(key, CertificateSpec())
    assert "common-name" in err.value.message


def test_csr_bad_literal_subject_and_country_name_the_attribute() -> None:
    key = generate_private_key(KeySpec(EC, 256, PKCS8))
    with pytest.raises(InvalidArgument) as err:
        build_csr(key, CertificateSpec(subject=SubjectSpec(literal_subject="not a dn")))
    assert err.value.attribute == "literal-subject"
    with pytest.raises(InvalidArgument) as err:
        build_csr(key, CertificateSpec(subject=SubjectSpec(common_name="x", countries=("DEU",))))
    assert err.value.attribute == "countries"


def test_usages_mapping() -> None:
    ku, eku = usages_to_extensions(["Digital Signature", "key encipherment", "server auth"])
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert eku is not None and list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    ku, eku = usages_to_extensions(["signing"], is_ca=True)
    assert ku.digital_signature and ku.key_cert_sign and eku is None

    ku, eku = usages_to_extensions(["s/mime", "email protection", "ocsp signing"])
    assert eku is not None
    assert list(eku) == [ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.OCSP_SIGNING]

    # Every documented name maps to something.
    for name in KNOWN_USAGES:
        usages_to_extensions(["key agreement", name])

    with pytest.raises(InvalidArgument) as err:
        usages_to_extensions(["encipher only"])
    assert err.value.attribute == "key-usages" and "key agreement" in err.value.message

    with pytest.raises(InvalidArgument) as err:
        usages_to_extensions(["digital signature", "server-auth"])
    assert err.value.attribute == "key-usages"
    assert "'server-auth'" in err.value.message and "server auth" in err.value.message


@pytest.mark.parametrize("length", [5, 127, 128, 300])
def test_der_utf8_string_parses_in_openssl(tmp_path: Path, length: int) -> None:
    value = ("é" + "x" * length)[:length]
    path = tmp_path / "v.der"
    path.write_bytes(der_utf8_string(value))
    parsed = openssl("asn1parse", "-inform", "DER", "-in", str(path))
    assert parsed.returncode == 0, parsed.stderr
    assert "UTF8STRING" in parsed.stdout
    assert f"l={len(value.encode())}" in parsed.stdout.replace(" ", "")


# --- PKCS#12 ----------------------------------------------------------------------------------


def test_pkcs12_is_modern_and_readable_without_legacy(tmp_path: Path) -> None:
    ca = ensure_self_signed_ca(tmp_path / "state")
    issuer = LocalCAIssuer(StaticCAProvider(ca))
    key = generate_private_key(KeySpec(RSA, 2048, PKCS1))
    spec = replace(FULL_SPEC, other_names=())
    issued = issuer.issue(
        IssueRequest("csi-x", "node", PodInfo("p", "ns", "u", "sa"), spec, build_csr(key, spec)),
        5,
    )
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    roots = x509.load_pem_x509_certificates(issued.ca_pem)
    path = tmp_path / "keystore.p12"
    path.write_bytes(build_keystore(key, chain, roots, "s3cret pass"))

    info = openssl("pkcs12", "-info", "-nokeys", "-in", str(path), "-passin", "pass:s3cret pass")
    assert info.returncode == 0, info.stderr
    report = info.stdout + info.stderr
    assert "MAC: sha256" in report
    assert "PBES2, PBKDF2, AES-256-CBC" in report
    assert "RC2" not in report and "3DES" not in report
    assert "friendlyName: tls" in report
    assert report.count("-----BEGIN CERTIFICATE-----") == 2

    wrong = openssl("pkcs12", "-info", "-nokeys", "-in", str(path), "-passin", "pass:wrong")
    assert wrong.returncode != 0

    keys = openssl("pkcs12", "-in", str(path), "-nocerts", "-nodes", "-passin", "pass:s3cret pass")
    assert keys.returncode == 0, keys.stderr
    extracted = serialization.load_pem_private_key(
        keys.stdout[keys.stdout.index("-----BEGIN") :].encode(), None
    )
    assert extracted.public_key() == key.public_key()

    loaded = pkcs12.load_pkcs12(path.read_bytes(), b"s3cret pass")
    assert loaded.cert is not None and loaded.cert.certificate == chain[0]
    assert [c.certificate for c in loaded.additional_certs] == [ca.certificate]


def test_pkcs12_requires_a_password() -> None:
    key = generate_private_key(KeySpec(EC, 256, PKCS8))
    with pytest.raises(InvalidArgument) as err:
        build_keystore(key, [], [], "")
    assert err.value.attribute == "pkcs12-password"
