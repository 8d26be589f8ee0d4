"""Short lifetimes and renew-before that does not fit: no renewal loop, whatever the inputs."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.volumes.store import VolumeState
from tests.conftest import RunningAgent
from tests.test_health import http_get


def sample(agent: RunningAgent, name: str, **labels: str) -> float | None:
    _status, text = http_get(agent.metrics_url + "/metrics")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_renew_before_longer_than_the_capped_lifetime_renews_at_two_thirds(
    agent_factory: object,
) -> None:
    # The reproduction: --max-duration 1m and renew-before 2m renewed 660 times in 5 s,
    # because the due time was the certificate's notBefore. The lifetime granted is 60 s (the
    # duration is not given, so the issuer's maximum applies): renew at 2/3 of it.
    agent: RunningAgent = agent_factory(  # type: ignore[operator]
        max_duration_seconds=60, min_renewal_interval_seconds=30.0
    )
    pod = agent.pod("es-0")
    agent.publish(
        pod,
        {"csi.cert-agent.io/dns-names": "es-0.default.svc", "csi.cert-agent.io/renew-before": "2m"},
    )
    meta = agent.agent.store.load(pod.volume_id)
    assert meta is not None and meta.state == VolumeState.READY
    assert meta.not_before is not None and meta.not_after is not None
    assert meta.next_renewal is not None
    assert meta.not_after - meta.not_before == 60
    spread = 60 * 0.05
    assert meta.not_before + 40 - spread <= meta.next_renewal <= meta.not_before + 40
    assert agent.agent.scheduler.due_time(pod.volume_id) == meta.next_renewal
    assert sample(agent, "cert_agent_renew_before_ignored_total", issuer="local") == 1.0
    assert sample(agent, "cert_agent_issue_attempts_total", operation="renew") == 0.0


def test_duration_below_the_minimum_is_refused_naming_the_attribute(
    agent_factory: object,
) -> None:
    agent: RunningAgent = agent_factory(min_duration_seconds=3600)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(
            agent.pod("app"),
            {
                "csi.cert-manager.io/dns-names": "app.default.svc",
                "csi.cert-manager.io/duration": "1s",
            },
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith("csi.cert-manager.io/duration: 1s is shorter than")
    assert "minimum certificate lifetime of 1h (--min-duration)" in details
    assert agent.agent.store.count() == 0
    # The minimum itself is accepted.
    agent.publish(
        agent.pod("ok"),
        {"csi.cert-agent.io/dns-names": "ok.default.svc", "csi.cert-agent.io/duration": "1h"},
    )


def test_a_short_certificate_renews_no_more_often_than_the_floor(agent_factory: object) -> None:
    # A 1 s certificate (allowed here by a test-only --min-duration) is due again at once by its
    # own dates; the floor puts its next renewal min-renewal-interval after the issue.
    agent: RunningAgent = agent_factory(  # type: ignore[operator]
        min_duration_seconds=1, min_renewal_interval_seconds=30.0
    )
    pod = agent.pod("app")
    before = agent.agent.manager.clock()
    agent.publish(
        pod, {"csi.cert-agent.io/dns-names": "app.default.svc", "csi.cert-agent.io/duration": "1s"}
    )
    meta = agent.agent.store.load(pod.volume_id)
    assert meta is not None and meta.next_renewal is not None
    assert meta.next_renewal >= before + 30.0
