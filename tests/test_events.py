"""Kubernetes Events on the pod: shape, aggregation into series, rate limits, best effort.

The recorder talks through the agent's REST client to tests.fakekube, which validates every
Event against the events.k8s.io/v1 schema and the API server's own create/update rules. Clocks are
injected; the writer is driven with ``drain()`` so nothing waits on wall time.
"""

from __future__ import annotations

import collections
import random
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.kube.client import KubeSettings, make_api_client
from agent.kube.events import FINISH_SECONDS, NOTE_LIMIT_BYTES, EventRecorder, micro_time
from agent.kube.volume_events import KubeVolumeEvents
from agent.volumes.scheduler import backoff_delay
from tests.conftest import RunningAgent
from tests.fakekube import EVENTS, ApiError, FakeKube, FakeSigner

MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    uid: str


class Clock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api(fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    client = make_api_client(KubeSettings(kubeconfig=str(kubeconfig), qps=1000, burst=1000))
    yield client
    client.close()


def recorder(api: Any, clock: Clock, **kwargs: Any) -> EventRecorder:
    return EventRecorder(
        api, controller="csi.cert-agent.io", instance="node-1", clock=clock, **kwargs
    )


def writes(fake: FakeKube) -> list[str]:
    return [r.method for r in fake.requests if "/apis/events.k8s.io/" in r.path]


POD = Pod("es-0", "elastic", "0b7c3f8e-2a4d-4f5e-9c1a-7d2e6f8a9b0c")


def test_an_event_has_the_shape_the_api_server_requires(api: Any, fake: FakeKube) -> None:
    clock = Clock()
    rec = recorder(api, clock)
    KubeVolumeEvents(rec).issue_failed(
        POD, "INVALID_ARGUMENT", 'csi.cert-agent.io/dns-names: "a_b" is not a valid DNS name'
    )
    rec.drain()
    assert rec.stats.failed == 0, rec.stats.last_error
    (event,) = fake.list_events("elastic")
    assert event["regarding"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "es-0",
        "namespace": "elastic",
        "uid": POD.uid,
    }
    assert event["reportingController"] == "csi.cert-agent.io"
    assert event["reportingInstance"] == "node-1"
    assert (event["type"], event["reason"], event["action"]) == ("Warning", "IssueFailed", "Issue")
    assert event["note"] == (
        'InvalidArgument: csi.cert-agent.io/dns-names: "a_b" is not a valid DNS name'
    )
    assert event["eventTime"] == micro_time(clock.now)
    assert MICRO_TIME.fullmatch(event["eventTime"])
    assert event["metadata"]["name"].startswith("es-0.")
    assert "series" not in event


def test_a_long_note_is_cut_to_the_servers_limit(api: Any, fake: FakeKube) -> None:
    rec = recorder(api, Clock())
    KubeVolumeEvents(rec).policy_denied(POD, "ü" * 3000)  # 6,000 bytes of UTF-8
    rec.drain()
    (event,) = fake.list_events("elastic")
    assert len(event["note"].encode()) <= NOTE_LIMIT_BYTES
    assert event["note"].endswith("[truncated]")
    assert event["reason"] == "PolicyDenied"


def test_the_fake_rejects_what_the_real_api_server_rejects(fake: FakeKube) -> None:
    """The fake's Event validation can fail: the rules the recorder's tests rely on."""
    good = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "es-0.1"},
        "eventTime": "2027-01-15T08:00:00.000000Z",
        "reportingController": "csi.cert-agent.io",
        "reportingInstance": "node-1",
        "action": "Issue",
        "reason": "IssueFailed",
        "type": "Warning",
        "note": "x",
        "regarding": {"apiVersion": "v1", "kind": "Pod", "name": "es-0", "namespace": "elastic"},
    }
    problems = {
        "eventTime": {"eventTime": None},
        "reportingController": {"reportingController": ""},
        "reportingInstance": {"reportingInstance": ""},
        "action": {"action": ""},
        "reason": {"reason": "R" * 129},
        "type": {"type": "Error"},
        "note": {"note": "n" * (NOTE_LIMIT_BYTES + 1)},
        "series.count": {"series": {"count": 1, "lastObservedTime": good["eventTime"]}},
        "regarding.namespace": {"regarding": {**good["regarding"], "namespace": "other"}},
        "unknown field": {"mesage": "typo"},
    }
    for field_name, change in problems.items():
        body = {**good, **change}
        body = {k: v for k, v in body.items() if v is not None}
        with pytest.raises(ApiError) as info:
            fake.create(EVENTS, "elastic", body)
        assert info.value.code == 422, field_name
    created = fake.create(EVENTS, "elastic", good)
    with pytest.raises(ApiError) as info:  # the note is immutable
        fake.update(EVENTS, "elastic", {**created, "note": "changed"})
    assert info.value.code == 422
    fake.update(
        EVENTS,
        "elastic",
        {**created, "series": {"count": 2, "lastObservedTime": "2027-01-15T08:01:00.000000Z"}},
    )


def test_a_thousand_failed_renewals_of_one_volume_make_one_event_with_a_count(
    api: Any, fake: FakeKube
) -> None:
    clock = Clock()
    start = clock.now
    rec = recorder(api, clock)
    events = KubeVolumeEvents(rec)
    rng = random.Random(7)
    for attempt in range(1, 1001):
        events.renewal_failed(POD, "Kubernetes API unreachable", attempt)
        rec.drain()
        clock.now += backoff_delay(attempt, rng)  # the scheduler's real backoff steps
    elapsed = clock.now - start

    (event,) = fake.list_events("elastic")  # one object: every repeat joined its series
    assert event["reason"] == "RenewalFailed"
    assert writes(fake).count("POST") == 1
    # Per object: a burst of 25, then one per 5 minutes: at most one write per backoff step.
    patches = writes(fake).count("PATCH")
    assert patches <= 25 + elapsed / 300 + 1
    assert patches >= elapsed / 300 - 1  # the capped 5-minute steps each got through
    assert rec.stats.limited > 0
    assert event["series"]["count"] >= 1000 - 1  # the last may wait for its token
    rec.flush()
    rec.drain()
    (event,) = fake.list_events("elastic")
    assert event["series"]["count"] == 1000
    assert event["series"]["lastObservedTime"] == micro_time(clock.now - backoff_delay_last(rng))


def backoff_delay_last(rng: random.Random) -> float:
    """The loop's last clock step (replayed from the same seed)."""
    replay = random.Random(7)
    delay = 0.0
    for attempt in range(1, 1001):
        delay = backoff_delay(attempt, replay)
    return delay


def test_a_storm_across_a_thousand_pods_is_bounded_per_agent(api: Any, fake: FakeKube) -> None:
    clock = Clock()
    results: collections.Counter[str] = collections.Counter()
    rec = recorder(
        api, clock, agent_burst=50, agent_qps=1.0, on_result=lambda r: results.update([r])
    )
    events = KubeVolumeEvents(rec)
    pods = [Pod(f"web-{i}", "web", f"uid-{i}") for i in range(1000)]
    for pod in pods:
        events.renewal_failed(pod, "the issuer is down", 1)
    rec.drain()
    assert len(fake.list_events("web")) == 50  # the burst, then nothing in the same instant
    assert rec.stats.limited == 950

    clock.now += 10  # ten more tokens
    for pod in pods:
        events.renewal_failed(pod, "the issuer is down", 2)
    rec.drain()
    total = len(writes(fake))
    assert total == 60
    assert rec.stats.failed == 0
    # What /metrics counts (cert_agent_events_total{result}): every decision, once.
    assert results == {"written": 60, "limited": 950 + 990}


def test_recording_never_blocks_on_a_full_queue(api: Any, fake: FakeKube) -> None:
    clock = Clock()
    rec = recorder(api, clock, queue_size=3)  # no writer running: the queue fills up
    events = KubeVolumeEvents(rec)
    for i in range(20):
        events.issue_failed(Pod(f"p-{i}", "web", f"u-{i}"), "INTERNAL", "boom")
    assert rec.stats.dropped == 17
    rec.drain()
    assert len(fake.list_events("web")) == 3
    rec.flush()  # the dropped ones are still pending: written once there is room
    rec.drain()
    assert len(fake.list_events("web")) == 6


def test_a_failed_write_is_swallowed_and_counted(api: Any, fake: FakeKube) -> None:
    fake.forbid("create", "events")
    rec = recorder(api, Clock())
    KubeVolumeEvents(rec).issue_failed(POD, "INTERNAL", "boom")
    rec.drain()
    assert rec.stats.failed == 1
    assert "forbidden" in rec.stats.last_error.lower()
    assert fake.list_events() == []


def test_a_series_ends_after_quiet_time_and_a_deleted_event_is_recreated(
    api: Any, fake: FakeKube
) -> None:
    clock = Clock()
    rec = recorder(api, clock)
    events = KubeVolumeEvents(rec)
    events.renewal_failed(POD, "down", 1)
    events.renewal_failed(POD, "down", 2)
    rec.drain()
    (first,) = fake.list_events("elastic")
    assert first["series"]["count"] == 2

    clock.now += FINISH_SECONDS + 1
    events.renewal_failed(POD, "down again", 1)
    rec.drain()
    names = {e["metadata"]["name"] for e in fake.list_events("elastic")}
    assert len(names) == 2  # a new series, a new Event

    # The API server dropped the Event (TTL): the next patch finds nothing and re-creates it.
    (second,) = [
        e for e in fake.list_events("elastic") if e["metadata"]["name"] != first["metadata"]["name"]
    ]
    fake.delete(EVENTS, "elastic", second["metadata"]["name"])
    events.renewal_failed(POD, "down again", 2)
    rec.drain()
    recreated = [
        e
        for e in fake.list_events("elastic")
        if e["metadata"]["name"] == second["metadata"]["name"]
    ]
    assert recreated[0]["series"]["count"] == 2
    assert rec.stats.failed == 0


# ------------------------------------------------------------------ the real agent, cluster mode

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
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    return agent_factory(  # type: ignore[no-any-return]
        standalone=False,
        kubeconfig=str(kubeconfig),
        issue_timeout_seconds=2.0,
        **local_ca_files(tmp_path),
    )


def local_ca_files(tmp_path: Path) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization

    from tests.fakekube import make_test_ca, pem

    key, cert = make_test_ca("local CA")
    (tmp_path / "ca.crt").write_bytes(pem(cert))
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"ca_cert_file": tmp_path / "ca.crt", "ca_key_file": tmp_path / "ca.key"}


def events_with(fake: FakeKube, reason: str) -> list[dict[str, Any]]:
    return [e for e in fake.list_events() if e["reason"] == reason]


def test_a_failed_first_issue_puts_the_grpc_message_on_the_pod(
    cluster_agent: RunningAgent, fake: FakeKube, signer: FakeSigner
) -> None:
    signer.mode = "fail"
    pod = cluster_agent.pod("es-0", namespace="elastic")
    with pytest.raises(grpc.RpcError) as info:
        cluster_agent.client.publish(pod.request(SEED))
    fake.wait_until(lambda: bool(events_with(fake, "IssueFailed")))
    (event,) = events_with(fake, "IssueFailed")
    assert event["note"] == f"Internal: {info.value.details()}"
    assert event["regarding"]["uid"] == pod.uid
    assert event["metadata"]["namespace"] == "elastic"
    assert event["reportingInstance"] == "node-1"
    assert cluster_agent.agent.events.wait_idle()
    with urllib.request.urlopen(cluster_agent.metrics_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'cert_agent_events_total{result="written"} 1.0' in text
    assert 'cert_agent_events_total{result="dropped"} 0.0' in text


def test_a_denied_request_is_a_policy_denial_on_the_pod(
    cluster_agent: RunningAgent, fake: FakeKube, signer: FakeSigner
) -> None:
    signer.mode = "deny"
    pod = cluster_agent.pod("es-1", namespace="elastic")
    with pytest.raises(grpc.RpcError) as info:
        cluster_agent.client.publish(pod.request(SEED))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    fake.wait_until(lambda: bool(events_with(fake, "PolicyDenied")))
    (event,) = events_with(fake, "PolicyDenied")
    assert event["note"] == f"PermissionDenied: {info.value.details()}"
    assert events_with(fake, "IssueFailed") == []


def test_failing_renewals_inside_the_window_then_recovery(
    cluster_agent: RunningAgent, fake: FakeKube, signer: FakeSigner
) -> None:
    pod = cluster_agent.pod("es-2", namespace="elastic")
    # Renew-before is the whole lifetime but a second: the window opens a second after issue,
    # and renewal is due at once.
    attributes = {
        **SEED,
        "csi.cert-manager.io/duration": "1h",
        "csi.cert-manager.io/renew-before": "3599s",
    }
    cluster_agent.publish(pod, attributes)
    signer.mode = "fail"
    fake.wait_until(lambda: bool(events_with(fake, "CertificateExpiring")), timeout=30)
    (failed,) = events_with(fake, "RenewalFailed")
    assert failed["type"] == "Warning" and failed["action"] == "Renew"
    assert "current certificate stays in place" in failed["note"]
    (expiring,) = events_with(fake, "CertificateExpiring")
    assert "renew-before window" in expiring["note"]
    assert (pod.target / "tls.crt").exists()  # the old certificate stays

    signer.mode = "issue"
    fake.wait_until(lambda: bool(events_with(fake, "RenewalRecovered")), timeout=30)
    (recovered,) = events_with(fake, "RenewalRecovered")
    assert recovered["type"] == "Normal"
    assert "certificate renewed after" in recovered["note"]
    # Every Event the agent wrote passed the fake's validation; none was refused.
    assert cluster_agent.agent.events.stats.failed == 0


def test_standalone_mode_writes_no_events(agent: RunningAgent) -> None:
    from agent.volumes.events import NoEvents

    assert agent.agent.events is None
    assert isinstance(agent.agent.manager.events, NoEvents)
    pod = agent.pod("solo")
    with pytest.raises(grpc.RpcError):
        agent.publish(pod, {"csi.cert-agent.io/dns-names": "bad_name"})


def test_a_denial_by_the_issuance_policy_is_a_policy_denial_on_the_pod(
    node_agent: Any, fake: FakeKube
) -> None:
    """The agent's own policy engine (--policy; here the built-in default, which allows only
    names under the pod's namespace) raises PERMISSION_DENIED: the manager turns it into a
    PolicyDenied Event with the message kubelet gets, whatever rule said no."""
    agent = node_agent(policy_file=None)
    pod = agent.pod("web-0", namespace="web")
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, {"csi.cert-agent.io/dns-names": "www.example.com"})
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    fake.wait_until(lambda: bool(events_with(fake, "PolicyDenied")))
    (event,) = events_with(fake, "PolicyDenied")
    assert event["note"] == f"PermissionDenied: {info.value.details()}"
    assert "www.example.com" in event["note"]
    assert event["regarding"]["uid"] == pod.uid
    assert events_with(fake, "IssueFailed") == []
