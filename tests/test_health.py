"""Health endpoints agree with the CSI Probe, and no secret ever reaches the agent's log."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from agent.csi import csi_pb2, csi_pb2_grpc
from tests.conftest import REPO, AgentProcess, RunningAgent, kubelet_target


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class BrokenCA:
    """An issuer whose CA cannot sign (expired, or its Secret is invalid)."""

    name = "local"

    def issue(self, request: object, timeout_seconds: float) -> object:
        raise AssertionError("not called")

    def ready(self) -> tuple[bool, str]:
        return False, "the local CA expired at 2026-01-01T00:00:00Z"


def test_readyz_and_probe_agree(agent: RunningAgent) -> None:
    identity = csi_pb2_grpc.IdentityStub(agent.client.channel)
    assert http_get(agent.metrics_url + "/healthz")[0] == 200
    assert http_get(agent.metrics_url + "/readyz")[0] == 200
    assert identity.Probe(csi_pb2.ProbeRequest()).ready.value is True

    real = agent.agent.issuers.local
    agent.agent.issuers.local = BrokenCA()  # type: ignore[assignment]
    try:
        status, body = http_get(agent.metrics_url + "/readyz")
        assert status == 503 and "local CA expired" in body
        with pytest.raises(grpc.RpcError) as info:
            identity.Probe(csi_pb2.ProbeRequest())
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "local CA expired" in (info.value.details() or "")
        assert http_get(agent.metrics_url + "/healthz")[0] == 200  # alive, just not ready
    finally:
        agent.agent.issuers.local = real
    assert http_get(agent.metrics_url + "/readyz")[0] == 200


def test_no_key_material_reaches_the_log_at_debug_level(
    agent_process: object, tmp_path: Path
) -> None:
    agent: AgentProcess = agent_process("--log-level", "debug")  # type: ignore[operator]
    target = kubelet_target(tmp_path / "kubelet", "app")
    args = ["publish", "--endpoint", agent.endpoint, "--target", str(target)]
    args += ["--attr", "dns-names=app.default.svc", "--attr", "duration=3s"]
    args += ["--attr", "renew-before=2s", "--attr", "pkcs12-enable=true"]
    args += ["--attr", "pkcs12-password=hunter2-not-in-logs"]
    subprocess.run([sys.executable, "-m", "agent.cli", *args], check=True, cwd=REPO)
    # A bad publish too: error paths log the request.
    bad = [
        "publish",
        "--endpoint",
        agent.endpoint,
        "--target",
        str(kubelet_target(tmp_path / "kubelet", "bad")),
    ]
    bad += ["--attr", "dns-names=bad_name", "--attr", "pkcs12-password=hunter2-not-in-logs"]
    subprocess.run([sys.executable, "-m", "agent.cli", *bad], check=False, cwd=REPO)
    first_key = (target / "tls.key").read_bytes()
    deadline = time.monotonic() + 10
    while (target / "tls.key").read_bytes() == first_key and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (target / "tls.key").read_bytes() != first_key, "no renewal happened"
    log = agent.stop()

    assert '"renewed certificate"' in log and '"level": "debug"' in log
    assert "PRIVATE KEY" not in log
    assert "hunter2-not-in-logs" not in log
    ca_key = (tmp_path / "data" / "ca" / "ca.key").read_text()
    for key_text in (ca_key, first_key.decode(), (target / "tls.key").read_text()):
        body = [line for line in key_text.splitlines() if "-----" not in line]
        assert body and not any(line in log for line in body)


def test_grpc_calls_are_counted_by_method_and_code(agent: RunningAgent) -> None:
    pod = agent.pod("web-0")
    agent.publish(pod, {"csi.cert-agent.io/dns-names": "web-0.default.svc"})
    with pytest.raises(grpc.RpcError):
        agent.client.publish(agent.pod("bad").request({"csi.cert-agent.io/dns-names": "a_b"}))
    status, metrics = http_get(agent.metrics_url + "/metrics")
    assert status == 200
    lines = metrics.splitlines()
    assert 'cert_agent_grpc_requests_total{code="OK",method="NodePublishVolume"} 1.0' in lines
    assert (
        'cert_agent_grpc_requests_total{code="INVALID_ARGUMENT",method="NodePublishVolume"} 1.0'
        in lines
    )
    assert 'cert_agent_issue_attempts_total{issuer="local",operation="issue"} 1.0' in lines
    assert any(
        line.startswith(
            'cert_agent_grpc_request_duration_seconds_count{method="NodePublishVolume"}'
        )
        and line.endswith(" 2.0")
        for line in lines
    )
    assert "cert_agent_managed_volumes 1.0" in lines
    assert any(line.startswith("cert_agent_ca_expiry_timestamp_seconds ") for line in lines)
