"""`cert-agent status` against a real agent with volumes in every state.

Cluster mode against the fake API server: a ready local-CA volume (with a PKCS#12 keystore and
its password), a ready cert-manager volume, one whose first issue is still pending (issuing), and
one whose renewals fail (backing off, past its renewal time). The CLI runs as a real process and
reads the agent's real status socket.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from agent.observe.status_socket import STATUS_SOCKET
from agent.status_view import duration
from agent.volumes.status import openssl_serial
from tests.conftest import REPO, RunningAgent, openssl
from tests.fakekube import FakeKube, FakeSigner, make_test_ca, pem

PASSWORD = "Pkcs12-S3cret-Passw0rd"
SEED = {
    "csi.cert-manager.io/issuer-name": "ca-cluster-issuer",
    "csi.cert-manager.io/issuer-kind": "ClusterIssuer",
    "csi.cert-manager.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
}


@pytest.fixture
def cluster_agent(
    fake: FakeKube,
    signer: FakeSigner,
    tmp_path: Path,
    agent_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> RunningAgent:
    from cryptography.hazmat.primitives import serialization

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    key, cert = make_test_ca("local CA")
    (tmp_path / "ca.crt").write_bytes(pem(cert))
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return agent_factory(  # type: ignore[no-any-return]
        standalone=False,
        kubeconfig=str(fake.write_kubeconfig(tmp_path / "kubeconfig")),
        ca_cert_file=tmp_path / "ca.crt",
        ca_key_file=tmp_path / "ca.key",
        issue_timeout_seconds=1.0,
    )


def status(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "CERT_AGENT_DATA_ROOT": str(agent.config.data_root)},
        timeout=60,
        check=False,
    )


@pytest.fixture
def volumes(cluster_agent: RunningAgent, fake: FakeKube, signer: FakeSigner) -> dict[str, Any]:
    agent = cluster_agent
    ready = agent.pod("app-0", namespace="web")
    agent.publish(
        ready,
        {
            "csi.cert-agent.io/dns-names": "app-0.web.svc",
            "csi.cert-agent.io/pkcs12-enable": "true",
            "csi.cert-agent.io/pkcs12-password": PASSWORD,
        },
    )
    managed = agent.pod("es-0", namespace="elastic")
    agent.publish(managed, {**SEED, "csi.cert-manager.io/key-algorithm": "ECDSA"})

    pending = agent.pod("es-pending", namespace="elastic")
    with pytest.raises(grpc.RpcError) as info:  # an issuer nobody serves: stays pending
        agent.publish(pending, {**SEED, "csi.cert-manager.io/issuer-name": "missing"})
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    failing = agent.pod("es-1", namespace="elastic")
    # Renew-before is the whole lifetime but a second: due at once, and it keeps failing.
    agent.publish(
        failing,
        {
            **SEED,
            "csi.cert-manager.io/duration": "1h",
            "csi.cert-manager.io/renew-before": "3599s",
        },
    )
    signer.mode = "fail"
    fake.wait_until(
        lambda: any(e["reason"] == "RenewalFailed" for e in fake.list_events("elastic")),
        timeout=30,
    )
    return {"ready": ready, "managed": managed, "pending": pending, "failing": failing}


def test_status_shows_every_state_sorted_by_time_left(
    cluster_agent: RunningAgent, volumes: dict[str, Any]
) -> None:
    result = status(cluster_agent, "--json")
    assert result.returncode == 1, result.stderr  # es-1 is past its renewal time
    document = json.loads(result.stdout)
    assert document["node"] == "node-1"
    by_pod = {v["pod"]: v for v in document["volumes"]}
    assert [v["pod"] for v in document["volumes"]][:2] == ["es-pending", "es-1"]

    pending = by_pod["es-pending"]
    assert pending["state"] == "issuing"
    assert pending["serial"] == "" and pending["not_after"] is None
    assert pending["consecutive_failures"] == 1
    assert "is not ready after 1s" in pending["last_error"]
    assert pending["past_renewal"] is False

    failing = by_pod["es-1"]
    assert failing["state"] == "backoff"
    assert failing["consecutive_failures"] >= 1
    assert "the CA key pair is not usable" in failing["last_error"]
    assert failing["past_renewal"] is True
    assert "ClusterIssuer" in failing["issuer"] and "ca-cluster-issuer" in failing["issuer"]
    assert failing["next_renewal"] >= failing["renewal_time"]  # the retry, after backoff

    for name, key_type in (("app-0", "RSA 2048"), ("es-0", "ECDSA P-256")):
        entry = by_pod[name]
        pod = volumes["ready" if name == "app-0" else "managed"]
        cert_path = pod.target / "tls.crt"
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert entry["state"] == "ready"
        assert entry["key_type"] == key_type
        assert entry["consecutive_failures"] == 0 and entry["last_error"] == ""
        assert entry["not_after"] == cert.not_valid_after_utc.timestamp()
        # The serial exactly as openssl prints it, so an operator can grep for it.
        printed = openssl("x509", "-noout", "-serial", "-in", str(cert_path)).strip()
        assert f"serial={entry['serial']}" == printed
        assert entry["past_renewal"] is False
    assert by_pod["app-0"]["issuer"] == "local"

    table = status(cluster_agent)
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAMESPACE", "POD", "ISSUER", "KEY"]
    assert [line.split()[1] for line in lines[1:]][:2] == ["es-pending", "es-1"]
    failing_line = next(line for line in lines if " es-1 " in line)
    assert "backoff" in failing_line and "(overdue" in failing_line
    assert "not usable" in failing_line
    ready_line = next(line for line in lines if " app-0 " in line)
    assert by_pod["app-0"]["serial"] in ready_line and "ready" in ready_line


def test_filters_and_the_exit_code_follow_what_is_shown(
    cluster_agent: RunningAgent, volumes: dict[str, Any]
) -> None:
    only_ready = status(cluster_agent, "--pod", "app-0", "--json")
    assert only_ready.returncode == 0
    assert [v["pod"] for v in json.loads(only_ready.stdout)["volumes"]] == ["app-0"]

    elastic = status(cluster_agent, "--namespace", "elastic", "--json")
    assert elastic.returncode == 1
    pods = sorted(v["pod"] for v in json.loads(elastic.stdout)["volumes"])
    assert pods == ["es-0", "es-1", "es-pending"]

    nothing = status(cluster_agent, "--namespace", "nowhere")
    assert nothing.returncode == 0
    assert nothing.stdout.splitlines()[1:] == []


def test_status_never_shows_keys_or_keystore_passwords(
    cluster_agent: RunningAgent, volumes: dict[str, Any]
) -> None:
    ready = volumes["ready"]
    key_lines = [
        line
        for line in (ready.target / "tls.key").read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    keystore = (ready.target / "keystore.p12").read_bytes()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(cluster_agent.config.data_root / STATUS_SOCKET))
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    outputs = [raw.decode(), status(cluster_agent).stdout, status(cluster_agent, "--json").stdout]
    for text in outputs:
        assert PASSWORD not in text
        assert "PRIVATE KEY" not in text
        assert not any(line in text for line in key_lines)
        assert keystore.hex() not in text
        assert "pkcs12" not in text.lower()  # not even the attribute names
    # The password really is in the agent's metadata: the test would see a leak.
    meta = (cluster_agent.config.data_root / "volumes" / ready.volume_id / "meta.json").read_text()
    assert PASSWORD in meta


def test_the_status_socket_is_private_and_read_only(cluster_agent: RunningAgent) -> None:
    path = cluster_agent.config.data_root / STATUS_SOCKET
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(b"DELETE /volumes HTTP/1.1\r\n\r\n")  # ignored: the server never reads
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert json.loads(answer)["volumes"] == []


def test_an_unreachable_agent_is_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--data-root", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert str(tmp_path / STATUS_SOCKET) in result.stderr


def test_serials_and_durations_print_as_operators_expect() -> None:
    assert openssl_serial("abc") == "0ABC"
    assert openssl_serial("1f") == "1F"
    assert openssl_serial(None) == ""
    assert duration(90 * 86400 + 3 * 3600 + 59) == "90d 3h"
    assert duration(3 * 3600 + 120) == "3h 02m"
    assert duration(-65) == "-1m 05s"


def test_every_state_from_the_metadata_and_the_failure_count() -> None:
    """The state logic on its own, with a fixed now: renewing and expired need hours to reach
    for real, so they are checked here (the agent tests above cover the others end to end)."""
    from agent.volumes.manager import RenewalFailures
    from agent.volumes.status import volume_status
    from agent.volumes.store import VolumeMeta, VolumeState

    now = 1_900_000_000.0

    def meta(state: VolumeState, not_after: float | None, renewal: float | None) -> VolumeMeta:
        return VolumeMeta(
            volume_id="csi-1",
            target_path="/t",
            volume_context={
                "csi.storage.k8s.io/pod.name": "p",
                "csi.storage.k8s.io/pod.namespace": "n",
                "csi.storage.k8s.io/pod.uid": "0b7c3f8e-2a4d-4f5e-9c1a-7d2e6f8a9b0c",
                "csi.storage.k8s.io/serviceAccount.name": "default",
                "csi.storage.k8s.io/ephemeral": "true",
                "csi.cert-agent.io/dns-names": "p.n.svc",
                "csi.cert-agent.io/key-algorithm": "Ed25519",
            },
            readonly=True,
            volume_mount_group=None,
            node_id="node-1",
            state=state,
            serial="0a" if not_after else None,
            not_before=None if not_after is None else not_after - 3000,
            not_after=not_after,
            next_renewal=renewal,
        )

    failing = RenewalFailures(3, "issuer down", now - 5)
    cases = [
        (meta(VolumeState.ISSUING, None, None), None, None, "issuing", False),
        (meta(VolumeState.READY, now + 3000, now + 1000), None, None, "ready", False),
        (meta(VolumeState.READY, now + 3000, now - 10), None, None, "renewing", True),
        (meta(VolumeState.READY, now + 3000, now - 10), failing, now + 40, "backoff", True),
        (meta(VolumeState.READY, now - 1, now - 1000), failing, now + 40, "expired", True),
    ]
    for volume, failures, retry, state, past in cases:
        entry = volume_status(volume, failures, retry, now)
        assert (entry["state"], entry["past_renewal"]) == (state, past), state
        assert entry["key_type"] == "Ed25519"
        assert (entry["pod"], entry["namespace"]) == ("p", "n")
    backoff = volume_status(cases[3][0], failing, now + 40, now)
    assert backoff["next_renewal"] == now + 40 and backoff["renewal_time"] == now - 10
    assert (backoff["consecutive_failures"], backoff["last_error"]) == (3, "issuer down")
    assert backoff["serial"] == "0A"


def test_the_status_socket_needs_a_private_directory_and_leaves_the_umask_alone(
    tmp_path: Path,
) -> None:
    from agent.observe.status_socket import StatusServer

    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(OSError, match="open to other users"):
        StatusServer(open_dir / STATUS_SOCKET, lambda: {}).start()
    assert not (open_dir / STATUS_SOCKET).exists()

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    before = os.umask(0o022)
    os.umask(before)
    server = StatusServer(private / STATUS_SOCKET, lambda: {})
    server.start()
    try:
        assert stat.S_IMODE(os.stat(private / STATUS_SOCKET).st_mode) == 0o600
        after = os.umask(before)
        assert after == before  # the process-wide umask was never touched
    finally:
        server.stop()
