"""The local CA (loading, creating) and the local issuer, checked with openssl and a real TLS
handshake."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import FailedPrecondition, InvalidArgument, IssuanceFailed, PermissionDenied
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.issuers.local import LocalCAIssuer
from agent.pki.ca import (
    CAError,
    CertificateAuthority,
    StaticCAProvider,
    ensure_self_signed_ca,
    load_ca_dir,
    load_ca_files,
    load_ca_pem,
)
from agent.pki.csr import build_csr
from agent.pki.keys import PrivateKey, encode_private_key, generate_private_key
from agent.spec.model import (
    CertificateSpec,
    KeyAlgorithm,
    KeyEncoding,
    KeySpec,
    OtherName,
    PodInfo,
    SubjectSpec,
)

EC_KEY = KeySpec(KeyAlgorithm.ECDSA, 256, KeyEncoding.PKCS8)
POD = PodInfo("es-0", "search", "uid-1", "es")
DAY = 86400

OPENSSL_CNF = """
[req]
distinguished_name = dn
[dn]
[v3_root]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_int]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[v3_leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
"""


def run_openssl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False, cwd=cwd)


def ok_openssl(*args: str, cwd: Path | None = None) -> str:
    done = run_openssl(*args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return ensure_self_signed_ca(tmp_path / "state")


@pytest.fixture
def issuer(ca: CertificateAuthority) -> LocalCAIssuer:
    return LocalCAIssuer(StaticCAProvider(ca))


def issue(
    issuer: LocalCAIssuer, spec: CertificateSpec, key: PrivateKey | None = None
) -> tuple[PrivateKey, IssuedCertificate]:
    key = key or generate_private_key(spec.key)
    request = IssueRequest("csi-" + "a" * 64, "node-1", POD, spec, build_csr(key, spec))
    return key, issuer.issue(request, timeout_seconds=5)


def write_volume(
    directory: Path, key: PrivateKey, issued: IssuedCertificate
) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    crt, tls_key, ca_crt = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    crt.write_bytes(issued.chain_pem)
    tls_key.write_bytes(encode_private_key(key, KeyEncoding.PKCS8))
    ca_crt.write_bytes(issued.ca_pem)
    return crt, tls_key, ca_crt


def make_openssl_ca(tmp_path: Path, kind: str = "rsa:2048") -> tuple[Path, Path, Path, Path]:
    """root (RSA by default, no pathlen) -> intermediate (EC), both made by the openssl CLI."""
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF)
    root_crt, root_key = tmp_path / "root.crt", tmp_path / "root.key"
    ok_openssl(
        "req", "-x509", "-config", str(cnf), "-extensions", "v3_root", "-newkey", kind,
        "-nodes", "-keyout", str(root_key), "-out", str(root_crt), "-subj", "/CN=Test Root",
        "-days", "30",
    )  # fmt: skip
    int_csr, int_crt, int_key = tmp_path / "int.csr", tmp_path / "int.crt", tmp_path / "int.key"
    ok_openssl(
        "req", "-new", "-config", str(cnf), "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(int_key), "-out", str(int_csr),
        "-subj", "/CN=Test Intermediate",
    )  # fmt: skip
    ok_openssl(
        "x509", "-req", "-in", str(int_csr), "-CA", str(root_crt), "-CAkey", str(root_key),
        "-set_serial", "2", "-out", str(int_crt), "-days", "20", "-extfile", str(cnf),
        "-extensions", "v3_int",
    )  # fmt: skip
    return root_crt, root_key, int_crt, int_key


def san_list(cert_file: Path) -> list[str]:
    out = ok_openssl("x509", "-in", str(cert_file), "-noout", "-ext", "subjectAltName")
    return out.splitlines()[1].strip().split(", ")


# --- the self-signed CA -----------------------------------------------------------------------


def test_self_signed_ca_is_created_once_with_safe_modes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old_umask = os.umask(0)  # the key must be 0600 whatever the umask
    try:
        first = ensure_self_signed_ca(state, common_name="test CA")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((state / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "ca.crt").stat().st_mode) == 0o644
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert sorted(p.name for p in state.iterdir()) == [".ca.lock", "ca.crt", "ca.key"]

    second = ensure_self_signed_ca(state, common_name="test CA")
    assert second.certificate == first.certificate
    assert second.private_key.public_key() == first.private_key.public_key()

    text = ok_openssl("x509", "-in", str(state / "ca.crt"), "-noout", "-text")
    assert "Subject: CN = test CA" in text
    assert "ASN1 OID: prime256v1" in text
    assert "X509v3 Basic Constraints: critical\n                CA:TRUE, pathlen:0" in text
    assert "X509v3 Key Usage: critical\n                Certificate Sign, CRL Sign" in text
    assert "X509v3 Subject Key Identifier" in text
    cert = first.certificate
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=3650)
    ok_openssl("verify", "-CAfile", str(state / "ca.crt"), str(state / "ca.crt"))


def test_expired_self_signed_ca_is_replaced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = ensure_self_signed_ca(state, now=utcnow() - dt.timedelta(days=3651))
    new = ensure_self_signed_ca(state)
    assert new.certificate != old.certificate
    assert new.not_after > utcnow()
    assert load_ca_dir(state).certificate == new.certificate


def test_damaged_self_signed_ca_is_an_error_not_silently_replaced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ensure_self_signed_ca(state)
    other = tmp_path / "other"
    ensure_self_signed_ca(other)
    shutil.copy(other / "ca.key", state / "ca.key")
    with pytest.raises(CAError, match="does not match"):
        ensure_self_signed_ca(state)


# --- loading CAs ------------------------------------------------------------------------------


def test_mismatched_key_names_both_files(tmp_path: Path) -> None:
    a, b = ensure_self_signed_ca(tmp_path / "a"), ensure_self_signed_ca(tmp_path / "b")
    assert a.certificate != b.certificate
    with pytest.raises(CAError) as err:
        load_ca_files(tmp_path / "a" / "ca.crt", tmp_path / "b" / "ca.key")
    message = err.value.message
    assert str(tmp_path / "a" / "ca.crt") in message and str(tmp_path / "b" / "ca.key") in message
    assert "does not match" in message
    assert isinstance(err.value, FailedPrecondition)


def test_missing_or_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CAError, match=str(tmp_path / "nope.crt")):
        load_ca_files(tmp_path / "nope.crt", tmp_path / "nope.key")
    (tmp_path / "ca.crt").write_text("not pem")
    (tmp_path / "ca.key").write_text("not pem")
    with pytest.raises(CAError, match="does not hold a PEM certificate"):
        load_ca_dir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CAError, match=r"neither ca\.crt"):
        load_ca_dir(empty)


def test_leaf_certificate_is_refused_as_ca(tmp_path: Path, issuer: LocalCAIssuer) -> None:
    key, issued = issue(issuer, CertificateSpec(dns_names=("leaf.example",), key=EC_KEY))
    with pytest.raises(CAError, match="is not a CA certificate"):
        load_ca_pem(issued.chain_pem, encode_private_key(key, KeyEncoding.PKCS8), "secret x")


def test_ca_without_cert_sign_usage_is_refused(tmp_path: Path) -> None:
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF + "[v3_bad]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=cRLSign\n")
    ok_openssl(
        "req", "-x509", "-config", str(cnf), "-extensions", "v3_bad", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(tmp_path / "ca.key"),
        "-out", str(tmp_path / "ca.crt"), "-subj", "/CN=No Sign", "-days", "3",
    )  # fmt: skip
    with pytest.raises(CAError, match="keyCertSign"):
        load_ca_dir(tmp_path)


def test_expired_ca_is_refused(tmp_path: Path) -> None:
    ensure_self_signed_ca(tmp_path, now=utcnow() - dt.timedelta(days=3651))
    with pytest.raises(CAError, match="expired"):
        load_ca_dir(tmp_path)


def test_tls_secret_layout_adds_the_root_from_ca_crt(tmp_path: Path) -> None:
    root_crt, _, int_crt, int_key = make_openssl_ca(tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(int_crt, secret / "tls.crt")
    shutil.copy(int_key, secret / "tls.key")
    shutil.copy(root_crt, secret / "ca.crt")
    ca = load_ca_dir(secret)
    root = x509.load_pem_x509_certificate(root_crt.read_bytes())
    assert ca.chain == (root,)
    assert ca.trust_pem == root.public_bytes(serialization.Encoding.PEM)


def test_chain_out_of_order_is_refused(tmp_path: Path) -> None:
    _, _, int_crt, int_key = make_openssl_ca(tmp_path)
    other_root = ensure_self_signed_ca(tmp_path / "other").cert_pem
    with pytest.raises(CAError, match="out of order"):
        load_ca_pem(int_crt.read_bytes() + other_root, int_key.read_bytes(), "bundle")


# --- issuing ----------------------------------------------------------------------------------

FULL_SPEC = CertificateSpec(
    subject=SubjectSpec(common_name="es-0.es.search.svc", organizations=("Search",)),
    dns_names=("es-0.es.search.svc", "es-0.es"),
    ip_addresses=("10.1.2.3", "fd00::7"),
    uris=("spiffe://cluster.local/ns/search/sa/es",),
    emails=("search@example.com",),
    other_names=(OtherName("2.5.4.3", "es-0.node.prod.search.es.local"),),
    duration_seconds=48 * 3600,
    key=EC_KEY,
    key_usages=("digital signature", "key encipherment", "server auth", "client auth"),
)


def test_issued_certificate_verifies_and_carries_exactly_what_was_asked(
    tmp_path: Path, issuer: LocalCAIssuer, ca: CertificateAuthority
) -> None:
    key, issued = issue(issuer, FULL_SPEC)
    crt, _, ca_crt = write_volume(tmp_path / "vol", key, issued)
    assert issued.ca_pem == ca.cert_pem
    assert len(x509.load_pem_x509_certificates(issued.chain_pem)) == 1  # root is not sent

    assert ok_openssl("verify", "-CAfile", str(ca_crt), str(crt)).strip().endswith(": OK")
    ok_openssl(
        "verify", "-CAfile", str(ca_crt), "-purpose", "sslserver", "-verify_hostname",
        "es-0.es.search.svc", "-verify_ip", "10.1.2.3", "-verify_email", "search@example.com",
        str(crt),
    )  # fmt: skip

    assert san_list(crt) == [
        "DNS:es-0.es.search.svc",
        "DNS:es-0.es",
        "IP Address:10.1.2.3",
        "IP Address:FD00:0:0:0:0:0:0:7",
        "URI:spiffe://cluster.local/ns/search/sa/es",
        "email:search@example.com",
        "othername: commonName::es-0.node.prod.search.es.local",
    ]
    text = ok_openssl("x509", "-in", str(crt), "-noout", "-text")
    assert "Subject: O = Search, CN = es-0.es.search.svc" in text
    assert "X509v3 Subject Alternative Name: \n" in text  # not critical: subject is set
    assert "X509v3 Key Usage: critical\n                Digital Signature, Key Encipherment" in text
    assert (
        "X509v3 Extended Key Usage: \n"
        "                TLS Web Server Authentication, TLS Web Client Authentication"
    ) in text
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in text
    assert "Signature Algorithm: ecdsa-with-SHA256" in text

    leaf = issued.leaf
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=48)
    assert abs(leaf.not_valid_before_utc - utcnow()) < dt.timedelta(minutes=5)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == ski
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert leaf.serial_number > 2**64
    _, again = issue(issuer, FULL_SPEC, key)
    assert again.leaf.serial_number != leaf.serial_number


def test_default_duration_and_issuer_maximum(ca: CertificateAuthority) -> None:
    spec = CertificateSpec(dns_names=("a.example",), key=EC_KEY)
    _, issued = issue(LocalCAIssuer(StaticCAProvider(ca)), spec)
    assert issued.not_after - issued.not_before == dt.timedelta(hours=2160)

    short = LocalCAIssuer(StaticCAProvider(ca), max_duration_seconds=24 * 3600)
    _, issued = issue(short, spec)
    assert issued.not_after - issued.not_before == dt.timedelta(hours=24)

    with pytest.raises(InvalidArgument) as err:
        issue(LocalCAIssuer(StaticCAProvider(ca)), replace(spec, duration_seconds=8760 * 3600))
    assert err.value.attribute == "duration"
    assert err.value.message == "duration 8760h exceeds this issuer's maximum of 2160h"
    with pytest.raises(InvalidArgument, match="maximum of 24h"):
        issue(short, replace(spec, duration_seconds=24 * 3600 + 90))


def test_lifetime_is_capped_at_the_ca_expiry(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = ensure_self_signed_ca(state, now=utcnow() - dt.timedelta(days=3650 - 10))
    key, issued = issue(
        LocalCAIssuer(StaticCAProvider(ca)), CertificateSpec(dns_names=("a.example",), key=EC_KEY)
    )
    assert issued.not_after == ca.not_after
    crt, _, ca_crt = write_volume(tmp_path / "vol", key, issued)
    ok_openssl("verify", "-CAfile", str(ca_crt), str(crt))


def test_expired_ca_cannot_issue_and_is_not_ready(ca: CertificateAuthority) -> None:
    late = LocalCAIssuer(StaticCAProvider(ca), clock=lambda: ca.not_after + dt.timedelta(days=1))
    ready, why = late.ready()
    assert not ready and "expired" in why
    assert late.ca_not_after() == ca.not_after
    with pytest.raises(FailedPrecondition, match="expired"):
        issue(late, CertificateSpec(dns_names=("a.example",), key=EC_KEY))


def test_is_ca_policy(tmp_path: Path, issuer: LocalCAIssuer, ca: CertificateAuthority) -> None:
    spec = CertificateSpec(
        subject=SubjectSpec(common_name="pod CA"), is_ca=True, key=EC_KEY, key_usages=()
    )
    with pytest.raises(InvalidArgument) as err:
        issue(issuer, spec)
    assert err.value.attribute == "is-ca"

    # Allowed, but the self-signed CA has pathlen 0: a CA below it would never verify.
    with pytest.raises(InvalidArgument, match="pathLenConstraint 0"):
        issue(LocalCAIssuer(StaticCAProvider(ca), allow_ca=True), spec)

    root_crt, root_key, _, _ = make_openssl_ca(tmp_path)
    root = load_ca_files(root_crt, root_key)
    key, issued = issue(LocalCAIssuer(StaticCAProvider(root), allow_ca=True), spec)
    crt, _, ca_crt = write_volume(tmp_path / "vol", key, issued)
    ok_openssl("verify", "-CAfile", str(ca_crt), str(crt))
    text = ok_openssl("x509", "-in", str(crt), "-noout", "-text")
    assert "CA:TRUE, pathlen:0" in text
    assert "X509v3 Key Usage: critical\n                Certificate Sign" in text
    assert "Signature Algorithm: sha256WithRSAEncryption" in text


def test_namespace_policy(ca: CertificateAuthority) -> None:
    spec = CertificateSpec(dns_names=("a.example",), key=EC_KEY)
    only_other = LocalCAIssuer(StaticCAProvider(ca), allowed_namespaces=frozenset({"infra"}))
    with pytest.raises(PermissionDenied, match="'search'"):
        issue(only_other, spec)
    allowed = LocalCAIssuer(StaticCAProvider(ca), allowed_namespaces=frozenset({"search"}))
    issue(allowed, spec)


def test_empty_subject_gets_critical_san(tmp_path: Path, issuer: LocalCAIssuer) -> None:
    spec = CertificateSpec(
        uris=("spiffe://cluster.local/ns/search/sa/es",),
        key=KeySpec(KeyAlgorithm.ED25519, None, KeyEncoding.PKCS8),
    )
    key, issued = issue(issuer, spec)
    crt, _, ca_crt = write_volume(tmp_path / "vol", key, issued)
    ok_openssl("verify", "-CAfile", str(ca_crt), str(crt))
    text = ok_openssl("x509", "-in", str(crt), "-noout", "-text")
    assert "X509v3 Subject Alternative Name: critical\n" in text
    assert "Subject: \n" in text or "Subject:\n" in text
    assert "ED25519" in text  # the leaf's key


def test_tampered_csr_is_refused(issuer: LocalCAIssuer) -> None:
    spec = CertificateSpec(
        dns_names=("a.example",), key=KeySpec(KeyAlgorithm.ED25519, None, KeyEncoding.PKCS8)
    )
    key = generate_private_key(spec.key)
    der = bytearray(
        x509.load_pem_x509_csr(build_csr(key, spec)).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # a bit of the Ed25519 signature
    bad_pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IssuanceFailed, match="signature"):
        issuer.issue(IssueRequest("v", "n", POD, spec, bad_pem), 5)


def test_intermediate_ca_chain_verifies(tmp_path: Path) -> None:
    root_crt, _, int_crt, int_key = make_openssl_ca(tmp_path)
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(int_crt.read_bytes() + root_crt.read_bytes())
    ca = load_ca_files(bundle, int_key)
    assert not ca.is_self_signed and len(ca.chain) == 1

    key, issued = issue(LocalCAIssuer(StaticCAProvider(ca)), FULL_SPEC)
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    assert chain[1:] == [ca.certificate]  # the intermediate travels; the root does not
    assert issued.ca_pem == root_crt.read_bytes()
    assert issued.not_after <= ca.not_after

    crt, _, ca_crt = write_volume(tmp_path / "vol", key, issued)
    ok_openssl("verify", "-CAfile", str(ca_crt), "-untrusted", str(crt), str(crt))
    # Without the intermediate the leaf does not verify against the root alone.
    leaf_only = tmp_path / "leaf.crt"
    leaf_only.write_bytes(issued.leaf.public_bytes(serialization.Encoding.PEM))
    assert run_openssl("verify", "-CAfile", str(ca_crt), str(leaf_only)).returncode != 0


def test_ed25519_ca_issues_verifiable_certificates(tmp_path: Path) -> None:
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF)
    ok_openssl(
        "req", "-x509", "-config", str(cnf), "-extensions", "v3_root", "-newkey", "ed25519",
        "-nodes", "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.crt"),
        "-subj", "/CN=Ed Root", "-days", "5",
    )  # fmt: skip
    ca = load_ca_dir(tmp_path)
    key, issued = issue(LocalCAIssuer(StaticCAProvider(ca)), FULL_SPEC)
    crt, _, ca_crt = write_volume(tmp_path / "vol", key, issued)
    ok_openssl("verify", "-CAfile", str(ca_crt), str(crt))
    assert "Signature Algorithm: ED25519" in ok_openssl("x509", "-in", str(crt), "-noout", "-text")


# --- a real mutual TLS handshake between two issued certificates ------------------------------


def _tls_pair(
    tmp_path: Path, issuer: LocalCAIssuer, client_usages: tuple[str, ...]
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_spec = replace(FULL_SPEC, key_usages=("digital signature", "server auth"))
    client_spec = CertificateSpec(
        subject=SubjectSpec(common_name="es-1.es.search.svc"),
        dns_names=("es-1.es.search.svc",),
        key=KeySpec(KeyAlgorithm.RSA, 2048, KeyEncoding.PKCS1),
        key_usages=client_usages,
    )
    skey, sissued = issue(issuer, server_spec)
    ckey, cissued = issue(issuer, client_spec)
    scrt, skeyf, ca_crt = write_volume(tmp_path / "server", skey, sissued)
    ccrt, ckeyf, _ = write_volume(tmp_path / "client", ckey, cissued)

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(scrt, skeyf)
    server.load_verify_locations(cafile=ca_crt)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(ccrt, ckeyf)
    client.load_verify_locations(cafile=ca_crt)
    return server, client


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> dict[str, object]:
    """Run both ends over a socketpair; return what the server saw of the client."""
    left, right = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(tls.recv(5).upper())
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_hostname="es-0.es.search.svc") as tls:
            tls.sendall(b"hello")
            seen["reply"] = tls.recv(5)
    except (ssl.SSLError, OSError) as exc:
        seen["client_error"] = exc
    finally:
        right.close()
        thread.join(timeout=30)
        left.close()
    return seen


def test_mutual_tls_handshake(tmp_path: Path, issuer: LocalCAIssuer) -> None:
    server, client = _tls_pair(tmp_path, issuer, ("digital signature", "client auth"))
    seen = _handshake(server, client)
    assert "error" not in seen and "client_error" not in seen, seen
    assert seen["reply"] == b"HELLO"
    peer = seen["peer"]
    assert isinstance(peer, dict)
    assert peer["subject"] == ((("commonName", "es-1.es.search.svc"),),)


def test_client_certificate_without_client_auth_is_rejected(
    tmp_path: Path, issuer: LocalCAIssuer
) -> None:
    server, client = _tls_pair(tmp_path, issuer, ("digital signature", "server auth"))
    seen = _handshake(server, client)
    assert "peer" not in seen
    assert "unsuitable certificate purpose" in str(seen.get("error"))


def test_eku_oids_in_issued_certificate(issuer: LocalCAIssuer) -> None:
    spec = replace(FULL_SPEC, key_usages=("signing", "code signing", "timestamping"))
    _, issued = issue(issuer, spec)
    eku = issued.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.TIME_STAMPING]
    ku = issued.leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment


def _sign_both_ways(
    issuer: LocalCAIssuer, spec: CertificateSpec, key: PrivateKey
) -> tuple[x509.Certificate, x509.Certificate]:
    """The same key and spec signed from a CSR and from the public key alone."""
    from_csr = issuer.issue(IssueRequest("v", "node-1", POD, spec, build_csr(key, spec)), 5)
    direct = issuer.issue(
        IssueRequest("v", "node-1", POD, spec, b"", public_key=key.public_key()), 5
    )
    # Both parse back from the PEM the volume gets, not from the issuer's own objects.
    return (
        x509.load_pem_x509_certificates(from_csr.chain_pem)[0],
        x509.load_pem_x509_certificates(direct.chain_pem)[0],
    )


def _contents(cert: x509.Certificate) -> tuple[object, ...]:
    """Everything of a certificate but its serial and signature bytes."""
    return (
        cert.subject.public_bytes(),
        cert.issuer.public_bytes(),
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        cert.signature_algorithm_oid,
        [(e.oid, e.critical, e.value.public_bytes()) for e in cert.extensions],
    )


@pytest.mark.parametrize(
    "spec",
    [
        FULL_SPEC,
        # Empty subject: the SAN extension turns critical.
        CertificateSpec(uris=("spiffe://cluster.local/ns/a/sa/b",), key=EC_KEY),
        # Literal subject, no SANs, extended usages only (no KeyUsage extension at all).
        CertificateSpec(
            subject=SubjectSpec(literal_subject="CN=literal,O=Org,C=DE"),
            key=EC_KEY,
            key_usages=("client auth",),
        ),
        CertificateSpec(
            subject=SubjectSpec(common_name="ca.example", countries=("FR",)),
            dns_names=("ca.example",),
            key=KeySpec(KeyAlgorithm.RSA, 2048, KeyEncoding.PKCS1),
            is_ca=True,
            duration_seconds=3600,
        ),
    ],
    ids=["full", "empty-subject", "literal-subject", "ca-rsa"],
)
def test_signing_the_public_key_gives_the_certificate_a_csr_gives(
    tmp_path: Path, ca: CertificateAuthority, spec: CertificateSpec
) -> None:
    """The manager hands the local CA the public key instead of a CSR (the key never left the
    process): the certificate must be the one the CSR path makes, extension for extension."""
    if spec.is_ca:  # the self-signed CA has pathlen 0: sign CAs with an openssl root
        root_crt, root_key, _, _ = make_openssl_ca(tmp_path)
        ca = load_ca_files(root_crt, root_key)
    now = dt.datetime.now(dt.UTC)
    issuer = LocalCAIssuer(StaticCAProvider(ca), allow_ca=True, clock=lambda: now)
    from_csr, direct = _sign_both_ways(issuer, spec, generate_private_key(spec.key))
    assert _contents(direct) == _contents(from_csr)
    assert direct.serial_number != from_csr.serial_number  # two issuances, not one reused


def test_signing_the_public_key_refuses_what_the_csr_path_refuses(
    ca: CertificateAuthority,
) -> None:
    key = generate_private_key(EC_KEY)
    issuer = LocalCAIssuer(StaticCAProvider(ca), allowed_namespaces=frozenset({"other"}))

    def refusals(spec: CertificateSpec) -> tuple[str, str]:
        messages = []
        for make in (
            lambda: IssueRequest("v", "n", POD, spec, build_csr(key, spec)),
            lambda: IssueRequest("v", "n", POD, spec, b"", public_key=key.public_key()),
        ):
            with pytest.raises((InvalidArgument, PermissionDenied)) as caught:
                issuer.issue(make(), 5)
            messages.append(caught.value.message)
        return messages[0], messages[1]

    # A spec naming nothing: refused before the namespace check, as build_csr refused it.
    nothing = CertificateSpec(key=EC_KEY)
    csr_message, direct_message = refusals(nothing)
    assert "would identify nothing" in direct_message and direct_message == csr_message
    # A namespace the issuer does not sign for.
    named = CertificateSpec(dns_names=("a.example",), key=EC_KEY)
    csr_message, direct_message = refusals(named)
    assert "does not sign for namespace" in direct_message and direct_message == csr_message
