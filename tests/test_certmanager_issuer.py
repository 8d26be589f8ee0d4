"""The cert-manager issuer against the fake API server and signer, through the real client."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

try:
    import jsonschema
except ImportError:  # optional: the fake's own validator is always used
    jsonschema = None
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    IssuanceFailed,
    PermissionDenied,
    Unavailable,
)
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.issuers.certmanager import (
    ANNOTATION_VOLUME,
    LABEL_NODE,
    LABEL_POD,
    LABEL_VOLUME,
    CertManagerIssuer,
    go_duration,
)
from agent.kube.client import (
    KubeSettings,
    NotFound,
    TokenBucket,
    make_api_client,
    map_api_error,
    with_retries,
)
from agent.kube.rest import ApiClient, KubeApiError
from agent.spec.model import CertificateSpec, IssuerRef, PodInfo
from tests.fakekube import (
    AGENT_USER,
    FakeKube,
    FakeSigner,
    validate_schema,
)

NS = "apps"
POD = PodInfo(
    name="es-0", namespace=NS, uid="6c1f2d4e-0000-4000-8000-000000000001", service_account="es"
)
VOLUME = "csi-" + hashlib.sha256(b"volume-1").hexdigest()
ISSUER = IssuerRef(name="ca-issuer", kind="Issuer", group="cert-manager.io")


@pytest.fixture
def kubeconfig(fake: FakeKube, tmp_path: Path) -> Path:
    return fake.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def api(kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return make_api_client(KubeSettings(kubeconfig=str(kubeconfig)))


@pytest.fixture
def issuer(api: Any) -> CertManagerIssuer:
    return CertManagerIssuer(api, node_id="node-1", driver_name="csi.cert-agent.io")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_for(key: ec.EllipticCurvePrivateKey, dns: str = "es-0.apps.svc") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def make_request(
    csr_pem: bytes,
    spec: CertificateSpec | None = None,
    *,
    volume_id: str = VOLUME,
    pod: PodInfo = POD,
    token: str | None = None,
    node: str = "node-1",
) -> IssueRequest:
    return IssueRequest(
        volume_id=volume_id,
        node_id=node,
        pod=pod,
        spec=spec or CertificateSpec(issuer=ISSUER),
        csr_pem=csr_pem,
        service_account_token=token,
    )


def openssl_verify(tmp_path: Path, issued: IssuedCertificate) -> str:
    ca = tmp_path / "ca.pem"
    leaf = tmp_path / "leaf.pem"
    ca.write_bytes(issued.ca_pem)
    leaf.write_bytes(issued.chain_pem)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# ---------------------------------------------------------------- issuance


def test_issued_certificate_verifies_with_openssl(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer, tmp_path: Path
) -> None:
    key = new_key()
    spec = CertificateSpec(issuer=ISSUER, duration_seconds=3600)
    issued = issuer.issue(make_request(csr_for(key), spec), timeout_seconds=10)

    assert "OK" in openssl_verify(tmp_path, issued)
    assert issued.ca_pem == signer.ca_pem
    assert spki(issued.leaf.public_key()) == spki(key.public_key())
    assert issued.not_after - issued.not_before == __import__("datetime").timedelta(hours=1)
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["es-0.apps.svc"]
    [cr] = fake.list_crs(NS)
    assert cr["spec"]["duration"] == "1h0m0s"
    assert issuer.ready() == (True, "")


def test_cluster_issuer_from_cert_manager_attributes(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer, tmp_path: Path
) -> None:
    """The seed's manifest: csi.cert-manager.io/* attributes naming a ClusterIssuer."""
    from agent.pki.csr import build_csr
    from agent.pki.keys import generate_private_key
    from agent.spec.attributes import parse_volume_context

    spec, pod = parse_volume_context(
        {
            "csi.cert-manager.io/issuer-name": "ca-cluster-issuer",
            "csi.cert-manager.io/issuer-kind": "ClusterIssuer",
            "csi.cert-manager.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
            "csi.cert-manager.io/key-usages": "digital signature,key encipherment,server auth,"
            "client auth",
            "csi.storage.k8s.io/pod.name": "es-1",
            "csi.storage.k8s.io/pod.namespace": NS,
            "csi.storage.k8s.io/pod.uid": "6c1f2d4e-0000-4000-8000-000000000002",
            "csi.storage.k8s.io/serviceAccount.name": "es",
            "csi.storage.k8s.io/ephemeral": "true",
        }
    )
    key = generate_private_key(spec.key)
    issued = issuer.issue(make_request(build_csr(key, spec), spec, pod=pod), timeout_seconds=10)

    openssl_verify(tmp_path, issued)
    [cr] = fake.list_crs(NS)
    assert cr["spec"]["issuerRef"] == {
        "name": "ca-cluster-issuer",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert cr["spec"]["usages"] == [
        "digital signature",
        "key encipherment",
        "server auth",
        "client auth",
    ]
    assert "duration" not in cr["spec"]  # not asked for: cert-manager's default (90 days)
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["es-1.apps.svc"]


def test_ca_falls_back_to_top_of_chain_when_status_ca_is_empty(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer, tmp_path: Path
) -> None:
    signer.include_ca = False
    signer.chain_includes_ca = True
    issued = issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    assert issued.ca_pem == signer.ca_pem
    assert "ca" not in fake.list_crs(NS)[0]["status"]
    openssl_verify(tmp_path, issued)


# ---------------------------------------------------------------- failures


def test_denied_request_is_permission_denied_with_reason_and_message(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    signer.mode = "deny"
    with pytest.raises(PermissionDenied) as info:
        issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    [cr] = fake.list_crs(NS)
    message = info.value.message
    assert f"{NS}/{cr['metadata']['name']}" in message
    assert "policy.cert-manager.io" in message
    assert "No policy approved this request" in message


def test_failed_request_is_issuance_failed_with_reason_and_message(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    signer.mode = "fail"
    with pytest.raises(IssuanceFailed) as info:
        issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    assert info.value.reason == "failed"
    assert "Error signing certificate: the CA key pair is not usable" in info.value.message
    assert fake.list_crs(NS)[0]["metadata"]["name"] in info.value.message


def test_invalid_request_is_issuance_failed(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    signer.mode = "invalid"
    with pytest.raises(IssuanceFailed) as info:
        issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    assert info.value.reason == "invalid_request"
    assert "InvalidRequest (RequestParsingError)" in info.value.message


def test_failed_requests_are_replaced_not_piled_up(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    signer.mode = "deny"
    for _ in range(2):
        with pytest.raises(PermissionDenied):
            issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    assert len(fake.list_crs(NS)) == 1  # the older denied one was deleted
    signer.mode = "issue"
    issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    [cr] = fake.list_crs(NS)
    assert cr["status"]["conditions"][-1]["reason"] == "Issued"


def test_request_deleted_while_waiting(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    signer.mode = "hold"
    thread, box = in_thread(lambda: issuer.issue(make_request(csr_for(new_key())), 10))
    fake.wait_until(lambda: bool(fake.active_watches("certificaterequests")))
    [cr] = fake.list_crs(NS)
    fake.delete(fake.certificate_requests, NS, cr["metadata"]["name"])
    thread.join(10)
    assert isinstance(box.get("error"), IssuanceFailed)
    assert box["error"].reason == "request_deleted"


def test_forbidden_create_names_the_missing_rbac_verb(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    fake.forbid("create", "certificaterequests")
    with pytest.raises(PermissionDenied) as info:
        issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    assert 'cannot create resource "certificaterequests"' in info.value.message
    assert 'API group "cert-manager.io"' in info.value.message


# ---------------------------------------------------------------- slow issuer


def test_slow_issuer_timeout_then_retry_reuses_the_pending_request(
    fake: FakeKube, signer: FakeSigner, api: Any
) -> None:
    signer.mode = "hold"
    key = new_key()
    first = CertManagerIssuer(api, node_id="node-1", driver_name="csi.cert-agent.io")
    with pytest.raises(DeadlineExceeded) as info:
        first.issue(make_request(csr_for(key)), timeout_seconds=0.5)
    [cr] = fake.list_crs(NS)
    name = cr["metadata"]["name"]
    assert f"CertificateRequest {NS}/{name} is not ready after 0.5s" in info.value.message
    assert "stays pending" in info.value.message
    assert "Waiting on certificate issuance" in info.value.message

    # The agent restarted (no memory) and kubelet retries with the same key and a new CSR.
    retry = CertManagerIssuer(api, node_id="node-1", driver_name="csi.cert-agent.io")
    thread, box = in_thread(lambda: retry.issue(make_request(csr_for(key)), 10))
    fake.wait_for_watch(2, "certificaterequests")  # the retry decided and is waiting
    signer.release()
    thread.join(10)
    assert "error" not in box, box.get("error")
    assert spki(box["result"].leaf.public_key()) == spki(key.public_key())
    assert [c["metadata"]["name"] for c in fake.list_crs(NS)] == [name]
    assert fake.count("POST", "certificaterequests") == 1


def test_request_that_became_ready_after_timeout_is_used_by_the_retry(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    signer.mode = "hold"
    key = new_key()
    with pytest.raises(DeadlineExceeded):
        issuer.issue(make_request(csr_for(key)), timeout_seconds=0.3)
    signer.release()
    fake.wait_until(lambda: bool(signer.signed))
    issued = issuer.issue(make_request(csr_for(key)), timeout_seconds=10)
    assert spki(issued.leaf.public_key()) == spki(key.public_key())
    assert len(fake.list_crs(NS)) == 1
    assert fake.count("POST", "certificaterequests") == 1


def test_renewal_with_the_same_key_gets_a_new_certificate(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    """reuse-private-key: an old Ready request of the same key is not the renewal."""
    key = new_key()
    first = issuer.issue(make_request(csr_for(key)), timeout_seconds=10)
    second = issuer.issue(make_request(csr_for(key)), timeout_seconds=10)
    assert first.serial_hex != second.serial_hex
    assert fake.count("POST", "certificaterequests") == 2
    assert len(fake.list_crs(NS)) == 1


# ---------------------------------------------------------------- API trouble


def test_429_and_500_are_retried(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer, tmp_path: Path
) -> None:
    fake.fail_next(1, 429, retry_after=1, method="POST")
    fake.fail_next(2, 500, method="GET", watch=False)
    issued = issuer.issue(make_request(csr_for(new_key())), timeout_seconds=20)
    openssl_verify(tmp_path, issued)
    assert len(fake.list_crs(NS)) == 1
    assert fake.count("POST", "certificaterequests") == 2  # the 429 and the create


def test_api_down_until_deadline_is_unavailable_and_reported_by_ready(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    fake.fail_next(1000, 503, method="GET")
    with pytest.raises(Unavailable) as info:
        issuer.issue(make_request(csr_for(new_key())), timeout_seconds=1)
    assert "HTTP 503" in info.value.message
    ready, why = issuer.ready()
    assert not ready and "503" in why


def test_watch_dropped_mid_wait_still_completes(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    signer.mode = "hold"
    fake.drop_watches(after_events=1, count=1)
    thread, box = in_thread(lambda: issuer.issue(make_request(csr_for(new_key())), 10))
    fake.wait_for_watch(2, "certificaterequests")  # the first one was cut after one event
    fake.cut_watches()  # and an API server restart on top
    fake.wait_for_watch(3, "certificaterequests")
    signer.release()
    thread.join(10)
    assert "error" not in box, box.get("error")
    assert fake.count("POST", "certificaterequests") == 1


def test_watch_answering_410_gone_relists_and_completes(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    signer.mode = "hold"
    fake.gone_next_watches(1)
    thread, box = in_thread(lambda: issuer.issue(make_request(csr_for(new_key())), 10))
    fake.wait_for_watch(2, "certificaterequests")
    assert fake.gone_pending == 0
    signer.release()
    thread.join(10)
    assert "error" not in box, box.get("error")


def test_every_request_passes_the_rate_limiter(
    fake: FakeKube, signer: FakeSigner, api: ApiClient, issuer: CertManagerIssuer
) -> None:
    taken = []
    real = api.limiter.acquire
    api.limiter.acquire = lambda: (taken.append(1), real())[1]  # type: ignore[method-assign]
    issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    assert len(taken) == len(fake.requests) >= 3  # list, create, watch


# ---------------------------------------------------------------- the object we create


def test_owner_reference_labels_and_annotations(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    spec = CertificateSpec(
        issuer=ISSUER,
        annotations=(("policy.example.com/team", "search"),),
        key_usages=("digital signature", "key encipherment", "server auth"),
    )
    issuer.issue(make_request(csr_for(new_key()), spec), timeout_seconds=10)
    [cr] = fake.list_crs(NS)
    meta = cr["metadata"]
    assert meta["name"].startswith("cert-agent-")
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": POD.name,
            "uid": POD.uid,
            "controller": False,
            "blockOwnerDeletion": False,
        }
    ]
    volume_label = meta["labels"][LABEL_VOLUME]
    assert len(VOLUME) == 68 and len(volume_label) <= 63
    assert volume_label == hashlib.sha256(VOLUME.encode()).hexdigest()[:63]
    assert meta["labels"][LABEL_NODE] == "node-1"
    assert meta["labels"][LABEL_POD] == POD.name
    assert meta["annotations"][ANNOTATION_VOLUME] == VOLUME
    assert meta["annotations"]["policy.example.com/team"] == "search"
    assert cr["spec"]["usages"] == ["digital signature", "key encipherment", "server auth"]
    assert cr["spec"]["isCA"] is False
    assert "duration" not in cr["spec"]
    assert cr["spec"]["username"] == AGENT_USER
    assert base64.b64decode(cr["spec"]["request"]).startswith(b"-----BEGIN CERTIFICATE REQUEST")


def test_long_node_name_is_hashed_into_the_label(
    fake: FakeKube, signer: FakeSigner, api: Any
) -> None:
    node = "node-" + "x" * 80 + ".compute.internal"
    iss = CertManagerIssuer(api, node_id=node, driver_name="csi.cert-agent.io")
    iss.issue(make_request(csr_for(new_key()), node=node), timeout_seconds=10)
    meta = fake.list_crs(NS)[0]["metadata"]
    assert len(meta["labels"][LABEL_NODE]) == 63
    assert meta["annotations"]["cert-agent.io/node"] == node


def test_older_requests_of_the_volume_are_deleted(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    other_volume = "csi-" + hashlib.sha256(b"volume-2").hexdigest()
    issuer.issue(make_request(csr_for(new_key()), volume_id=other_volume), timeout_seconds=10)
    issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    [first] = [
        c for c in fake.list_crs(NS) if c["metadata"]["annotations"][ANNOTATION_VOLUME] == VOLUME
    ]
    issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    names = {
        c["metadata"]["annotations"][ANNOTATION_VOLUME]: c["metadata"]["name"]
        for c in fake.list_crs(NS)
    }
    assert len(fake.list_crs(NS)) == 2
    assert names[VOLUME] != first["metadata"]["name"]  # the old one is gone, the new one kept
    assert other_volume in names  # another volume's request is untouched


def test_request_made_as_the_pods_service_account(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    fake.users["pod-token"] = "system:serviceaccount:apps:es"
    issuer.issue(make_request(csr_for(new_key()), token="pod-token"), timeout_seconds=10)
    [cr] = fake.list_crs(NS)
    assert cr["spec"]["username"] == "system:serviceaccount:apps:es"
    posts = [r for r in fake.requests if r.method == "POST"]
    assert [r.user for r in posts] == ["system:serviceaccount:apps:es"]
    others = {r.user for r in fake.requests if r.method != "POST"}
    assert others == {AGENT_USER}  # list, watch and delete stay with the agent


def test_cert_manager_not_installed_is_a_clear_error(
    fake: FakeKube, issuer: CertManagerIssuer
) -> None:
    del fake.resources[("cert-manager.io", "certificaterequests")]
    with pytest.raises(FailedPrecondition) as info:
        issuer.issue(make_request(csr_for(new_key())), timeout_seconds=10)
    assert "install cert-manager" in info.value.message
    assert "the server could not find the requested resource" in info.value.message


def test_admission_webhook_denial_is_invalid_argument_not_rbac() -> None:
    exc = KubeApiError(
        403,
        "Forbidden",
        '{"kind":"Status","code":403,"message":"admission webhook \\"webhook.cert-manager.io\\" '
        'denied the request: spec.isCA: Invalid value"}',
    )
    error = map_api_error(exc, "create certificaterequests")
    assert isinstance(error, InvalidArgument)
    assert "denied the request: spec.isCA" in error.message


def test_created_objects_match_the_crd_schema(fake: FakeKube, issuer: CertManagerIssuer) -> None:
    schema = fake.certificate_requests.schema
    assert schema is not None
    for spec in (
        CertificateSpec(issuer=ISSUER),
        CertificateSpec(issuer=ISSUER, is_ca=True, duration_seconds=90 * 60),
        CertificateSpec(
            issuer=IssuerRef(name="x", kind="AWSPCAClusterIssuer", group="awspca.cert-manager.io"),
            key_usages=("signing", "client auth", "s/mime"),
            annotations=(("a.example.com/b", "c"),),
        ),
    ):
        body = issuer.build_request(make_request(csr_for(new_key()), spec))
        assert validate_schema(body, schema) == []
        if jsonschema is not None:  # a second opinion on types and enums
            jsonschema.validate(body, schema)
    ca_body = issuer.build_request(
        make_request(csr_for(new_key()), CertificateSpec(issuer=ISSUER, is_ca=True))
    )
    assert "cert sign" in ca_body["spec"]["usages"]


def test_schema_violation_is_rejected_with_422_and_mapped(
    fake: FakeKube, signer: FakeSigner, issuer: CertManagerIssuer
) -> None:
    spec = CertificateSpec(issuer=ISSUER, key_usages=("digital signature", "teleportation"))
    with pytest.raises(InvalidArgument) as info:
        issuer.issue(make_request(csr_for(new_key()), spec), timeout_seconds=10)
    assert 'spec.usages[1]: Unsupported value: "teleportation"' in info.value.message
    assert fake.list_crs(NS) == []


def test_go_duration_format() -> None:
    assert go_duration(2160 * 3600) == "2160h0m0s"
    assert go_duration(90 * 60) == "1h30m0s"
    assert go_duration(300) == "5m0s"
    assert go_duration(42) == "42s"


# ---------------------------------------------------------------- kube helpers


def test_with_retries_honours_retry_after_and_maps_errors() -> None:
    slept: list[float] = []
    attempts = [
        KubeApiError(429, "Too Many Requests", headers={"retry-after": "7"}),
        KubeApiError(500, "Internal Server Error"),
    ]

    def call() -> str:
        if attempts:
            raise attempts.pop(0)
        return "ok"

    now = [0.0]
    assert (
        with_retries(call, what="x", deadline=100, clock=lambda: now[0], sleep=slept.append) == "ok"
    )
    assert slept[0] == 7.0 and len(slept) == 2

    def missing() -> None:
        raise KubeApiError(404, "Not Found")

    with pytest.raises(NotFound):
        with_retries(missing, what="get secrets", deadline=100, clock=lambda: now[0])

    def down() -> None:
        raise KubeApiError(503, "Service Unavailable")

    with pytest.raises(Unavailable):
        with_retries(
            down,
            what="list",
            deadline=1,
            clock=lambda: now[0],
            sleep=lambda d: now.__setitem__(0, now[0] + d),
        )


def test_token_bucket_allows_burst_then_qps() -> None:
    now = [0.0]
    slept: list[float] = []
    bucket = TokenBucket(2, 3, clock=lambda: now[0], sleep=slept.append)
    for _ in range(3):
        bucket.acquire()
    assert slept == []
    bucket.acquire()
    assert slept == [0.5]


def test_in_cluster_configuration_when_no_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.kube import kubeconfig
    from agent.pki.ca import ensure_self_signed_ca

    (tmp_path / "token").write_text("in-cluster-token\n")
    (tmp_path / "ca.crt").write_bytes(ensure_self_signed_ca(tmp_path / "ca").cert_pem)
    monkeypatch.setattr(kubeconfig, "SERVICE_ACCOUNT_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    api = make_api_client(KubeSettings(qps=5, burst=7))
    assert api.server == "https://10.96.0.1:443"
    assert api.credentials.token() == "in-cluster-token"
    assert isinstance(api.limiter, TokenBucket)
    assert (api.limiter.qps, api.limiter.burst) == (5.0, 7)


def test_unreadable_kubeconfig_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "nope"
    with pytest.raises(FailedPrecondition) as info:
        make_api_client(KubeSettings(kubeconfig=str(missing)))
    assert str(missing) in info.value.message
