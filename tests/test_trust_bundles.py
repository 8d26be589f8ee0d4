"""ca.crt from live trust bundles: ConfigMaps and ClusterTrustBundles in the fake API server.

A bundle change rewrites ca.crt in every volume using it (atomic swap, no reissue) and touches
nothing else; one watch per source; missing or broken bundles give clear errors on publish and
keep the last good bundle later. Waits are on the agent's rewrite counter or its metrics.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import Pod, RunningAgent, openssl
from tests.fakekube import FakeKube, make_test_ca, pem
from tests.test_pod_ips import eventually, sample

NAMESPACE = "apps"
CM = "csi.cert-agent.io/"


def root(name: str) -> bytes:
    return pem(make_test_ca(name)[1])


def subjects(pem_bytes: bytes) -> list[str]:
    return [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(pem_bytes)]


def attrs(**extra: str) -> dict[str, str]:
    return {
        CM + "dns-names": "${POD_NAME}.svc",
        **{CM + k.replace("_", "-"): v for k, v in extra.items()},
    }


def publish(agent: RunningAgent, name: str, attributes: dict[str, str]) -> tuple[Pod, Path]:
    pod = agent.pod(name, namespace=NAMESPACE)
    return pod, agent.publish(pod, attributes)


def files(target: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(target.iterdir()) if not p.name.startswith(".")}


def test_configmap_bundle_change_rewrites_every_volume_using_it_and_nothing_else(
    node_agent: Any, fake: FakeKube
) -> None:
    a, b, c = root("root A"), root("root B"), root("root C")
    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": (a + b + a).decode()})  # a duplicate
    agent = node_agent()
    _p1, t1 = publish(agent, "web-0", attrs(trust_bundle_configmap="roots/ca.crt"))
    _p2, t2 = publish(agent, "web-1", attrs(trust_bundle_configmap="roots/ca.crt"))
    _p3, t3 = publish(agent, "other-0", attrs())  # no bundle: ca.crt is the issuer's CA

    for target in (t1, t2):
        assert subjects((target / "ca.crt").read_bytes()) == ["CN=root A", "CN=root B"]
    before = {t: files(t) for t in (t1, t2, t3)}
    links = {t: os.readlink(t / "..data") for t in (t1, t2, t3)}
    # One watch for the source, however many volumes use it.
    assert len(fake.active_watches(f"/api/v1/namespaces/{NAMESPACE}/configmaps")) == 1

    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": (a + c).decode()})
    assert agent.agent.manager.trust.wait_rewritten(2, 10)

    for target in (t1, t2):
        after = files(target)
        assert subjects(after["ca.crt"]) == ["CN=root A", "CN=root C"]
        # Same certificate and key: no reissue, only ca.crt changed.
        assert {k: v for k, v in after.items() if k != "ca.crt"} == {
            k: v for k, v in before[target].items() if k != "ca.crt"
        }
        assert os.readlink(target / "..data") != links[target]  # through the atomic swap
    assert files(t3) == before[t3] and os.readlink(t3 / "..data") == links[t3]
    assert agent.agent.manager.trust.rewritten == 2
    assert sample(agent, "cert_agent_trust_bundle_rewrites_total") == 2


def test_include_issuer_adds_the_signing_ca(node_agent: Any, fake: FakeKube) -> None:
    fake.put_configmap(NAMESPACE, "roots", {"bundle.pem": root("root A").decode()})
    agent = node_agent()
    _pod, target = publish(
        agent,
        "web-0",
        attrs(trust_bundle_configmap="roots/bundle.pem", trust_bundle_include_issuer="true"),
    )
    assert subjects((target / "ca.crt").read_bytes()) == ["CN=root A", "CN=node local CA"]
    assert "OK" in openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.crt"))
    # A change keeps the issuer in it, without reissuing.
    fake.put_configmap(NAMESPACE, "roots", {"bundle.pem": root("root B").decode()})
    assert agent.agent.manager.trust.wait_rewritten(1, 10)
    assert subjects((target / "ca.crt").read_bytes()) == ["CN=root B", "CN=node local CA"]


def test_cluster_trust_bundles_by_signer_and_label_selector(
    node_agent: Any, fake: FakeKube
) -> None:
    signer = "example.com/roots"
    fake.put_cluster_trust_bundle(
        "example.com:roots:a", root("root A").decode(), signer, {"env": "prod"}
    )
    fake.put_cluster_trust_bundle(
        "example.com:roots:b", root("root B").decode(), signer, {"env": "dev"}
    )
    fake.put_cluster_trust_bundle("other", root("root X").decode())
    agent = node_agent()
    _p1, selected = publish(
        agent,
        "web-0",
        attrs(trust_bundle_signer=signer, trust_bundle_label_selector="env in (prod, staging)"),
    )
    _p2, every = publish(agent, "web-1", attrs(trust_bundle_signer=signer))
    _p3, by_name = publish(agent, "web-2", attrs(trust_bundle_cluster="other"))
    assert subjects((selected / "ca.crt").read_bytes()) == ["CN=root A"]
    assert subjects((every / "ca.crt").read_bytes()) == ["CN=root A", "CN=root B"]
    assert subjects((by_name / "ca.crt").read_bytes()) == ["CN=root X"]
    watches = fake.active_watches("/apis/certificates.k8s.io/v1beta1/clustertrustbundles")
    assert sorted(w.query.get("fieldSelector", "") for w in watches) == [
        "metadata.name=other",
        f"spec.signerName={signer}",
        f"spec.signerName={signer}",
    ]

    # A new root for the signer (CA rotation overlap): both signer volumes get it.
    fake.put_cluster_trust_bundle(
        "example.com:roots:c", root("root C").decode(), signer, {"env": "staging"}
    )
    assert agent.agent.manager.trust.wait_rewritten(2, 10)
    assert subjects((selected / "ca.crt").read_bytes()) == ["CN=root A", "CN=root C"]
    assert subjects((every / "ca.crt").read_bytes()) == ["CN=root A", "CN=root B", "CN=root C"]
    assert subjects((by_name / "ca.crt").read_bytes()) == ["CN=root X"]


@pytest.mark.parametrize(
    ("extra", "setup", "expected"),
    [
        ({"trust_bundle_configmap": "nope/ca.crt"}, None, "ConfigMap apps/nope does not exist"),
        ({"trust_bundle_configmap": "roots/other"}, "roots", "no such key (it has: ca.crt)"),
        ({"trust_bundle_configmap": "broken/ca.crt"}, "broken", "not a valid certificate"),
        ({"trust_bundle_configmap": "keyed/ca.crt"}, "keyed", "not CERTIFICATE"),
        ({"trust_bundle_configmap": "empty/ca.crt"}, "empty", "holds no PEM certificates"),
        ({"trust_bundle_cluster": "missing"}, None, "ClusterTrustBundle missing: no such"),
        ({"trust_bundle_signer": "example.com/none"}, None, "no ClusterTrustBundle matches"),
    ],
)
def test_missing_or_broken_bundle_at_publish_is_failed_precondition(
    node_agent: Any,
    fake: FakeKube,
    extra: dict[str, str],
    setup: str | None,
    expected: str,
) -> None:
    contents = {
        "roots": root("root A").decode(),
        "broken": "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        "keyed": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "empty": "",
    }
    if setup is not None:
        fake.put_configmap(NAMESPACE, setup, {"ca.crt": contents[setup]})
    agent = node_agent()
    pod = agent.pod("web-0", namespace=NAMESPACE)
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, attrs(**extra))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert expected in (info.value.details() or "")
    assert not pod.target.exists() and agent.agent.store.count() == 0
    # The source is released with the failed volume: no watch is left running.
    eventually(lambda: not agent.agent.manager.trust.watcher.watched())  # type: ignore[union-attr]


def test_bad_trust_attributes_are_invalid_argument(node_agent: Any, fake: FakeKube) -> None:
    agent = node_agent()
    cases = {
        "trust-bundle-configmap": ({"trust_bundle_configmap": "roots"}, "NAME/KEY"),
        "trust-bundle-signer": ({"trust_bundle_signer": "nodomain"}, "DOMAIN/PATH"),
        "trust-bundle-label-selector": (
            {"trust_bundle_configmap": "r/k", "trust_bundle_label_selector": "a=b"},
            "trust-bundle-signer",
        ),
        "trust-bundle-cluster": (
            {"trust_bundle_configmap": "r/k", "trust_bundle_cluster": "x"},
            "one trust bundle source",
        ),
    }
    for attribute, (extra, hint) in cases.items():
        pod = agent.pod(f"bad-{len(attribute)}", namespace=NAMESPACE)
        with pytest.raises(grpc.RpcError) as info:
            agent.publish(pod, attrs(**extra))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert CM + attribute in (info.value.details() or "") and hint in (
            info.value.details() or ""
        )


def test_a_bundle_that_disappears_keeps_the_last_good_one(node_agent: Any, fake: FakeKube) -> None:
    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": root("root A").decode()})
    agent = node_agent()
    _pod, target = publish(agent, "web-0", attrs(trust_bundle_configmap="roots/ca.crt"))
    served = (target / "ca.crt").read_bytes()
    label = {"source": f"ConfigMap {NAMESPACE}/roots key ca.crt"}

    fake.delete(fake.resources[("", "configmaps")], NAMESPACE, "roots")
    eventually(lambda: sample(agent, "cert_agent_trust_bundle_stale", label) == 1)
    assert (target / "ca.crt").read_bytes() == served
    # A renewal meanwhile keeps it too.
    agent.agent.manager.renew(_pod.volume_id)
    assert (target / "ca.crt").read_bytes() == served

    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": root("root B").decode()})
    assert agent.agent.manager.trust.wait_rewritten(1, 10)
    assert subjects((target / "ca.crt").read_bytes()) == ["CN=root B"]
    assert sample(agent, "cert_agent_trust_bundle_stale", label) is None


def test_the_watch_stops_with_the_last_volume_using_it(node_agent: Any, fake: FakeKube) -> None:
    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": root("root A").decode()})
    agent = node_agent()
    p1, _t1 = publish(agent, "web-0", attrs(trust_bundle_configmap="roots/ca.crt"))
    p2, _t2 = publish(agent, "web-1", attrs(trust_bundle_configmap="roots/ca.crt"))
    assert "bundle-cm-apps-roots" in [t.name for t in threading.enumerate()]
    agent.client.unpublish(p1.volume_id, str(p1.target))
    assert len(agent.agent.manager.trust.watcher.watched()) == 1  # type: ignore[union-attr]
    agent.client.unpublish(p2.volume_id, str(p2.target))
    assert agent.agent.manager.trust.watcher.watched() == []  # type: ignore[union-attr]
    # The informer's thread has ended (the fake cannot see a client hang up on an idle watch).
    assert "bundle-cm-apps-roots" not in [t.name for t in threading.enumerate()]


def test_forbidden_configmaps_name_the_verb(node_agent: Any, fake: FakeKube) -> None:
    fake.forbid("list", "configmaps")
    agent = node_agent()
    pod = agent.pod("web-0", namespace=NAMESPACE)
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, attrs(trust_bundle_configmap="roots/ca.crt"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = info.value.details() or ""
    assert "list configmaps" in details.replace('"', "") or "list and watch configmaps" in details


def test_standalone_agent_refuses_trust_bundles(agent: RunningAgent) -> None:
    pod = agent.pod("web-0")
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, attrs(trust_bundle_configmap="roots/ca.crt"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--standalone" in (info.value.details() or "")


def test_rewrite_keeps_the_pkcs12_trust_store_in_step(node_agent: Any, fake: FakeKube) -> None:
    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": root("root A").decode()})
    agent = node_agent()
    extra = attrs(trust_bundle_configmap="roots/ca.crt", pkcs12_enable="true", pkcs12_password="pw")
    _pod, target = publish(agent, "web-0", extra)
    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": root("root B").decode()})
    assert agent.agent.manager.trust.wait_rewritten(1, 10)
    from cryptography.hazmat.primitives.serialization import pkcs12

    store = pkcs12.load_pkcs12((target / "keystore.p12").read_bytes(), b"pw")
    assert [c.certificate.subject.rfc4514_string() for c in store.additional_certs] == ["CN=root B"]
    key_pem = (target / "tls.key").read_bytes()
    assert store.key is not None
    assert store.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == serialization.load_pem_private_key(key_pem, None).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_restarted_agent_follows_the_bundle_again(node_agent: Any, fake: FakeKube) -> None:
    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": root("root A").decode()})
    first = node_agent()
    _pod, target = publish(first, "web-0", attrs(trust_bundle_configmap="roots/ca.crt"))
    first.stop()
    fake.put_configmap(NAMESPACE, "roots", {"ca.crt": root("root B").decode()})  # while down
    second = node_agent()
    assert second.agent.manager.trust.wait_rewritten(1, 10)
    assert subjects((target / "ca.crt").read_bytes()) == ["CN=root B"]
