"""The PCR signer mode in the whole agent: configured like the DaemonSet, one CA for CSI volumes
and pod certificates, the metrics on /metrics, the signer-linked ClusterTrustBundle, restarts."""

from __future__ import annotations

import datetime as dt
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.kube.client import KubeSettings, make_api_client
from agent.kube.trust_bundle_publisher import TrustBundlePublisher, bundle_name
from agent.spec.pcr import parse_signers
from tests.conftest import RunningAgent, openssl
from tests.fake_pcr import PCRS, condition, install, pcr_body
from tests.fakekube import CLUSTER_TRUST_BUNDLES, FakeKube, make_test_ca, pem

SIGNER = "cert-agent.io/pod-identity"
BUNDLE = "cert-agent.io:pod-identity:primary"


def ca_pem(fake: FakeKube) -> bytes:
    secret = fake.get(fake.resources[("", "secrets")], "cert-agent", "cert-agent-ca")
    import base64

    return base64.b64decode(secret["data"]["ca.crt"])


def request(fake: FakeKube, name: str, namespace: str = "apps") -> dict[str, Any]:
    pod = fake.put_pod(namespace, name, "node-1")
    made = pcr_body(name=f"{name}-pcr", pod=pod, signer=SIGNER)
    return fake.create(PCRS, namespace, made.body)


def answered(fake: FakeKube, pcr: dict[str, Any]) -> dict[str, Any]:
    name, namespace = pcr["metadata"]["name"], pcr["metadata"]["namespace"]
    fake.wait_until(lambda: condition(fake.get(PCRS, namespace, name)) is not None)
    return fake.get(PCRS, namespace, name)


@pytest.fixture
def pcr_agent(fake: FakeKube, node_agent: Any) -> Any:
    install(fake)

    def start(**overrides: Any) -> RunningAgent:
        values: dict[str, Any] = {
            "pcr_signers": parse_signers([SIGNER], None),
            "pcr_publish_trust_bundle": True,
            # The built-in default policy allows the signer's default names.
            "policy_file": None,
        }
        return node_agent(**(values | overrides))  # type: ignore[no-any-return]

    return start


# An issuance policy for the signer's default names, in one namespace, for two hours at most.
PCR_POLICY = """\
rules:
  - name: pod-identity
    namespaces: ["apps"]
    dns-names: ["**.${POD_NAMESPACE}.pod.${CLUSTER_DOMAIN}"]
    uri-sans: ["spiffe://${TRUST_DOMAIN}/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}"]
    max-duration: 2h
"""


def test_the_agent_signs_pcrs_with_its_ca_and_publishes_the_bundle(
    pcr_agent: Any, fake: FakeKube, tmp_path: Path
) -> None:
    agent = pcr_agent()
    done = answered(fake, request(fake, "web-0"))
    assert condition(done)["type"] == "Issued"  # type: ignore[index]
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca_pem(fake))
    chain = tmp_path / "chain.pem"
    chain.write_text(done["status"]["certificateChain"])
    assert "OK" in openssl("verify", "-CAfile", str(ca_file), "-untrusted", str(chain), str(chain))
    # The bundle: named by the signer, linked to it, holding the same CA.
    fake.wait_until(lambda: bool(fake.list(CLUSTER_TRUST_BUNDLES)))
    bundle = fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)
    assert bundle["spec"] == {"signerName": SIGNER, "trustBundle": ca_pem(fake).decode()}
    assert bundle["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "cert-agent"}
    # The metrics on the agent's real endpoint.
    issued = (
        'cert_agent_pcr_requests_total{outcome="issued",reason="Issued",'
        'signer="cert-agent.io/pod-identity"} 1.0'
    )
    fake.wait_until(lambda: issued in scrape(agent))  # the counter follows the status write
    text = scrape(agent)
    assert 'cert_agent_pcr_sign_latency_seconds_count{signer="cert-agent.io/pod-identity"} 1.0' in (
        text
    )


def scrape(agent: RunningAgent) -> str:
    with urllib.request.urlopen(agent.metrics_url + "/metrics", timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def test_requests_that_arrive_while_the_agent_is_down_are_signed_after_its_restart(
    pcr_agent: Any, fake: FakeKube
) -> None:
    first = pcr_agent()
    answered(fake, request(fake, "web-0"))
    first.stop()
    waiting = [request(fake, f"web-{i}") for i in range(1, 4)]
    assert all(condition(fake.get(PCRS, "apps", w["metadata"]["name"])) is None for w in waiting)
    pcr_agent()
    for pcr in waiting:
        assert condition(answered(fake, pcr))["type"] == "Issued"  # type: ignore[index]


def test_the_bundle_follows_a_ca_rotation(pcr_agent: Any, fake: FakeKube) -> None:
    pcr_agent()
    old = ca_pem(fake)
    fake.wait_until(
        lambda: (
            fake.list(CLUSTER_TRUST_BUNDLES) != []
            and fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)["spec"]["trustBundle"] == old.decode()
        )
    )
    key, cert = make_test_ca("rotated CA")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fake.put_secret("cert-agent", "cert-agent-ca", {"ca.crt": pem(cert), "ca.key": key_pem})

    def both_cas() -> bool:
        bundle = fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)["spec"]["trustBundle"].encode()
        return pem(cert) in bundle and old in bundle

    fake.wait_until(both_cas)  # the new CA, and the old one while certificates from it live
    done = answered(fake, request(fake, "web-5"))
    leaf = x509.load_pem_x509_certificates(done["status"]["certificateChain"].encode())[0]
    assert leaf.issuer == cert.subject


def test_the_publisher_repairs_the_bundle_and_writes_only_on_change(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    _key, cert = make_test_ca("bundle CA")
    api = make_api_client(KubeSettings(kubeconfig=str(fake.write_kubeconfig(tmp_path / "kc"))))
    publisher = TrustBundlePublisher(api, (SIGNER, "example.com/b"), lambda: pem(cert))
    assert bundle_name("example.com/b") == "example.com:b:primary"
    assert publisher.publish(SIGNER) is True
    assert publisher.publish(SIGNER) is False  # equal content: no write
    _other_key, other = make_test_ca("someone else's CA")
    tampered = fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)
    tampered["spec"]["trustBundle"] = pem(other).decode()
    tampered["metadata"]["labels"]["team"] = "x"
    fake.update(CLUSTER_TRUST_BUNDLES, "", tampered)
    assert publisher.publish(SIGNER) is True
    repaired = fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)
    assert repaired["spec"]["trustBundle"] == pem(cert).decode()
    assert repaired["metadata"]["labels"]["team"] == "x"  # others' labels stay
    fake.delete(CLUSTER_TRUST_BUNDLES, "", BUNDLE)
    publisher.publish_all()
    assert fake.get(CLUSTER_TRUST_BUNDLES, "", "example.com:b:primary")["spec"]["signerName"] == (
        "example.com/b"
    )
    assert fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)["spec"]["trustBundle"] == pem(cert).decode()
    # A conflicting write by another node (409) is looked at again, not an error.
    fake.fail_next(1, 409, method="PUT", path_contains="clustertrustbundles")
    tampered = fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)
    tampered["spec"]["trustBundle"] = pem(other).decode()
    fake.update(CLUSTER_TRUST_BUNDLES, "", tampered)
    assert publisher.publish(SIGNER) is True
    assert fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)["spec"]["trustBundle"] == pem(cert).decode()


def test_an_api_server_that_does_not_answer_never_holds_up_the_start(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the first publish ran in start(), so a stuck API server blocked the agent's
    start-up for the length of the request timeout."""
    import threading

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    _key, cert = make_test_ca("bundle CA")
    api = make_api_client(KubeSettings(kubeconfig=str(fake.write_kubeconfig(tmp_path / "kc"))))
    publisher = TrustBundlePublisher(api, (SIGNER,), lambda: pem(cert))
    fake.hang("clustertrustbundles")
    try:
        started = threading.Thread(target=publisher.start)
        started.start()
        fake.wait_until(lambda: fake.count("GET", "clustertrustbundles") == 1)
        started.join(5)  # returns at once; before the fix it waited for the request timeout
        assert not started.is_alive()
        assert publisher.writes == 0
    finally:
        fake.release_hung()
    fake.wait_until(lambda: publisher.writes == 1)
    publisher.stop()
    assert fake.get(CLUSTER_TRUST_BUNDLES, "", BUNDLE)["spec"]["trustBundle"] == pem(cert).decode()


def test_a_policy_file_caps_the_lifetime_and_denies_outside_its_rules(
    pcr_agent: Any, fake: FakeKube, tmp_path: Path
) -> None:
    """--policy: a rule's max-duration shortens the certificate (maxExpirationSeconds is only a
    ceiling); a namespace no rule selects is denied, with the policy's message."""
    policy = tmp_path / "pcr-policy.yaml"
    policy.write_text(PCR_POLICY)
    pcr_agent(policy_file=policy)
    allowed = answered(fake, request(fake, "web-0"))
    leaf = x509.load_pem_x509_certificates(allowed["status"]["certificateChain"].encode())[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=2)
    denied = answered(fake, request(fake, "web-0", namespace="other"))
    cond = condition(denied)
    assert cond is not None and (cond["type"], cond["reason"]) == ("Denied", "PolicyViolation")
    assert "other" in cond["message"]
