"""Node CA mode end to end: the real agent, the fake API server, a signer that acts like
cert-manager's CA issuer (isCA without a path length, name constraints copied from the CSR).

Time is injected: one FakeClock drives the agent (signing, scheduler, node CA renewal) and the
signer's notBefore, so renewals are tested without waiting, and nothing depends on load.
"""

from __future__ import annotations

import base64
import os
import stat
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import NodeCAConfig
from agent.pki.name_constraints import PermittedNames
from agent.volumes.mounter import read_mountinfo
from tests.conftest import RunningAgent, openssl
from tests.fakekube import FakeClock, FakeKube, FakeSigner
from tests.test_csi_node import _mutual_tls_handshake

NAMESPACE = "cert-agent"
AGENT_POD = "cert-agent-x7k2p"
ISSUER = "ClusterIssuer ca-cluster-issuer (cert-manager.io)"
POD_ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/uri-sans": "spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/default",
    "csi.cert-agent.io/key-usages": "digital signature,key encipherment,server auth,client auth",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node_signer(fake: FakeKube, clock: FakeClock) -> Iterator[FakeSigner]:
    running = FakeSigner(fake, clock=clock.datetime).start()
    yield running
    running.stop()


@pytest.fixture
def start_agent(
    fake: FakeKube,
    clock: FakeClock,
    tmp_path: Path,
    agent_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., RunningAgent]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    pod_uid = str(uuid.uuid4())

    def start(
        issue_timeout_seconds: float = 5.0, policy_file: Path | None = None, **node_ca: Any
    ) -> RunningAgent:
        fields: dict[str, Any] = {
            "issuer_name": "ca-cluster-issuer",
            "issuer_kind": "ClusterIssuer",
            "namespace": NAMESPACE,
            "permitted": PermittedNames.parse(
                dns=["svc.cluster.local"], uri_hosts=["cluster.local"]
            ),
        }
        return agent_factory(  # type: ignore[no-any-return]
            standalone=False,
            kubeconfig=str(kubeconfig),
            clock=clock,
            node_ca=NodeCAConfig(**{**fields, **node_ca}),
            pod_name=AGENT_POD,
            pod_uid=pod_uid,
            pod_namespace=NAMESPACE,
            issue_timeout_seconds=issue_timeout_seconds,
            policy_file=policy_file,
        )

    return start


def node_ca_of(agent: RunningAgent) -> Any:
    return agent.agent.node_ca


def posts(fake: FakeKube) -> int:
    return fake.count("POST", "/certificaterequests")


def chain(target: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((target / "tls.crt").read_bytes())


def verify(target: Path, at: float | None = None) -> str:
    args = ["verify", "-CAfile", str(target / "ca.crt"), "-untrusted", str(target / "tls.crt")]
    if at is not None:
        args += ["-attime", str(int(at))]
    return openssl(*args, str(target / "tls.crt"))


def metric(agent: RunningAgent, line_start: str) -> float:
    with urllib.request.urlopen(agent.metrics_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starts with {line_start}:\n{text}")


def node_ca_text(agent: RunningAgent) -> str:
    pem = node_ca_of(agent).current().certificate.public_bytes(serialization.Encoding.PEM)
    return openssl("x509", "-noout", "-text", input=pem)


def readyz(agent: RunningAgent) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(agent.metrics_url + "/readyz", timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------- issuance


def test_one_request_makes_the_node_ca_and_pods_get_chains_that_verify_and_handshake(
    start_agent: Callable[..., RunningAgent], fake: FakeKube, node_signer: FakeSigner
) -> None:
    agent = start_agent()
    node_ca_of(agent).wait_for_attempts(1)
    assert agent.agent.ready() == (True, "")

    (request,) = fake.list_crs(NAMESPACE)
    spec = request["spec"]
    assert spec["isCA"] is True
    assert spec["usages"] == ["cert sign", "crl sign", "digital signature"]
    assert spec["issuerRef"] == {
        "name": "ca-cluster-issuer",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert spec["duration"] == "24h0m0s"
    [owner] = request["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("Pod", AGENT_POD)
    csr = x509.load_pem_x509_csr(base64.b64decode(spec["request"]))
    assert csr.subject.rfc4514_string() == "CN=cert-agent node node-1"
    basic = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    assert csr.extensions.get_extension_for_class(x509.NameConstraints).critical

    # The node key exists only on the agent's own tmpfs, 0600.
    directory = agent.config.data_root / "node-ca"
    assert any(m.mount_point == str(directory) and m.fs_type == "tmpfs" for m in read_mountinfo())
    for name in os.listdir(directory):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name

    before = len(fake.requests)
    pods = [agent.pod(f"es-{i}", namespace="elastic") for i in range(2)]
    targets = [agent.publish(pod, POD_ATTRIBUTES) for pod in pods]
    assert len(fake.requests) == before, "signing a pod certificate must not call the API"
    assert posts(fake) == 1

    node_ca = node_ca_of(agent).current().certificate
    for target in targets:
        leaf, intermediate = chain(target)
        assert intermediate == node_ca
        assert (target / "ca.crt").read_bytes() == node_signer.ca_pem
        assert verify(target).strip().endswith("OK")
        assert leaf.not_valid_after_utc <= node_ca.not_valid_after_utc
        assert "PRIVATE KEY" not in (target / "tls.crt").read_text()
    text = node_ca_text(agent)
    constraints = text.split("X509v3 Name Constraints: critical")[1]
    assert "DNS:svc.cluster.local" in constraints
    assert "URI:cluster.local" in constraints
    assert "IP:0.0.0.0/0.0.0.0" in constraints.split("Excluded:")[1]
    assert "CA:TRUE" in text and "pathlen" not in text  # as cert-manager's CA issuer issues it
    _mutual_tls_handshake(targets[0], targets[1], server_name="es-0.elastic.svc.cluster.local")

    assert metric(agent, 'cert_agent_node_ca_requests_total{outcome="issued"}') == 1
    assert metric(agent, "cert_agent_node_ca_expiry_timestamp_seconds") == (
        node_ca.not_valid_after_utc.timestamp()
    )
    info = 'cert_agent_node_ca_info{issuer="' + ISSUER + '",name_constraints="certificate"}'
    assert metric(agent, info) == 1


def allow_everything(tmp_path: Path) -> Path:
    """An issuance policy that allows every name, key and is-ca (it leaves the node CA alone)."""
    policy = tmp_path / "allow-everything.yaml"
    policy.write_text(
        "rules:\n  - name: anything\n    namespaces: ['*']\n    dns-names: ['**']\n"
        "    uri-sans: ['**']\n    ip-sans: ['0.0.0.0/0', '::/0']\n"
        "    subject: {common-name: ['**']}\n    is-ca: true\n"
    )
    return policy


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"csi.cert-agent.io/dns-names": "evil.google.com"}, "DNS evil.google.com"),
        ({"csi.cert-agent.io/ip-sans": "8.8.8.8", "csi.cert-agent.io/common-name": "x"}, "8.8.8.8"),
        (
            {"csi.cert-agent.io/uri-sans": "spiffe://evil.example/ns/a/sa/b"},
            "URI spiffe://evil.example/ns/a/sa/b",
        ),
    ],
)
def test_names_outside_the_constraints_are_refused_and_leave_nothing(
    start_agent: Callable[..., RunningAgent],
    node_signer: FakeSigner,
    attributes: dict[str, str],
    named: str,
    tmp_path: Path,
) -> None:
    # A policy that allows anything: the node CA's own constraints are what is tested here.
    agent = start_agent(policy_file=allow_everything(tmp_path))
    node_ca_of(agent).wait_for_attempts(1)
    pod = agent.pod("team-a-0", namespace="team-a")
    with pytest.raises(grpc.RpcError) as error:
        agent.publish(pod, attributes)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error.value.details() or ""
    assert named in details and "--node-ca-permitted-" in details
    assert not pod.target.exists()
    assert os.listdir(agent.config.data_root / "volumes") == []


def test_is_ca_volumes_are_refused(
    start_agent: Callable[..., RunningAgent], node_signer: FakeSigner, tmp_path: Path
) -> None:
    agent = start_agent(policy_file=allow_everything(tmp_path))  # the node CA refuses, not it
    node_ca_of(agent).wait_for_attempts(1)
    pod = agent.pod("ca-0", namespace="team-a")
    attributes = {"csi.cert-agent.io/common-name": "sub ca", "csi.cert-agent.io/is-ca": "true"}
    with pytest.raises(grpc.RpcError) as error:
        agent.publish(pod, attributes)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is-ca" in (error.value.details() or "")


def test_an_issuer_that_drops_the_constraints_is_covered_by_the_agent(
    start_agent: Callable[..., RunningAgent],
    node_signer: FakeSigner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    node_signer.copy_name_constraints = False
    agent = start_agent()
    node_ca_of(agent).wait_for_attempts(1)
    assert agent.agent.ready() == (True, "")
    assert node_ca_of(agent).enforced_by_agent
    text = node_ca_text(agent)
    assert "Name Constraints" not in text
    warnings = [r for r in caplog.records if "dropped the node CA's name constraints" in r.message]
    assert len(warnings) == 1
    info = 'cert_agent_node_ca_info{issuer="' + ISSUER + '",name_constraints="agent"}'
    assert metric(agent, info) == 1

    pod = agent.pod("team-a-0", namespace="team-a")
    with pytest.raises(grpc.RpcError) as error:
        agent.publish(pod, {"csi.cert-agent.io/dns-names": "evil.google.com"})
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    target = agent.publish(agent.pod("es-0", namespace="elastic"), POD_ATTRIBUTES)
    assert verify(target).strip().endswith("OK")


def test_require_name_constraints_refuses_such_a_ca(
    start_agent: Callable[..., RunningAgent], node_signer: FakeSigner
) -> None:
    node_signer.copy_name_constraints = False
    agent = start_agent(require_name_constraints=True)
    node_ca_of(agent).wait_for_attempts(1)
    ready, reason = agent.agent.ready()
    assert not ready
    assert "--node-ca-require-name-constraints" in reason and ISSUER in reason
    pod = agent.pod("es-0", namespace="elastic")
    with pytest.raises(grpc.RpcError) as error:
        agent.publish(pod, POD_ATTRIBUTES)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------- failures and restarts


def test_denied_at_start_serves_not_ready_then_becomes_ready_by_itself(
    start_agent: Callable[..., RunningAgent], fake: FakeKube, node_signer: FakeSigner
) -> None:
    node_signer.mode = "deny"
    agent = start_agent()
    node_ca_of(agent).wait_for_attempts(1)
    (denied,) = fake.list_crs(NAMESPACE)
    name = f"{NAMESPACE}/{denied['metadata']['name']}"

    code, body = readyz(agent)
    assert code == 503
    assert ISSUER in body and f"CertificateRequest {name} was denied" in body
    pod = agent.pod("es-0", namespace="elastic")
    with pytest.raises(grpc.RpcError) as error:
        agent.publish(pod, POD_ATTRIBUTES)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ISSUER in (error.value.details() or "") and name in (error.value.details() or "")
    assert not pod.target.exists()
    assert metric(agent, 'cert_agent_node_ca_requests_total{outcome="permission_denied"}') == 1

    # The admin fixes the approval policy; the agent's retry gets the node CA.
    node_signer.mode = "issue"
    node_ca_of(agent).wake()
    node_ca_of(agent).wait_for_attempts(2)
    assert readyz(agent)[0] == 200
    target = agent.publish(pod, POD_ATTRIBUTES)
    assert verify(target).strip().endswith("OK")
    (left,) = fake.list_crs(NAMESPACE)  # the denied request was deleted before the new one
    assert left["metadata"]["name"] != denied["metadata"]["name"]


def test_unreachable_api_at_start_serves_not_ready_then_becomes_ready(
    start_agent: Callable[..., RunningAgent], fake: FakeKube, node_signer: FakeSigner
) -> None:
    fake.fail_next(10_000, 503, method="POST", path_contains="/certificaterequests")
    agent = start_agent(issue_timeout_seconds=0.5)
    node_ca_of(agent).wait_for_attempts(1)
    ready, reason = agent.agent.ready()
    assert not ready and ISSUER in reason
    assert f'create certificaterequests.cert-manager.io in namespace "{NAMESPACE}"' in reason
    pod = agent.pod("es-0", namespace="elastic")
    with pytest.raises(grpc.RpcError) as error:
        agent.publish(pod, POD_ATTRIBUTES)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert metric(agent, 'cert_agent_node_ca_requests_total{outcome="unavailable"}') == 1

    fake.clear_faults()
    node_ca_of(agent).wake()
    node_ca_of(agent).wait_for_attempts(2)
    assert agent.agent.ready() == (True, "")
    assert verify(agent.publish(pod, POD_ATTRIBUTES)).strip().endswith("OK")


def test_a_request_outside_the_agents_namespace_has_no_owner(
    start_agent: Callable[..., RunningAgent], fake: FakeKube, node_signer: FakeSigner
) -> None:
    agent = start_agent(namespace="pki")
    node_ca_of(agent).wait_for_attempts(1)
    assert agent.agent.ready() == (True, "")
    (request,) = fake.list_crs("pki")
    # An owner reference cannot cross namespaces: the garbage collector would delete it at once.
    assert "ownerReferences" not in request["metadata"]


def test_restart_reuses_a_valid_node_ca_without_a_request(
    start_agent: Callable[..., RunningAgent], fake: FakeKube, node_signer: FakeSigner
) -> None:
    first = start_agent()
    node_ca_of(first).wait_for_attempts(1)
    target = first.publish(first.pod("es-0", namespace="elastic"), POD_ATTRIBUTES)
    node_ca = node_ca_of(first).current().certificate
    first.stop()

    second = start_agent()
    assert second.agent.ready() == (True, "")  # at once: no request made, none awaited
    assert node_ca_of(second).current().certificate == node_ca
    assert posts(fake) == 1
    assert verify(target).strip().endswith("OK")
    other = second.publish(second.pod("es-1", namespace="elastic"), POD_ATTRIBUTES)
    assert chain(other)[1] == node_ca
    assert posts(fake) == 1


def test_restart_during_a_pending_request_picks_it_up(
    start_agent: Callable[..., RunningAgent], fake: FakeKube, node_signer: FakeSigner
) -> None:
    node_signer.mode = "hold"
    first = start_agent()
    fake.wait_until(lambda: len(fake.list_crs(NAMESPACE)) == 1)
    first.stop()
    second = start_agent()
    fake.wait_until(lambda: len(fake.active_watches("certificaterequests")) >= 1)
    node_signer.release()
    node_ca_of(second).wait_for_attempts(1)
    assert second.agent.ready() == (True, "")
    assert posts(fake) == 1


# -------------------------------------------------------------------------------- renewal


def test_node_ca_renews_ahead_and_every_pod_moves_before_the_old_one_expires(
    start_agent: Callable[..., RunningAgent], fake: FakeKube, node_signer: FakeSigner, clock: Any
) -> None:
    agent = start_agent()
    provider = node_ca_of(agent)
    provider.wait_for_attempts(1)
    old = provider.current().certificate
    old_end = old.not_valid_after_utc.timestamp()
    pods = [agent.pod(f"es-{i}", namespace="elastic") for i in range(4)]
    # Renewing on their own only in the old node CA's last hours, so the move is what counts.
    late = {**POD_ATTRIBUTES, "csi.cert-agent.io/renew-before": "1h"}
    targets = [agent.publish(pod, late) for pod in pods]
    for target in targets:
        assert chain(target)[0].not_valid_after_utc.timestamp() == old_end  # capped, not 90 days

    # The renewal point: a third of the lifetime ahead, less a small random spread.
    renew_at = provider.renew_at
    assert old_end - 8 * 3600 - 0.05 * 24 * 3600 <= renew_at <= old_end - 8 * 3600
    assert metric(agent, "cert_agent_node_ca_renewal_timestamp_seconds") == renew_at
    clock.advance_to(renew_at + 1)
    provider.wake()
    provider.wait_for_attempts(2)
    new = provider.current().certificate
    assert new != old and new.not_valid_after_utc.timestamp() > old_end
    assert posts(fake) == 2  # one request per node per renewal
    assert len(fake.list_crs(NAMESPACE)) == 1  # the superseded request is deleted

    # Every pod is due again before the old node CA expires, spread out rather than at once.
    dues = [agent.agent.scheduler.due_time(pod.volume_id) for pod in pods]
    half_way = clock.now + (old_end - clock.now) / 2  # leaves half the time as a margin
    assert all(d is not None and clock.now <= d <= half_way for d in dues), dues
    assert len(set(dues)) == len(dues)
    clock.advance_to(max(d for d in dues if d is not None) + 1)
    agent.agent.scheduler.wake()
    wait_for(lambda: all(chain(t)[1] == new for t in targets))
    for target in targets:
        assert verify(target, at=clock.now).strip().endswith("OK")
        assert chain(target)[0].not_valid_after_utc <= new.not_valid_after_utc
    assert posts(fake) == 2  # moving the pods cost no API call
    assert metric(agent, 'cert_agent_node_ca_requests_total{outcome="issued"}') == 2


def test_a_failed_renewal_keeps_signing_with_the_old_node_ca(
    start_agent: Callable[..., RunningAgent], fake: FakeKube, node_signer: FakeSigner, clock: Any
) -> None:
    agent = start_agent()
    provider = node_ca_of(agent)
    provider.wait_for_attempts(1)
    old = provider.current().certificate
    node_signer.mode = "fail"
    clock.advance_to(provider.renew_at + 1)
    provider.wake()
    provider.wait_for_attempts(2)
    assert provider.current().certificate == old
    assert agent.agent.ready() == (True, "")
    # The renewal timestamp stays in the past: the alert's condition.
    assert metric(agent, "cert_agent_node_ca_renewal_timestamp_seconds") < clock.now
    target = agent.publish(agent.pod("es-0", namespace="elastic"), POD_ATTRIBUTES)
    assert chain(target)[1] == old
    assert verify(target, at=clock.now).strip().endswith("OK")

    # Once the old node CA is gone, the agent says so instead of signing.
    clock.advance_to(old.not_valid_after_utc.timestamp() + 1)
    ready, reason = agent.agent.ready()
    assert not ready and "expired" in reason and ISSUER in reason


# ---------------------------------------------------------------------------- timing rules


def test_renewal_time_is_a_third_ahead_less_a_bounded_spread() -> None:
    import random

    from agent.issuers.node_ca import renewal_time

    day = 24 * 3600.0
    times = [renewal_time(0.0, day, None, random.Random(seed)) for seed in range(200)]
    assert all(day * 2 / 3 - 0.05 * day <= t <= day * 2 / 3 for t in times)
    assert len(set(times)) == len(times)  # spread out
    explicit = renewal_time(0.0, day, 3600, random.Random(1))
    assert day - 3600 - 0.05 * day <= explicit <= day - 3600
    # A renew-before the issued lifetime cannot honour (the issuer shortened it): a third.
    short = renewal_time(0.0, 3600.0, 7200, random.Random(1))
    assert 3600 * 2 / 3 - 180 <= short <= 3600 * 2 / 3
    # Spread at most an hour, whatever the lifetime.
    year = 365 * day
    assert renewal_time(0.0, year, None, random.Random(2)) >= year * 2 / 3 - 3600


def test_pods_move_within_the_first_half_of_what_their_certificate_has_left() -> None:
    import random

    from agent.issuers.node_ca import reissue_due

    rng = random.Random(3)
    dues = [reissue_due(1000.0, 1000.0 + 8 * 3600, rng) for _ in range(100)]
    assert all(1000.0 <= d <= 1000.0 + 4 * 3600 for d in dues)
    assert reissue_due(1000.0, 900.0, rng) == 1000.0  # already expired: at once
