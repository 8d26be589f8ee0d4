"""${POD_IP}/${POD_IPS} SANs end to end: the real agent, its pod watch against the fake API server.

The pod exists in the fake API server without an IP when kubelet mounts the volume (as in a
cluster); the first certificate has no IP SAN. When the pod's status gets its IPs the agent
reissues through the renewal path. Waits are on the agent's own state (conditions), never
sleeps.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from tests.conftest import Pod, RunningAgent, openssl
from tests.fakekube import FakeKube

NAMESPACE = "apps"
ATTRS = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
    "csi.cert-agent.io/ip-sans": "${POD_IPS}",
}


def scheduled_pod(agent: RunningAgent, fake: FakeKube, name: str, node: str = "node-1") -> Pod:
    created = fake.put_pod(NAMESPACE, name, node)
    return agent.pod(name, namespace=NAMESPACE, uid=created["metadata"]["uid"])


def ip_sans(target: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


def serial(target: Path) -> int:
    return x509.load_pem_x509_certificate((target / "tls.crt").read_bytes()).serial_number


def eventually(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for agent state that has no condition to wait on (fails, never flakes, if slow)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def sample(agent: RunningAgent, name: str, labels: dict[str, str] | None = None) -> float | None:
    value = agent.agent.metrics.registry.get_sample_value(name, labels or {})
    return None if value is None else float(value)


def test_ip_sans_appear_once_the_pod_gets_its_ips(node_agent: Any, fake: FakeKube) -> None:
    agent = node_agent()
    pod = scheduled_pod(agent, fake, "web-0")
    target = agent.publish(pod, ATTRS)

    assert ip_sans(target) == []  # no IP yet: the first certificate goes without
    first = serial(target)
    tracker = agent.agent.manager.pod_ips
    assert tracker.waiting() == [pod.volume_id]
    assert sample(agent, "cert_agent_volumes_waiting_for_pod_ip") == 1

    fake.set_pod_ips(NAMESPACE, "web-0", ["10.4.0.7", "fd00:10:4::7"])
    assert tracker.wait_carried(pod.volume_id, 10)

    assert ip_sans(target) == ["10.4.0.7", "fd00:10:4::7"]
    assert serial(target) != first  # reissued, swapped in like a renewal
    assert "OK" in openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.crt"))
    modulus_key = openssl("pkey", "-in", str(target / "tls.key"), "-pubout")
    modulus_cert = openssl("x509", "-in", str(target / "tls.crt"), "-noout", "-pubkey")
    assert modulus_key == modulus_cert
    assert tracker.waiting() == []
    assert sample(agent, "cert_agent_volumes_waiting_for_pod_ip") == 0
    assert sample(agent, "cert_agent_pod_ip_san_latency_seconds_count") == 1
    # One watch for the node's pods, selected by node name, over all namespaces.
    (watch,) = fake.active_watches("/api/v1/pods")
    assert watch.query["fieldSelector"] == "spec.nodeName=node-1"


def test_pod_ip_takes_only_the_primary_address(node_agent: Any, fake: FakeKube) -> None:
    agent = node_agent()
    pod = scheduled_pod(agent, fake, "web-1")
    attrs = {**ATTRS, "csi.cert-agent.io/ip-sans": "127.0.0.1,${POD_IP}"}
    target = agent.publish(pod, attrs)
    assert ip_sans(target) == ["127.0.0.1"]
    fake.set_pod_ips(NAMESPACE, "web-1", ["fd00:10:4::9", "10.4.0.9"])
    assert agent.agent.manager.pod_ips.wait_carried(pod.volume_id, 10)
    assert ip_sans(target) == ["127.0.0.1", "fd00:10:4::9"]


def test_a_pod_without_ip_keeps_its_first_certificate(node_agent: Any, fake: FakeKube) -> None:
    agent = node_agent()
    waiting = scheduled_pod(agent, fake, "slow-0")
    target = agent.publish(waiting, ATTRS)
    first = (target / "tls.crt").read_bytes()
    # Another pod on the node gets its IP; the watch delivers it, nothing happens to slow-0.
    other = scheduled_pod(agent, fake, "fast-0")
    fake.set_pod_ips(NAMESPACE, "fast-0", ["10.4.0.8"])
    watch = agent.agent.manager.pod_ips.source
    assert watch is not None
    eventually(lambda: watch.ips(other.uid) == ("10.4.0.8",))
    assert watch.ips(waiting.uid) is None
    assert (target / "tls.crt").read_bytes() == first
    assert "OK" in openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.crt"))
    assert agent.agent.manager.pod_ips.waiting() == [waiting.volume_id]
    # A pod on another node is not in this node's watch at all.
    fake.put_pod(NAMESPACE, "elsewhere-0", "node-2")
    fake.set_pod_ips(NAMESPACE, "elsewhere-0", ["10.9.0.1"])
    assert all(
        "elsewhere" not in o["metadata"]["name"]
        for o in watch.informer.snapshot().values()  # type: ignore[attr-defined]
    )


def test_the_watch_survives_drops_and_410(node_agent: Any, fake: FakeKube) -> None:
    agent = node_agent(pod_watch="on")
    fake.wait_for_watch(1, "/api/v1/pods")
    pod = scheduled_pod(agent, fake, "web-2")
    target = agent.publish(pod, ATTRS)

    fake.cut_watches()  # an API server restart: watch again from the last version
    fake.wait_for_watch(2, "/api/v1/pods")
    fake.gone_next_watches(1, "/api/v1/pods")  # and that version is compacted away: 410, list again
    fake.cut_watches()
    fake.wait_until(lambda: fake.gone_pending == 0)
    watch = agent.agent.manager.pod_ips.source
    assert watch is not None
    eventually(lambda: watch.informer.relists >= 1)

    fake.set_pod_ips(NAMESPACE, "web-2", ["10.4.0.10"])
    assert agent.agent.manager.pod_ips.wait_carried(pod.volume_id, 10)
    assert ip_sans(target) == ["10.4.0.10"]
    lists = [r for r in fake.requests if r.path == "/api/v1/pods" and r.query.get("watch") is None]
    assert len(lists) >= 2 and all(
        r.query["fieldSelector"] == "spec.nodeName=node-1" for r in lists
    )


def test_a_pod_that_already_has_its_ip_gets_it_in_the_first_certificate(
    node_agent: Any, fake: FakeKube
) -> None:
    agent = node_agent()
    pod = scheduled_pod(agent, fake, "late-0")
    fake.set_pod_ips(NAMESPACE, "late-0", ["10.4.0.11"])  # e.g. a volume remounted later
    target = agent.publish(pod, ATTRS)
    assert ip_sans(target) == ["10.4.0.11"]
    assert agent.agent.manager.pod_ips.waiting() == []


def test_missing_rbac_is_a_clear_publish_error_naming_the_verb(
    node_agent: Any, fake: FakeKube
) -> None:
    fake.forbid("list", "pods")
    agent = node_agent()
    pod = scheduled_pod(agent, fake, "web-3")
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, ATTRS)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = info.value.details() or ""
    assert "list" in details and "pods" in details and "pod-info" in details
    assert not pod.target.exists()  # nothing left behind
    assert agent.agent.store.count() == 0


def test_pod_watch_off_refuses_the_variables(node_agent: Any, fake: FakeKube) -> None:
    agent = node_agent(pod_watch="off")
    pod = scheduled_pod(agent, fake, "web-4")
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, ATTRS)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--pod-watch=off" in (info.value.details() or "")
    assert "csi.cert-agent.io/ip-sans" in (info.value.details() or "")
    assert fake.count("GET", "/api/v1/pods") == 0  # no watch at all


@pytest.mark.parametrize(
    "attribute",
    ["dns-names", "uri-sans", "common-name", "email-sans", "other-names", "organizations"],
)
def test_pod_ip_where_it_cannot_go_is_invalid_argument(
    node_agent: Any, fake: FakeKube, attribute: str
) -> None:
    agent = node_agent()
    pod = scheduled_pod(agent, fake, "web-5")
    attrs = {
        "csi.cert-agent.io/dns-names": "a.example",
        f"csi.cert-agent.io/{attribute}": "${POD_IP}",
    }
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, attrs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"csi.cert-agent.io/{attribute}" in (info.value.details() or "")
    assert "ip-sans" in (info.value.details() or "")


def test_node_name_variable(node_agent: Any, fake: FakeKube) -> None:
    agent = node_agent()
    pod = scheduled_pod(agent, fake, "web-6")
    target = agent.publish(pod, {"csi.cert-agent.io/dns-names": "${POD_NAME}.${NODE_NAME}.nodes"})
    cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["web-6.node-1.nodes"]
    assert fake.count("GET", "/api/v1/pods") == 0  # no pod watch for volumes that do not need it


def test_host_network_pods_get_no_ip_sans() -> None:
    from agent.kube.pods import pod_ips

    pod = {
        "spec": {"hostNetwork": True, "nodeName": "node-1"},
        "status": {"podIP": "192.168.1.5", "podIPs": [{"ip": "192.168.1.5"}]},
    }
    assert pod_ips(pod) == ()
    pod["spec"] = {"nodeName": "node-1"}
    assert pod_ips(pod) == ("192.168.1.5",)
    assert ipaddress.ip_address(pod_ips({"status": {"podIP": "fd00:0:0::1"}})[0]).version == 6


def test_a_restarted_agent_still_adds_the_ips_of_a_waiting_volume(
    node_agent: Any, fake: FakeKube
) -> None:
    first = node_agent()
    pod = scheduled_pod(first, fake, "web-7")
    target = first.publish(pod, ATTRS)
    assert ip_sans(target) == []
    first.stop()

    fake.set_pod_ips(NAMESPACE, "web-7", ["10.4.0.12"])  # while the agent is down
    second = node_agent()  # same data root: recovers the volume, starts the watch for it
    assert second.agent.manager.pod_ips.wait_carried(pod.volume_id, 10)
    assert ip_sans(target) == ["10.4.0.12"]
    meta = second.agent.store.load(pod.volume_id)
    assert meta is not None and meta.pod_ips == ["10.4.0.12"]


def test_renewal_keeps_the_known_ips_when_the_watch_cannot_run(
    node_agent: Any, fake: FakeKube
) -> None:
    first = node_agent()
    pod = scheduled_pod(first, fake, "web-8")
    fake.set_pod_ips(NAMESPACE, "web-8", ["10.4.0.13"])
    target = first.publish(pod, ATTRS)
    assert ip_sans(target) == ["10.4.0.13"]
    first.stop()

    fake.forbid("list", "pods")  # RBAC taken away while the agent restarts
    second = node_agent()
    before = serial(target)
    assert second.agent.manager.renew(pod.volume_id) is not None  # never left to expire
    assert serial(target) != before
    assert ip_sans(target) == ["10.4.0.13"]  # what the watch said before, not nothing


def test_transient_api_errors_are_retried_within_the_publish(
    node_agent: Any, fake: FakeKube
) -> None:
    agent = node_agent()
    pod = scheduled_pod(agent, fake, "web-9")
    # The first two lists of the node's pods fail (a busy API server); the watch backs off and
    # lists again while the publish waits for it, instead of failing the mount at once.
    fake.fail_next(2, 500, path_contains="/api/v1/pods", watch=False)
    target = agent.publish(pod, ATTRS)
    assert ip_sans(target) == []
    assert fake.count("GET", "/api/v1/pods") == 3
    fake.set_pod_ips(NAMESPACE, "web-9", ["10.4.0.14"])
    assert agent.agent.manager.pod_ips.wait_carried(pod.volume_id, 10)
