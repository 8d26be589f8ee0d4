"""The issuance policy in the running agent: real gRPC over the real socket, real mounts.

The property test throws generated volumes at the agent and holds its answers against the
policy engine: whatever the engine denies, the agent answers PERMISSION_DENIED and leaves no
key, file, metadata or mount behind. The rest covers renewals after a policy change, lifetime
caps, the is-ca gates, the failure metric and --policy-for-cert-manager.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.pki.policy import PolicyRequest, PolicyViolation
from agent.pki.policy_loader import default_policy
from agent.spec.attributes import parse_volume_context
from agent.volumes import issue as issue_module
from agent.volumes.mounter import mount_points_below
from tests.conftest import Pod, RunningAgent
from tests.fakekube import FakeKube, FakeSigner
from tests.test_cluster_mode import CA_SECRET, ca_secret_data

PREFIX = "csi.cert-agent.io/"
NAMESPACES = ("team-a", "team-b", "elastic")


def failures(agent: RunningAgent, operation: str = "issue", issuer: str = "local") -> float:
    value = agent.agent.metrics.registry.get_sample_value(
        "cert_agent_issue_failures_total",
        {"issuer": issuer, "operation": operation, "reason": "policy"},
    )
    return value or 0.0


def leftovers(agent: RunningAgent, pod: Pod) -> list[str]:
    """Anything the pod's volume could have left: target, mounts, metadata, keys, payloads."""
    found = []
    if pod.target.exists():
        found.append(f"target {pod.target}")
    found += [f"mount {m}" for m in mount_points_below(pod.target.parent)]
    volume_dir = agent.config.data_root / "volumes" / pod.volume_id
    if volume_dir.exists():
        found += [f"file {Path(r) / n}" for r, _d, names in os.walk(volume_dir) for n in names]
        found.append(f"volume dir {volume_dir}")
    return found


def all_volume_files(agent: RunningAgent) -> list[str]:
    volumes = agent.config.data_root / "volumes"
    return [str(Path(r) / n) for r, _d, names in os.walk(volumes) for n in names]


# --- the property ---------------------------------------------------------------------------------

label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)


@st.composite
def volumes(draw: st.DrawFn) -> tuple[str, str, dict[str, str]]:
    """A pod (namespace, service account) and attributes: some allowed, most not."""
    namespace = draw(st.sampled_from(NAMESPACES))
    account = draw(st.sampled_from(("web", "admin")))
    other_ns = draw(st.sampled_from([n for n in NAMESPACES if n != namespace]))
    inside = [
        st.builds(lambda a: f"{a}.{namespace}.svc", label),
        st.builds(lambda a: f"{a}.{namespace}.svc.cluster.local", label),
        st.builds(lambda a, b: f"{a}.{b}.{namespace}.svc", label, label),
        st.just(f"*.{namespace}.svc"),
    ]
    outside = [
        st.builds(lambda a: f"{a}.{other_ns}.svc", label),
        st.builds(lambda a, b: f"{a}.{b}.com", label, label),
        st.just(f"{namespace}.svc"),
    ]
    # Half of the pods keep to what the default allows, the rest ask for anything.
    behaved = draw(st.booleans())
    names = st.one_of(*inside) if behaved else st.one_of(*inside, *outside)
    dns = draw(st.lists(names, max_size=3, unique=True))
    attributes: dict[str, str] = {}
    if dns:
        attributes["dns-names"] = ",".join(dns)
    uri = draw(
        st.sampled_from(
            (
                None,
                "spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}",
                *(
                    ()
                    if behaved
                    else (
                        "spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/root",
                        f"spiffe://cluster.local/ns/{other_ns}/sa/web",
                    )
                ),
            )
        )
    )
    if uri:
        attributes["uri-sans"] = uri
    extras = {
        "ip-sans": "10.0.0.7",
        "email-sans": "ops@example.com",
        "other-names": "2.5.4.3=${POD_NAME}.node.es.${POD_NAMESPACE}.es.local",
        "is-ca": "true",
        "common-name": "www.google.com",
        "organizations": "system:masters",
    }
    chosen = [] if behaved else draw(st.lists(st.sampled_from(sorted(extras)), max_size=2))
    for key in chosen:
        attributes[key] = extras[key]
    identities = {"dns-names", "uri-sans", "ip-sans", "email-sans", "other-names", "common-name"}
    if not identities & set(attributes):
        attributes["dns-names"] = "www.example.com"
    if draw(st.booleans()):
        attributes["key-algorithm"] = "ECDSA"  # fast keys for the allowed cases
    return namespace, account, attributes


def test_a_denied_request_never_produces_a_key_file_or_mount(
    agent: RunningAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = default_policy()
    seen = {"allowed": 0, "denied": 0}
    # Count calls into the real key generator: a denial must come before any key exists.
    keys_made: list[object] = []
    real_generate = issue_module.generate_private_key

    def counting_generate(spec: Any) -> Any:
        keys_made.append(spec)
        return real_generate(spec)

    monkeypatch.setattr(issue_module, "generate_private_key", counting_generate)

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,  # the same cases on every run: CI must not depend on luck
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(volume=volumes(), index=st.integers(0, 10**6))
    def check(volume: tuple[str, str, dict[str, str]], index: int) -> None:
        namespace, account, attributes = volume
        pod = agent.pod(f"pod-{index}", namespace=namespace, service_account=account)
        request = pod.request({PREFIX + k: v for k, v in attributes.items()})
        spec, info = parse_volume_context(dict(request.volume_context))
        try:
            policy.check(PolicyRequest.from_spec(info, spec))
            expected = None
        except PolicyViolation as exc:
            expected = exc
        before, keys_before = failures(agent), len(keys_made)
        if expected is None:
            agent.client.publish(request)
            assert (pod.target / "tls.crt").exists()
            assert len(keys_made) == keys_before + 1
            agent.client.unpublish(pod.volume_id, str(pod.target))
            seen["allowed"] += 1
        else:
            with pytest.raises(grpc.RpcError) as info_error:
                agent.client.publish(request)
            assert info_error.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert info_error.value.details() == expected.message
            assert failures(agent) == before + 1
            assert len(keys_made) == keys_before, "a key was generated for a denied request"
            seen["denied"] += 1
        assert leftovers(agent, pod) == []
        assert all_volume_files(agent) == []
        assert mount_points_below(agent.tmp / "kubelet") == []

    check()
    # The generator must exercise both sides, or the property says nothing.
    assert seen["allowed"] >= 20 and seen["denied"] >= 20, seen


# --- renewals, caps, gates ------------------------------------------------------------------------

ALLOW_EXAMPLE = """\
rules:
  - name: example
    namespaces: ["team-a"]
    dns-names: ["*.example.com"]
    max-duration: 1h
"""
DEFAULT_ONLY = """\
rules:
  - name: strict
    namespaces: ["*"]
    dns-names: ["**.${POD_NAMESPACE}.svc"]
"""


def serial(target: Path) -> int:
    return x509.load_pem_x509_certificate((target / "tls.crt").read_bytes()).serial_number


def test_a_renewal_denied_after_a_policy_change_keeps_the_old_certificate(
    agent_factory: Any, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(ALLOW_EXAMPLE)
    agent = agent_factory(policy_file=policy_file)
    pod = agent.pod("web-0", namespace="team-a")
    target = agent.publish(pod, {PREFIX + "dns-names": "www.example.com"})
    first = serial(target)
    key = (target / "tls.key").read_bytes()

    policy_file.write_text(DEFAULT_ONLY)
    assert agent.agent.policy.poll() is True
    with pytest.raises(PolicyViolation) as info:
        agent.agent.manager.renew(pod.volume_id)
    assert 'rule "strict" does not allow DNS name "www.example.com"' in info.value.message
    assert serial(target) == first and (target / "tls.key").read_bytes() == key
    assert failures(agent, "renew") == 1
    assert not list((agent.config.data_root / "volumes" / pod.volume_id).glob("pending.key"))
    # A publish retry of the served volume still answers OK: the pod keeps what it has.
    agent.publish(pod, {PREFIX + "dns-names": "www.example.com"})

    policy_file.write_text(ALLOW_EXAMPLE + "\n")
    assert agent.agent.policy.poll() is True
    assert agent.agent.manager.renew(pod.volume_id) is not None
    assert serial(target) != first


def test_max_duration_caps_the_default_lifetime_and_refuses_longer_ones(
    agent_factory: Any, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(ALLOW_EXAMPLE)
    agent = agent_factory(policy_file=policy_file)
    target = agent.publish(
        agent.pod("web-0", namespace="team-a"), {PREFIX + "dns-names": "a.example.com"}
    )
    cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() == 3600

    pod = agent.pod("web-1", namespace="team-a")
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, {PREFIX + "dns-names": "b.example.com", PREFIX + "duration": "2h"})
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "at most 1h (requested 2h)" in (info.value.details() or "")
    assert leftovers(agent, pod) == []


def test_is_ca_needs_both_the_policy_and_allow_ca(agent_factory: Any, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "rules:\n  - name: ca\n    namespaces: ['*']\n    dns-names: ['**']\n    is-ca: true\n"
    )
    strict = agent_factory()
    pod = strict.pod("ca-0")
    attributes = {PREFIX + "dns-names": "ca.default.svc", PREFIX + "is-ca": "true"}
    with pytest.raises(grpc.RpcError) as denied:
        strict.publish(pod, attributes)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not allow CA certificates (is-ca)" in (denied.value.details() or "")
    assert leftovers(strict, pod) == []
    strict.stop()

    lenient = agent_factory(policy_file=policy_file)  # the policy allows it, --allow-ca does not
    with pytest.raises(grpc.RpcError) as refused:
        lenient.publish(lenient.pod("ca-1"), attributes)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is-ca" in (refused.value.details() or "")


def test_policy_metrics_are_exported(agent: RunningAgent) -> None:
    import urllib.request

    with urllib.request.urlopen(agent.metrics_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    assert (
        'cert_agent_issue_failures_total{issuer="local",operation="issue",reason="policy"} 0.0'
        in text
    )
    assert 'cert_agent_policy_reload_total{result="failure"} 0.0' in text
    assert 'source="default"} 1.0' in text and "cert_agent_policy_info{" in text
    assert "cert_agent_policy_last_reload_successful 1.0" in text


# --- cert-manager ---------------------------------------------------------------------------------

EVIL_CLUSTER_VOLUME = {
    "csi.cert-manager.io/issuer-name": "ca-cluster-issuer",
    "csi.cert-manager.io/issuer-kind": "ClusterIssuer",
    "csi.cert-manager.io/dns-names": "www.google.com",
}


@pytest.mark.parametrize("checked", [True, False])
def test_policy_for_cert_manager_checks_before_the_request_is_sent(
    checked: bool,
    fake: FakeKube,
    signer: FakeSigner,
    tmp_path: Path,
    agent_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    data, _cert = ca_secret_data("cluster local CA")
    fake.put_secret(*CA_SECRET, data)
    agent = agent_factory(
        standalone=False,
        kubeconfig=str(fake.write_kubeconfig(tmp_path / "kubeconfig")),
        ca_secret=CA_SECRET,
        issue_timeout_seconds=5.0,
        policy_for_cert_manager=checked,
    )
    pod = agent.pod("es-0", namespace="elastic")
    if checked:
        with pytest.raises(grpc.RpcError) as info:
            agent.publish(pod, EVIL_CLUSTER_VOLUME)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert 'does not allow DNS name "www.google.com"' in (info.value.details() or "")
        assert fake.list_crs("elastic") == []  # nothing reached the cluster
        assert failures(agent, issuer="cert-manager") == 1
        assert leftovers(agent, pod) == []
    else:
        # Without the flag, cert-manager's approval is the policy for its issuers.
        target = agent.publish(pod, EVIL_CLUSTER_VOLUME)
        assert (target / "tls.crt").exists()
        assert len(fake.list_crs("elastic")) == 1
