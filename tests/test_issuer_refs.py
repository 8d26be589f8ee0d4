"""Issuer references read as `ClusterIssuer ca (cert-manager.io)` in messages, logs and the
metrics' issuer label, never `ClusterIssuer/ca.cert-manager.io` (which reads like a host name)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.spec.model import IssuerRef
from tests.conftest import RunningAgent
from tests.fakekube import FakeKube, FakeSigner
from tests.test_cluster_mode import CA_SECRET, SEED_ATTRIBUTES, ca_secret_data

SEED_LABEL = 'issuer="ClusterIssuer ca-cluster-issuer (cert-manager.io)"'


def metrics(agent: RunningAgent) -> str:
    with urllib.request.urlopen(agent.metrics_url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_describe() -> None:
    assert IssuerRef("ca", "Issuer", "cert-manager.io").describe() == "Issuer ca (cert-manager.io)"
    assert IssuerRef("vault", "VaultIssuer", "example.com").describe() == (
        "VaultIssuer vault (example.com)"
    )
    assert IssuerRef().describe() == "local"


def test_standalone_refusal_names_the_issuer_readably(agent: RunningAgent) -> None:
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(agent.pod("es-0"), SEED_ATTRIBUTES)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert "issuer ClusterIssuer ca-cluster-issuer (cert-manager.io) is a cert-manager" in details
    assert "/ca-cluster-issuer." not in details


@pytest.fixture
def start_cluster_agent(
    fake: FakeKube, signer: FakeSigner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake.put_secret(*CA_SECRET, ca_secret_data("issuer refs CA")[0])
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    started: list[RunningAgent] = []

    def start() -> RunningAgent:
        running = RunningAgent(
            tmp_path, standalone=False, kubeconfig=str(kubeconfig), ca_secret=CA_SECRET
        )
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
    from tests.conftest import unmount_below

    unmount_below(tmp_path)


def test_metrics_label_and_recovered_metadata_use_the_readable_form(
    start_cluster_agent: Any,
) -> None:
    agent: RunningAgent = start_cluster_agent()
    pod = agent.pod("es-0", namespace="elastic")
    agent.publish(pod, SEED_ATTRIBUTES)
    series = [line for line in metrics(agent).splitlines() if SEED_LABEL in line]
    assert any(s.startswith("cert_agent_certificate_expiry_timestamp_seconds{") for s in series)
    assert "cert-manager.io" not in metrics(agent).replace(SEED_LABEL, "")
    agent.stop()

    # A volume recorded by an older agent, with the old spelling, is relabelled on start.
    meta_path = agent.config.data_root / "volumes" / pod.volume_id / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["issuer"] == "ClusterIssuer ca-cluster-issuer (cert-manager.io)"
    meta["issuer"] = "ClusterIssuer/ca-cluster-issuer.cert-manager.io"
    assert meta.pop("recovery_hint")  # older agents wrote none: recovery parses the attributes
    meta_path.write_text(json.dumps(meta))
    restarted: RunningAgent = start_cluster_agent()
    text = metrics(restarted)
    assert "ca-cluster-issuer.cert-manager.io" not in text
    assert any(SEED_LABEL in line for line in text.splitlines())
    assert json.loads(meta_path.read_text())["issuer"] == (
        "ClusterIssuer ca-cluster-issuer (cert-manager.io)"
    )
