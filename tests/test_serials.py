"""Serials are shown exactly as `openssl x509 -serial` prints them, so a log line can be grepped
for the serial an operator reads off a pod's tls.crt."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.pki.serials import format_serial
from tests.conftest import RunningAgent, openssl

_KEY = ec.generate_private_key(ec.SECP256R1())


def certificate_with_serial(serial: int, path: Path) -> Path:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serial test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(
    "serial",
    [
        0x910448AE,  # odd number of hex digits: openssl keeps a leading zero (0910448AE)
        0x0910448AE12,
        0x80,  # high bit set: DER adds a 00 byte, openssl does not print it
        0xFF00,
        1,
        0x7F,
        0x1234567890ABCDEF1234567890ABCDEF12345678,  # 20 bytes, the RFC 5280 maximum
        0x0234567890ABCDEF1234567890ABCDEF12345678,
    ],
)
def test_format_matches_openssl(serial: int, tmp_path: Path) -> None:
    path = certificate_with_serial(serial, tmp_path / "cert.pem")
    printed = openssl("x509", "-noout", "-serial", "-in", str(path)).strip()
    assert printed == f"serial={format_serial(serial)}"


def test_published_and_renewed_serials_are_logged_as_openssl_prints_them(
    agent: RunningAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    pod = agent.pod("web-0")
    target = agent.publish(pod, {"csi.cert-agent.io/dns-names": "web-0.default.svc"})
    printed = openssl("x509", "-noout", "-serial", "-in", str(target / "tls.crt")).strip()
    logged = [r for r in caplog.records if r.getMessage() == "published volume"]
    assert [f"serial={r.serial}" for r in logged] == [printed]  # type: ignore[attr-defined]

    caplog.clear()
    assert agent.agent.manager.renew(pod.volume_id) is not None
    printed = openssl("x509", "-noout", "-serial", "-in", str(target / "tls.crt")).strip()
    logged = [r for r in caplog.records if r.getMessage() == "renewed certificate"]
    assert [f"serial={r.serial}" for r in logged] == [printed]  # type: ignore[attr-defined]
