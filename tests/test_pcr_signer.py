"""The PodCertificateRequest signer against the fake API server (real REST, the agent's client).

The fake holds PCRs with the real server's admission and status validation (tests/fake_pcr.py),
so every status the agent writes is checked by the same rules as in a cluster; a status that
broke them would fail the write with 422 and leave the request pending.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from agent.errors import PermissionDenied
from agent.issuers.pcr_service import PcrService
from agent.kube.client import KubeSettings, make_api_client
from agent.kube.pcr_watch import PcrWatch
from agent.pki.ca import CertificateAuthority, StaticCAProvider
from agent.spec.pcr import PcrIdentity, PcrNames, parse_signers
from tests.conftest import openssl
from tests.fake_pcr import PCRS, PcrAdmission, condition, install, pcr_body
from tests.fakekube import PODS, FakeKube, make_test_ca, pem

SIGNER = "cert-agent.io/pod-identity"
NODE = "node-1"
Obj = dict[str, Any]


class Harness:
    """The signer service on a real client, the fake with PCRs, a CA, and kubelet's part."""

    def __init__(self, fake: FakeKube, tmp: Path) -> None:
        self.fake = fake
        self.tmp = tmp
        self.admission: PcrAdmission = install(fake)
        key, cert = make_test_ca("pcr signer CA")
        self.ca = CertificateAuthority(cert, key)
        self.ca_file = tmp / "ca.pem"
        self.ca_file.write_bytes(pem(cert))
        self.kubeconfig = fake.write_kubeconfig(tmp / "kubeconfig")
        self.registry = CollectorRegistry()
        self.policy: Any = None
        self.leaf_guard: Any = None
        self.service: PcrService | None = None
        self.keys: dict[str, Any] = {}
        self._count = 0

    def start(self, signers: Any = None, names: tuple[str, ...] = (SIGNER,)) -> PcrService:
        api = make_api_client(KubeSettings(kubeconfig=str(self.kubeconfig)))
        self.registry = CollectorRegistry()  # a restarted agent starts from zero
        self.service = PcrService(
            api,
            node=NODE,
            signers=parse_signers(list(names), signers),
            ca=StaticCAProvider(self.ca),
            registry=self.registry,
            policy=self.policy,
            leaf_guard=self.leaf_guard,
        )
        self.service.start()
        for watch in self.service.watches:
            assert watch.wait_listed(10)
        return self.service

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def pod(self, name: str, namespace: str = "apps", node: str = NODE, sa: str = "web") -> Obj:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "app:1"}],
            },
        }
        return self.fake.create(PODS, namespace, body)

    def request(self, pod: Obj, signer: str = SIGNER, **kwargs: Any) -> Obj:
        """What kubelet does for a podCertificate projection: a key, then the PCR."""
        self._count += 1
        name = f"{pod['metadata']['name']}-req-{self._count}"
        made = pcr_body(name=name, pod=pod, signer=signer, **kwargs)
        self.keys[name] = made.key
        return self.fake.create(PCRS, pod["metadata"]["namespace"], made.body)

    def answered(self, pcr: Obj, timeout: float = 10) -> Obj:
        ns, name = pcr["metadata"]["namespace"], pcr["metadata"]["name"]
        self.fake.wait_until(lambda: condition(self.fake.get(PCRS, ns, name)) is not None, timeout)
        return self.fake.get(PCRS, ns, name)

    def counted(self, outcome: str, reason: str, expected: float) -> bool:
        """Wait for the counter (the metric follows the status write on the signer's thread)."""
        with contextlib.suppress(AssertionError):
            self.fake.wait_until(lambda: self.count(outcome, reason) >= expected, 10)
        return self.count(outcome, reason) == expected

    def count(self, outcome: str, reason: str, signer: str = SIGNER) -> float:
        value = self.registry.get_sample_value(
            "cert_agent_pcr_requests_total",
            {"signer": signer, "outcome": outcome, "reason": reason},
        )
        return value or 0.0

    def status_writes(self, pcr: Obj) -> int:
        return self.fake.count("PUT", f"/podcertificaterequests/{pcr['metadata']['name']}/status")


@pytest.fixture
def pcr(fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    harness = Harness(fake, tmp_path)
    yield harness
    harness.stop()


def leaf_of(status: Obj) -> x509.Certificate:
    return x509.load_pem_x509_certificates(status["certificateChain"].encode())[0]


def spki(key: Any) -> bytes:
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- issued


@pytest.mark.parametrize(
    ("key_type", "form"), [("ECDSAP256", "stub"), ("ED25519", "pkix"), ("RSA3072", "stub")]
)
def test_a_request_from_a_pod_on_this_node_is_signed(
    pcr: Harness, key_type: str, form: str
) -> None:
    if form == "pkix":
        pcr.admission.version = "1.35.0"  # before stubPKCS10Request
    pcr.start()
    pod = pcr.pod("web-0")
    request = pcr.request(pod, key_type=key_type, form=form)
    done = pcr.answered(request)
    cond = condition(done)
    assert cond is not None and (cond["type"], cond["reason"]) == ("Issued", "Issued")
    status = done["status"]
    chain = pcr.tmp / "chain.pem"
    chain.write_text(status["certificateChain"])
    assert "OK" in openssl(
        "verify", "-CAfile", str(pcr.ca_file), "-untrusted", str(chain), str(chain)
    )
    leaf = leaf_of(status)
    assert spki(leaf.public_key()) == spki(pcr.keys[request["metadata"]["name"]].public_key())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.critical  # empty subject
    assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/apps/sa/web"
    ]
    assert sans.value.get_values_for_type(x509.DNSName) == ["web-0.apps.pod.cluster.local"]
    text = openssl("x509", "-noout", "-text", "-in", str(chain))
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "CA:FALSE" in text
    # The API server's default maxExpirationSeconds (24h) and the signer's own (24h).
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=24)
    refresh = dt.datetime.fromisoformat(status["beginRefreshAt"])
    fraction = (refresh - leaf.not_valid_before_utc) / dt.timedelta(hours=24)
    assert 0.5 <= fraction <= 0.75
    assert pcr.counted("issued", "Issued", 1)
    latency = pcr.registry.get_sample_value(  # observed before the counter is incremented
        "cert_agent_pcr_sign_latency_seconds_count", {"signer": SIGNER}
    )
    assert latency == 1


def test_lifetime_follows_max_expiration_seconds_and_the_signer_cap(pcr: Harness) -> None:
    pcr.start({SIGNER: {"max-duration": "2h"}})
    pod = pcr.pod("web-0")
    short = pcr.answered(pcr.request(pod, max_expiration=3600))["status"]
    leaf = leaf_of(short)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=1)
    capped = pcr.answered(pcr.request(pod, max_expiration=86400 * 7))["status"]
    leaf = leaf_of(capped)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=2)


def test_a_ca_that_cannot_cover_an_hour_fails_the_request(pcr: Harness) -> None:
    # A CA with 30 minutes left: the API's one-hour minimum cannot be met.
    now = dt.datetime.now(dt.UTC)
    ca = pcr.ca
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(ca.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(minutes=30))
    )
    for ext in ca.certificate.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    from cryptography.hazmat.primitives import hashes

    pcr.ca = CertificateAuthority(builder.sign(ca.private_key, hashes.SHA256()), ca.private_key)
    pcr.start()
    done = pcr.answered(pcr.request(pcr.pod("web-0")))
    cond = condition(done)
    assert cond is not None and (cond["type"], cond["reason"]) == ("Failed", "CAExpiring")
    assert set(done["status"]) == {"conditions"}
    assert pcr.counted("failed", "CAExpiring", 1)


# --------------------------------------------------------------------------- not ours


def test_requests_of_other_nodes_and_signers_are_never_touched(pcr: Harness) -> None:
    pcr.start()
    elsewhere = pcr.request(pcr.pod("far-0", node="node-2"))
    other_signer = pcr.request(pcr.pod("web-1"), signer="example.com/other")
    ours = pcr.answered(pcr.request(pcr.pod("web-0")))
    assert condition(ours) is not None
    for untouched in (elsewhere, other_signer):
        now = pcr.fake.get(PCRS, "apps", untouched["metadata"]["name"])
        assert condition(now) is None
        assert now["metadata"]["resourceVersion"] == untouched["metadata"]["resourceVersion"]
        assert pcr.status_writes(untouched) == 0
    # The API server sent this node only its own requests: the watch asks for exactly those.
    watches = [r for r in pcr.fake.requests if r.path.endswith("/podcertificaterequests")]
    assert watches and {r.query.get("fieldSelector") for r in watches} == {
        f"spec.nodeName={NODE},spec.signerName={SIGNER}"
    }
    assert all("/namespaces/" not in r.path for r in watches)  # across namespaces


# --------------------------------------------------------------------------- denied


def test_a_bad_proof_of_possession_is_denied(pcr: Harness) -> None:
    pcr.admission.version = "1.35.0"
    pcr.admission.admit_bad_keys = True  # it got past admission somehow: the signer checks too
    pcr.start()
    pod = pcr.pod("web-0")
    made = pcr_body(name="forged", pod=pod, signer=SIGNER, form="pkix")
    other = pcr_body(name="x", pod=pcr.pod("web-1"), signer=SIGNER, form="pkix")
    made.body["spec"]["proofOfPossession"] = other.body["spec"]["proofOfPossession"]
    done = pcr.answered(pcr.fake.create(PCRS, "apps", made.body))
    cond = condition(done)
    assert cond is not None and (cond["type"], cond["reason"]) == (
        "Denied",
        "InvalidProofOfPossession",
    )
    assert "proofOfPossession does not verify" in cond["message"]
    assert pcr.counted("denied", "InvalidProofOfPossession", 1)


def test_a_forged_stub_request_is_denied(pcr: Harness) -> None:
    pcr.admission.admit_bad_keys = True
    pcr.start()
    pod = pcr.pod("web-0")
    made = pcr_body(name="forged", pod=pod, signer=SIGNER)
    der = bytearray(base64.b64decode(made.body["spec"]["stubPKCS10Request"]))
    der[-1] ^= 0x01  # the signature's last byte: the key no longer signed this request
    made.body["spec"]["stubPKCS10Request"] = base64.b64encode(bytes(der)).decode()
    done = pcr.answered(pcr.fake.create(PCRS, "apps", made.body))
    cond = condition(done)
    assert cond is not None and cond["reason"] == "InvalidProofOfPossession"


def test_a_key_type_the_signer_does_not_allow_is_denied_as_unsupported(pcr: Harness) -> None:
    pcr.start({SIGNER: {"key-types": ["ED25519"]}})
    done = pcr.answered(pcr.request(pcr.pod("web-0"), key_type="ECDSAP256"))
    cond = condition(done)
    assert cond is not None and (cond["type"], cond["reason"]) == ("Denied", "UnsupportedKeyType")
    assert "keyType to one of ED25519" in cond["message"]


def test_unknown_and_mismatched_pods_are_denied(pcr: Harness) -> None:
    pcr.start()
    real = pcr.pod("web-0")
    ghost = {
        "metadata": {"name": "ghost-0", "namespace": "apps", "uid": "0000-ghost"},
        "spec": {"nodeName": NODE, "serviceAccountName": "web"},
    }
    impostor = {
        "metadata": {**real["metadata"], "uid": "0000-old-incarnation"},
        "spec": real["spec"],
    }
    other_sa = {"metadata": real["metadata"], "spec": {**real["spec"], "serviceAccountName": "x"}}
    moved = pcr.pod("web-9", node="node-2")
    moved_here = {"metadata": moved["metadata"], "spec": {**moved["spec"], "nodeName": NODE}}
    cases = {
        "PodNotFound": [ghost],
        "PodMismatch": [impostor, other_sa, moved_here],
    }
    for reason, pods in cases.items():
        for pod in pods:
            done = pcr.answered(pcr.request(pod))
            cond = condition(done)
            assert cond is not None and (cond["type"], cond["reason"]) == ("Denied", reason)
            assert pod["metadata"]["name"] in cond["message"]
    assert pcr.counted("denied", "PodMismatch", 3)


def test_a_policy_violation_is_denied_with_the_rule(pcr: Harness) -> None:
    seen: list[tuple[PcrIdentity, PcrNames, str, int]] = []

    def policy(identity: PcrIdentity, names: PcrNames, key_type: str, lifetime: int) -> int | None:
        seen.append((identity, names, key_type, lifetime))
        if identity.namespace == "untrusted":
            raise PermissionDenied('rule "apps-only": namespace untrusted may not get pod names')
        return 7200

    pcr.policy = policy
    pcr.start()
    denied = pcr.answered(pcr.request(pcr.pod("web-0", namespace="untrusted")))
    cond = condition(denied)
    assert cond is not None and (cond["type"], cond["reason"]) == ("Denied", "PolicyViolation")
    assert "apps-only" in cond["message"]
    allowed = pcr.answered(pcr.request(pcr.pod("web-0")))
    leaf = leaf_of(allowed["status"])
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=2)
    assert seen[-1][1].uris == ("spiffe://cluster.local/ns/apps/sa/web",)
    assert seen[-1][2] == "ECDSAP256"


def test_user_annotations_are_denied(pcr: Harness) -> None:
    pcr.start()
    made = pcr_body(name="annotated", pod=pcr.pod("web-0"), signer=SIGNER)
    made.body["spec"]["unverifiedUserAnnotations"] = {"example.com/team": "a"}
    done = pcr.answered(pcr.fake.create(PCRS, "apps", made.body))
    cond = condition(done)
    assert cond is not None and cond["reason"] == "InvalidUnverifiedUserAnnotations"
    assert "example.com/team" in cond["message"]


# --------------------------------------------------------------------------- API behaviour


def test_a_conflict_on_the_status_write_is_retried(pcr: Harness) -> None:
    pcr.start()
    pcr.fake.fail_next(2, 409, method="PUT", path_contains="/status")
    done = pcr.answered(pcr.request(pcr.pod("web-0")))
    assert condition(done)["type"] == "Issued"  # type: ignore[index]
    assert pcr.status_writes(done) == 3


def test_transient_api_errors_leave_the_request_pending_and_it_is_retried(pcr: Harness) -> None:
    pcr.start()
    pcr.fake.fail_next(3, 503, method="GET", path_contains="/pods/")
    done = pcr.answered(pcr.request(pcr.pod("web-0")), timeout=20)
    assert condition(done)["type"] == "Issued"  # type: ignore[index]


def test_a_request_that_disappears_is_forgotten(pcr: Harness) -> None:
    def delete_meanwhile(identity: PcrIdentity, *_: object) -> None:
        for item in pcr.fake.list(PCRS, identity.namespace):
            pcr.fake.delete(PCRS, identity.namespace, item["metadata"]["name"])

    pcr.policy = delete_meanwhile
    pcr.start()
    request = pcr.request(pcr.pod("web-0"))
    pcr.fake.wait_until(lambda: not pcr.fake.list(PCRS, "apps"))
    pcr.fake.wait_until(lambda: pcr.status_writes(request) == 1)
    assert pcr.counted("issued", "Issued", 0)
    (signer,) = pcr.service.signers  # type: ignore[union-attr]
    assert not signer._retries and not signer._answered


def test_the_watch_survives_drops_and_410(pcr: Harness) -> None:
    service = pcr.start()
    (watch,) = service.watches
    path = "/podcertificaterequests"
    pcr.fake.drop_watches(after_events=1)
    pcr.fake.cut_watches()
    first = pcr.answered(pcr.request(pcr.pod("web-0")))
    assert condition(first) is not None
    lists_before = watch.lists
    pcr.fake.gone_next_watches(1, path_contains=path)
    pcr.fake.cut_watches()
    pcr.fake.wait_until(lambda: watch.lists > lists_before)
    second = pcr.answered(pcr.request(pcr.pod("web-1")))
    assert condition(second) is not None
    pcr.fake.expire_history()
    pcr.fake.cut_watches()
    third = pcr.answered(pcr.request(pcr.pod("web-2")))
    assert condition(third) is not None
    assert pcr.fake.count("GET", path, watch=True) >= 4


def test_a_server_that_keeps_answering_410_is_retried_with_backoff(pcr: Harness) -> None:
    """Regression: a watch answered 410 right after a fresh list was listed again at once,
    looping as fast as the server answered. It backs off like any failure (as the informer)."""
    path = "/podcertificaterequests"
    api = make_api_client(KubeSettings(kubeconfig=str(pcr.kubeconfig)))
    backoffs: list[int] = []  # how many requests the server had seen at each backoff

    def backoff(failures: int) -> float:
        backoffs.append(len(pcr.fake.requests))
        return 0.0

    watch = PcrWatch(
        api,
        node=NODE,
        signer=SIGNER,
        on_object=lambda obj, arrived: None,
        on_deleted=lambda obj: None,
        backoff=backoff,
    )
    watch.start()
    try:
        assert watch.wait_listed(30)
        pcr.fake.wait_until(lambda: pcr.fake.count("GET", path, watch=True) >= 1)
        mark = len(pcr.fake.requests)
        pcr.fake.gone_next_watches(5, path_contains=path)
        pcr.fake.cut_watches()
        pcr.fake.wait_until(lambda: pcr.fake.gone_pending == 0 and watch.lists >= 3)
        with pcr.fake._cond:
            indexed = list(enumerate(pcr.fake.requests))[mark:]
        lists = [
            i
            for i, r in indexed
            if path in r.path and r.method == "GET" and r.query.get("watch") not in ("true", "1")
        ]
        assert len(lists) >= 2
        for before, after in itertools.pairwise(lists):
            assert any(before < b <= after for b in backoffs), (lists, backoffs)
    finally:
        watch.stop()


def test_requests_that_arrived_while_the_signer_was_down_are_signed_on_start(
    pcr: Harness,
) -> None:
    pcr.start()
    pcr.stop()
    waiting = [pcr.request(pcr.pod(f"web-{i}")) for i in range(3)]
    pcr.start()
    for request in waiting:
        assert condition(pcr.answered(request))["type"] == "Issued"  # type: ignore[index]
    # Each was written once: the list and the watch do not answer a request twice.
    assert [pcr.status_writes(r) for r in waiting] == [1, 1, 1]


def test_every_answer_is_logged_with_its_reason(
    pcr: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a log field named 'message' made every answer's log line raise."""
    caplog.set_level(logging.INFO, logger="agent")
    pcr.start({SIGNER: {"key-types": ["ED25519"]}})
    pcr.answered(pcr.request(pcr.pod("web-0"), key_type="ED25519"))
    pcr.answered(pcr.request(pcr.pod("web-1"), key_type="ECDSAP256"))
    pcr.fake.wait_until(lambda: len(_answers(caplog)) == 2)
    by_reason = {r.reason: r for r in _answers(caplog)}  # type: ignore[attr-defined]
    assert by_reason["Issued"].levelno == logging.INFO
    assert by_reason["UnsupportedKeyType"].levelno == logging.WARNING
    assert "keyType" in by_reason["UnsupportedKeyType"].detail  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info]


def _answers(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("PodCertificateRequest ")]


def test_a_cluster_without_the_api_is_reported_with_the_flags_it_needs(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No PodCertificateRequest API (feature off): the watch says which API server flags are
    missing, and keeps trying (the admin may turn it on) without touching anything."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    key, cert = make_test_ca("CA")
    api = make_api_client(KubeSettings(kubeconfig=str(fake.write_kubeconfig(tmp_path / "kc"))))
    service = PcrService(
        api,
        node=NODE,
        signers=parse_signers([SIGNER], None),
        ca=StaticCAProvider(CertificateAuthority(cert, key)),
        registry=CollectorRegistry(),
    )
    service.start()
    try:
        (watch,) = service.watches
        fake.wait_until(lambda: fake.count("GET", "/podcertificaterequests") >= 2)
        fake.wait_until(lambda: watch.last_error is not None)
        assert watch.last_error is not None
        assert "--feature-gates=PodCertificateRequest=true" in watch.last_error.message
        assert "--runtime-config=certificates.k8s.io/v1beta1=true" in watch.last_error.message
        assert not watch.wait_listed(0)
    finally:
        service.stop()


def test_node_ca_name_constraints_deny_names_outside_them(pcr: Harness) -> None:
    """Node CA mode: a leaf outside the node CA's name constraints would not verify, so the
    request is denied with the constraint in the message (the agent's own leaf guard)."""
    from cryptography import x509 as _x509

    from agent.pki.name_constraints import PermittedNames, violations

    permitted = PermittedNames.parse(dns=["svc.cluster.local"], uri_hosts=["cluster.local"])

    def guard(subject: _x509.Name, sans: list[_x509.GeneralName]) -> None:
        found = violations(permitted.extension(), subject, sans)
        if found:
            raise PermissionDenied(f"outside the node CA's name constraints: {', '.join(found)}")

    pcr.leaf_guard = guard
    dns = ["${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local"]
    pcr.start({SIGNER: {"dns-names": dns}}, names=(SIGNER, "example.com/pods"))
    inside = pcr.answered(pcr.request(pcr.pod("web-0")))
    assert condition(inside)["type"] == "Issued"  # type: ignore[index]
    outside = pcr.answered(pcr.request(pcr.pod("web-1"), signer="example.com/pods"))
    cond = condition(outside)
    assert cond is not None and (cond["type"], cond["reason"]) == ("Denied", "NameConstraints")
    assert "DNS web-1.apps.pod.cluster.local" in cond["message"]


def test_without_sign_permission_the_request_waits_until_rbac_is_fixed(
    pcr: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    pcr.admission.may_sign = set()
    pcr.start()
    request = pcr.request(pcr.pod("web-0"))
    pcr.fake.wait_until(lambda: pcr.status_writes(request) >= 2)  # refused, and retried
    assert condition(pcr.fake.get(PCRS, "apps", request["metadata"]["name"])) is None
    postponed = [r for r in caplog.records if r.getMessage() == "PCR answer postponed"]
    assert postponed and '"sign" on signers named "cert-agent.io/pod-identity"' in (
        postponed[0].error  # type: ignore[attr-defined]
    )
    pcr.admission.may_sign = {SIGNER}  # the admin applies the component
    assert condition(pcr.answered(request, timeout=30))["type"] == "Issued"  # type: ignore[index]
