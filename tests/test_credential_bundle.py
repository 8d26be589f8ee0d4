"""credential-bundle-file: the key and the full chain in one PEM file (podCertificate's layout)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import IS_ROOT, RunningAgent, openssl

CM = "csi.cert-agent.io/"
ATTRS = {
    CM + "dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
    CM + "credential-bundle-file": "tls.pem",
    CM + "key-algorithm": "ECDSA",
}


def public_pem(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def blocks(pem_bytes: bytes) -> list[str]:
    return re.findall(r"-----BEGIN ([A-Z ]+)-----", pem_bytes.decode())


def check_bundle(target: Path) -> None:
    bundle = (target / "tls.pem").read_bytes()
    # The layout: one PKCS#8 PRIVATE KEY block first, then the chain, leaf first.
    assert blocks(bundle)[0] == "PRIVATE KEY"
    assert set(blocks(bundle)[1:]) == {"CERTIFICATE"}
    # openssl reads both halves of the one file.
    assert "BEGIN PRIVATE KEY" in openssl("pkey", "-in", str(target / "tls.pem"))
    subject = openssl("x509", "-in", str(target / "tls.pem"), "-noout", "-subject")
    assert subject == openssl("x509", "-in", str(target / "tls.crt"), "-noout", "-subject")
    # ... and they match the separate files: same key, same chain.
    key_end = bundle.index(b"-----END PRIVATE KEY-----\n") + len(b"-----END PRIVATE KEY-----\n")
    assert public_pem(bundle[:key_end]) == public_pem((target / "tls.key").read_bytes())
    assert bundle[key_end:] == (target / "tls.crt").read_bytes()
    leaf = x509.load_pem_x509_certificates(bundle[key_end:])[0]
    assert leaf.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == public_pem(bundle[:key_end])
    assert "OK" in openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.pem"))


def test_credential_bundle_holds_the_key_then_the_chain(agent: RunningAgent) -> None:
    pod = agent.pod("app-0")
    target = agent.publish(pod, ATTRS, fs_group=2000)
    check_bundle(target)
    info = os.stat(target / "tls.pem")
    assert info.st_mode & 0o777 == 0o440  # like tls.key: never world-readable
    if IS_ROOT:
        assert info.st_gid == 2000
    # A renewal swaps a new key and certificate into the one file together.
    before = (target / "tls.pem").read_bytes()
    agent.agent.manager.renew(pod.volume_id)
    assert (target / "tls.pem").read_bytes() != before
    check_bundle(target)


def test_credential_bundle_name_must_be_its_own(agent: RunningAgent) -> None:
    pod = agent.pod("app-1")
    attrs = {**ATTRS, CM + "credential-bundle-file": "tls.crt"}
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, attrs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert CM + "credential-bundle-file" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, {**ATTRS, CM + "credential-bundle-file": "../tls.pem"})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
