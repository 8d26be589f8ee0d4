"""/metrics carries no `*_created` samples: one series per counter and histogram child, not two."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from tests.conftest import RunningAgent


def scrape(agent: RunningAgent, accept: str) -> str:
    request = urllib.request.Request(agent.metrics_url + "/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.parametrize(
    "accept", ["text/plain", "application/openmetrics-text; version=1.0.0; charset=utf-8"]
)
def test_no_created_samples_on_the_real_endpoint(agent: RunningAgent, accept: str) -> None:
    # Exercise every counter and histogram first: a success, a failure, a gRPC error.
    agent.publish(agent.pod("web-0"), {"csi.cert-agent.io/dns-names": "web-0.default.svc"})
    with pytest.raises(grpc.RpcError):
        agent.client.publish(agent.pod("bad").request({"csi.cert-agent.io/dns-names": "a_b"}))
    text = scrape(agent, accept)
    assert "cert_agent_issue_attempts_total{" in text
    assert "cert_agent_grpc_request_duration_seconds_bucket{" in text
    created = [line for line in text.splitlines() if "_created" in line]
    assert created == []
