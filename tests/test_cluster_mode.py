"""The agent in cluster mode against a fake API server that speaks the real REST protocol.

The agent's REST client (kube/rest.py) talks to tests.fakekube over HTTP; a fake signer plays
cert-manager's approver and CA issuer. Everything else is the real agent on its real socket with
real mounts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import RunningAgent, openssl
from tests.fakekube import FakeKube, FakeSigner, make_test_ca, pem

SEED_ATTRIBUTES = {
    # The seed page's manifest, unchanged.
    "csi.cert-manager.io/issuer-name": "ca-cluster-issuer",
    "csi.cert-manager.io/issuer-kind": "ClusterIssuer",
    "csi.cert-manager.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
}
CA_SECRET = ("cert-agent", "cert-agent-ca")


def ca_secret_data(common_name: str) -> tuple[dict[str, bytes], x509.Certificate]:
    key, cert = make_test_ca(common_name)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {"ca.crt": pem(cert), "ca.key": key_pem}, cert


@pytest.fixture
def cluster_agent(
    fake: FakeKube,
    signer: FakeSigner,
    tmp_path: Path,
    agent_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> RunningAgent:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    data, _cert = ca_secret_data("cluster local CA")
    fake.put_secret(*CA_SECRET, data)
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    return agent_factory(  # type: ignore[no-any-return]
        standalone=False,
        kubeconfig=str(kubeconfig),
        ca_secret=CA_SECRET,
        issue_timeout_seconds=2.0,
    )


def certificate_requests(fake: FakeKube, namespace: str = "elastic") -> list[dict[str, Any]]:
    return fake.list_crs(namespace)


def test_seed_manifest_is_signed_through_a_certificate_request(
    cluster_agent: RunningAgent, fake: FakeKube, signer: FakeSigner, tmp_path: Path
) -> None:
    pod = cluster_agent.pod("es-0", namespace="elastic")
    target = cluster_agent.publish(pod, SEED_ATTRIBUTES)

    ca = tmp_path / "signer-ca.pem"
    ca.write_bytes(signer.ca_pem)
    assert "OK" in openssl("verify", "-CAfile", str(ca), str(target / "tls.crt"))
    assert "OK" in openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.crt"))
    cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["es-0.elastic.svc.cluster.local"]

    (request,) = certificate_requests(fake)
    assert request["spec"]["issuerRef"] == {
        "name": "ca-cluster-issuer",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    (owner,) = request["metadata"]["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["name"], owner["uid"]) == (
        "v1",
        "Pod",
        "es-0",
        pod.uid,
    )
    labels = request["metadata"]["labels"]
    assert labels["cert-agent.io/node"] == "node-1"
    assert request["metadata"]["annotations"]["cert-agent.io/volume-id"] == pod.volume_id
    # The key never left the node: the request holds a CSR, and no key material at all.
    assert b"PRIVATE KEY" not in repr(request).encode()


def test_slow_issuer_times_out_and_the_retry_reuses_the_request(
    cluster_agent: RunningAgent, fake: FakeKube, signer: FakeSigner
) -> None:
    signer.mode = "hold"
    pod = cluster_agent.pod("es-1", namespace="elastic")
    request = pod.request(SEED_ATTRIBUTES)
    with pytest.raises(grpc.RpcError) as info:
        cluster_agent.client.publish(request)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (pending,) = certificate_requests(fake)
    assert pending["metadata"]["name"] in (info.value.details() or "")

    with pytest.raises(grpc.RpcError) as again:  # kubelet's retry: still pending
        cluster_agent.client.publish(request)
    assert again.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(certificate_requests(fake)) == 1

    signer.mode = "issue"
    signer.release()
    cluster_agent.client.publish(request)
    assert (pod.target / "tls.crt").exists()
    (used,) = certificate_requests(fake)
    assert used["metadata"]["name"] == pending["metadata"]["name"]


@pytest.mark.parametrize(
    ("mode", "code", "needle"),
    [
        ("deny", grpc.StatusCode.PERMISSION_DENIED, "denied"),
        ("fail", grpc.StatusCode.INTERNAL, "failed"),
    ],
)
def test_denied_and_failed_requests_are_clear_errors_that_leave_nothing(
    cluster_agent: RunningAgent, signer: FakeSigner, mode: str, code: grpc.StatusCode, needle: str
) -> None:
    signer.mode = mode
    pod = cluster_agent.pod("es-2", namespace="elastic")
    with pytest.raises(grpc.RpcError) as info:
        cluster_agent.client.publish(pod.request(SEED_ATTRIBUTES))
    assert info.value.code() == code
    assert needle in (info.value.details() or "").lower()
    assert not pod.target.exists()
    assert list((cluster_agent.config.data_root / "volumes").iterdir()) == []


def test_local_ca_from_a_secret_rotates_without_a_restart(
    cluster_agent: RunningAgent, fake: FakeKube
) -> None:
    targets = []
    for name in ("es-0", "es-1"):
        pod = cluster_agent.pod(name, namespace="elastic")
        targets.append(
            cluster_agent.publish(pod, {"csi.cert-agent.io/dns-names": f"{name}.elastic.svc"})
        )
    old_issuer = x509.load_pem_x509_certificate((targets[0] / "tls.crt").read_bytes()).issuer
    # A cert-manager volume beside them: the local CA's rotation neither touches nor waits on it.
    other = cluster_agent.publish(cluster_agent.pod("es-9", namespace="elastic"), SEED_ATTRIBUTES)
    other_serial = (other / "tls.crt").read_bytes()

    data, new_ca = ca_secret_data("rotated local CA")
    fake.put_secret(*CA_SECRET, data)

    def issuer_of(target: Path) -> x509.Name:
        return x509.load_pem_x509_certificate((target / "tls.crt").read_bytes()).issuer

    def bundle_subjects(target: Path) -> list[x509.Name]:
        certs = x509.load_pem_x509_certificates((target / "ca.crt").read_bytes())
        return [c.subject for c in certs]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(issuer_of(t) == new_ca.subject for t in targets):
            break
        time.sleep(0.1)
    assert all(issuer_of(t) == new_ca.subject for t in targets), "not every volume reissued"
    for target in targets:
        assert "OK" in openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.crt"))

    # The old CA stays in every ca.crt for the overlap (tests/test_ca_overlap.py drops it).
    assert all(bundle_subjects(t) == [new_ca.subject, old_issuer] for t in targets)
    assert old_issuer != new_ca.subject
    assert (other / "tls.crt").read_bytes() == other_serial


def test_agent_starts_without_the_ca_secret_and_becomes_ready_when_it_appears(
    fake: FakeKube,
    signer: FakeSigner,
    tmp_path: Path,
    agent_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import urllib.error
    import urllib.request

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    agent: RunningAgent = agent_factory(
        standalone=False, kubeconfig=str(kubeconfig), ca_secret=CA_SECRET
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(agent.metrics_url + "/readyz", timeout=5)
    assert info.value.code == 503
    assert "cert-agent/cert-agent-ca does not exist" in info.value.read().decode()

    local = agent.pod("web-0")
    with pytest.raises(grpc.RpcError) as error:
        agent.client.publish(local.request({"csi.cert-agent.io/dns-names": "web-0.default.svc"}))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not exist" in (error.value.details() or "")
    assert not local.target.exists()
    # cert-manager volumes do not need the local CA.
    agent.publish(agent.pod("es-0", namespace="elastic"), SEED_ATTRIBUTES)

    data, ca = ca_secret_data("late local CA")
    fake.put_secret(*CA_SECRET, data)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(agent.metrics_url + "/readyz", timeout=5):
                break
        except urllib.error.HTTPError:
            time.sleep(0.1)
    target = agent.publish(local, {"csi.cert-agent.io/dns-names": "web-0.default.svc"})
    issuer = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes()).issuer
    assert issuer == ca.subject


def test_request_is_made_as_the_pods_service_account_when_kubelet_passes_a_token(
    cluster_agent: RunningAgent, fake: FakeKube
) -> None:
    import json

    fake.users["pod-token-es-0"] = "system:serviceaccount:elastic:es"
    pod = cluster_agent.pod("es-0", namespace="elastic", service_account="es")
    request = pod.request(SEED_ATTRIBUTES)
    # What kubelet adds when the CSIDriver asks for tokenRequests (audience "").
    request.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] = json.dumps(
        {"": {"token": "pod-token-es-0", "expirationTimestamp": "2026-12-01T00:00:00Z"}}
    )
    cluster_agent.client.publish(request)

    (created,) = certificate_requests(fake)
    assert created["spec"]["username"] == "system:serviceaccount:elastic:es"
    # The token is a credential: it is never written to the volume's metadata.
    meta = cluster_agent.config.data_root / "volumes" / pod.volume_id / "meta.json"
    assert "pod-token-es-0" not in meta.read_text()
