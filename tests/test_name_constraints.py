"""Name constraints: the agent's own check agrees with OpenSSL on every case, and bad constraint
values are refused with a message that says what to write."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.pki.ca import CAError
from agent.pki.csr import der_utf8_string
from agent.pki.intermediate import build_node_ca_csr, generate_node_ca_key, node_ca_from_issued
from agent.pki.name_constraints import ConstraintError, PermittedNames, carries, violations

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *extensions: tuple[x509.ExtensionType, bool],
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=1))
        .not_valid_after(NOW + dt.timedelta(hours=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def openssl_accepts(
    tmp_path: Path, constraints: x509.NameConstraints, subject: x509.Name, sans: list
) -> bool:
    root_key, ca_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    root = _cert(
        _name("root"), root_key, _name("root"), root_key, (x509.BasicConstraints(True, None), True)
    )
    ca = _cert(
        _name("node"),
        root_key,
        _name("root"),
        ca_key,
        (x509.BasicConstraints(True, None), True),
        (ca_usage, True),
        (constraints, True),
    )
    extensions: list[tuple[x509.ExtensionType, bool]] = [(x509.BasicConstraints(False, None), True)]
    if sans:
        extensions.append((x509.SubjectAlternativeName(sans), False))
    leaf = _cert(subject, ca_key, _name("node"), leaf_key, *extensions)
    (tmp_path / "root.pem").write_bytes(_pem(root))
    (tmp_path / "chain.pem").write_bytes(_pem(leaf, ca))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "chain.pem"),
            str(tmp_path / "chain.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


DEFAULTS = PermittedNames.parse(dns=["svc.cluster.local"], uri_hosts=["cluster.local"])
WIDE = PermittedNames.parse(
    dns=[".example.org"],
    uri_hosts=[".example.org"],
    emails=["example.com", ".example.net", "ops@example.org"],
    ip_networks=["10.0.0.0/8", "fd00::/8"],
)
OID_CN = x509.ObjectIdentifier("2.5.4.3")

CASES = [
    # (permitted, common name, SANs, allowed)
    (DEFAULTS, "es-0", [x509.DNSName("es-0.elastic.svc.cluster.local")], True),
    (DEFAULTS, "", [x509.DNSName("svc.cluster.local")], True),
    (DEFAULTS, "", [x509.DNSName("*.elastic.svc.cluster.local")], True),
    (DEFAULTS, "", [x509.DNSName("evil.google.com")], False),
    (DEFAULTS, "", [x509.DNSName("xsvc.cluster.local")], False),
    (DEFAULTS, "", [x509.DNSName("es-0.elastic.svc")], False),
    (DEFAULTS, "", [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")], True),
    (DEFAULTS, "", [x509.UniformResourceIdentifier("spiffe://evil.example/ns/a/sa/b")], False),
    (DEFAULTS, "", [x509.UniformResourceIdentifier("spiffe://a.cluster.local/ns/a")], False),
    (DEFAULTS, "x", [x509.IPAddress(ipaddress.ip_address("8.8.8.8"))], False),
    (DEFAULTS, "x", [x509.IPAddress(ipaddress.ip_address("::1"))], False),
    (DEFAULTS, "x", [x509.RFC822Name("a@evil.com")], True),  # no email subtree: open
    (DEFAULTS, "x", [x509.OtherName(OID_CN, der_utf8_string("es-0.node.es.local"))], True),
    (DEFAULTS, "evil.google.com", [], False),  # a host name in the CN counts without DNS SANs
    (DEFAULTS, "es-0", [], True),
    (WIDE, "", [x509.DNSName("a.example.org")], True),
    (WIDE, "", [x509.DNSName("example.org")], False),
    (WIDE, "", [x509.UniformResourceIdentifier("https://a.example.org/x")], True),
    (WIDE, "", [x509.UniformResourceIdentifier("https://example.org/x")], False),
    (WIDE, "x", [x509.RFC822Name("a@example.com")], True),
    (WIDE, "x", [x509.RFC822Name("a@sub.example.com")], False),
    (WIDE, "x", [x509.RFC822Name("a@sub.example.net")], True),
    (WIDE, "x", [x509.RFC822Name("ops@example.org")], True),
    (WIDE, "x", [x509.RFC822Name("dev@example.org")], False),
    (WIDE, "x", [x509.IPAddress(ipaddress.ip_address("10.1.2.3"))], True),
    (WIDE, "x", [x509.IPAddress(ipaddress.ip_address("11.0.0.1"))], False),
    (WIDE, "x", [x509.IPAddress(ipaddress.ip_address("fd12::1"))], True),
    (WIDE, "x", [x509.IPAddress(ipaddress.ip_address("2001:db8::1"))], False),
]


@pytest.mark.parametrize(("permitted", "cn", "sans", "allowed"), CASES)
def test_the_agent_and_openssl_agree(
    tmp_path: Path,
    permitted: PermittedNames,
    cn: str,
    sans: list[x509.GeneralName],
    allowed: bool,
) -> None:
    subject = _name(cn) if cn else x509.Name([])
    found = violations(permitted.extension(), subject, sans)
    assert (found == []) is allowed, found
    assert openssl_accepts(tmp_path, permitted.extension(), subject, sans) is allowed


def test_violations_name_every_offending_value() -> None:
    sans = [
        x509.DNSName("ok.svc.cluster.local"),
        x509.DNSName("evil.google.com"),
        x509.IPAddress(ipaddress.ip_address("8.8.8.8")),
    ]
    found = violations(DEFAULTS.extension(), x509.Name([]), sans)
    assert found == ["DNS evil.google.com", "IP 8.8.8.8"]


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("uri_hosts", "spiffe://cluster.local", "name a host, not a URI prefix"),
        ("uri_hosts", "cluster.local/ns", "name a host"),
        ("dns", "exa_mple.com", "not a DNS name constraint"),
        ("dns", "*.svc.cluster.local", "not a DNS name constraint"),
        ("emails", "a@b@c", "not an email name constraint"),
        ("ip_networks", "10.0.0.1/8", "not an IP name constraint"),
        ("ip_networks", "10.0.0.0/33", "not an IP name constraint"),
    ],
)
def test_bad_constraints_are_refused(kind: str, value: str, message: str) -> None:
    with pytest.raises(ConstraintError, match=message):
        PermittedNames.parse(**{kind: [value]})


def test_values_are_normalised() -> None:
    permitted = PermittedNames.parse(dns=["SVC.Cluster.Local"], ip_networks=["fd00:0::/8"])
    assert permitted.dns == ("svc.cluster.local",)
    assert permitted.ip_networks == ("fd00::/8",)
    ext = permitted.extension()
    assert ext.excluded_subtrees is None  # an IP subtree exists: no blanket exclusion


def test_csr_carries_the_constraints_and_carries_compares_them() -> None:
    key = generate_node_ca_key()
    csr = x509.load_pem_x509_csr(build_node_ca_csr(key, "cert-agent node n1", DEFAULTS.extension()))
    requested = csr.extensions.get_extension_for_class(x509.NameConstraints).value
    assert requested == DEFAULTS.extension()
    usage = csr.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and usage.digital_signature

    root_key = ec.generate_private_key(ec.SECP256R1())
    with_them = _cert(_name("n1"), root_key, _name("root"), key, (DEFAULTS.extension(), True))
    other = _cert(_name("n1"), root_key, _name("root"), key, (WIDE.extension(), True))
    without = _cert(_name("n1"), root_key, _name("root"), key)
    assert carries(with_them, DEFAULTS.extension())
    assert not carries(other, DEFAULTS.extension())
    assert not carries(without, DEFAULTS.extension())


@pytest.mark.parametrize(("ahead", "accepted"), [(30, True), (299, True), (600, False)])
def test_a_node_ca_from_an_issuer_whose_clock_runs_ahead(ahead: int, accepted: bool) -> None:
    root_key, key = ec.generate_private_key(ec.SECP256R1()), generate_node_ca_key()
    root = _cert(
        _name("root"), root_key, _name("root"), root_key, (x509.BasicConstraints(True, None), True)
    )
    start = NOW + dt.timedelta(seconds=ahead)
    node = (
        x509.CertificateBuilder()
        .subject_name(_name("cert-agent node n1"))
        .issuer_name(_name("root"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(hours=24))
        .add_extension(x509.BasicConstraints(True, None), True)
        .sign(root_key, hashes.SHA256())
    )
    if accepted:
        ca = node_ca_from_issued(key, _pem(node), _pem(root), "test", NOW)
        assert ca.certificate == node and ca.root == root
    else:
        with pytest.raises(CAError, match="is not valid before"):
            node_ca_from_issued(key, _pem(node), _pem(root), "test", NOW)
