"""End to end through the real gRPC socket: publish, mounts, certificates, errors, idempotency."""

from __future__ import annotations

import errno
import os
import ssl
import stat
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from agent.csi import csi_pb2, csi_pb2_grpc
from tests.conftest import IS_ROOT, REPO, Pod, RunningAgent, openssl

ES_ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/other-names": "2.5.4.3=${POD_NAME}.node.es.${POD_NAMESPACE}.es.local",
    "csi.cert-agent.io/key-usages": "digital signature,key encipherment,server auth,client auth",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")


def rpc_error(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def files_of(target: Path) -> set[str]:
    return {name for name in os.listdir(target) if not name.startswith("..")}


def volumes_on_disk(agent: RunningAgent) -> list[str]:
    return sorted(os.listdir(agent.config.data_root / "volumes"))


# ----------------------------------------------------------------------------------- identity


def test_identity_service(agent: RunningAgent) -> None:
    channel = agent.client.channel
    identity = csi_pb2_grpc.IdentityStub(channel)
    info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.cert-agent.io"
    assert info.vendor_version
    caps = identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []
    probe = identity.Probe(csi_pb2.ProbeRequest())
    assert probe.ready.value is True


def test_node_capabilities_info_and_unimplemented(agent: RunningAgent) -> None:
    node = csi_pb2_grpc.NodeStub(agent.client.channel)
    caps = node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    types = [c.rpc.type for c in caps.capabilities]
    assert types == [csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP]
    assert node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "node-1"
    error = rpc_error(node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(volume_id="v"))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    error = rpc_error(node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(volume_id="v"))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------------------------ publish


@needs_root
def test_publish_mounts_a_read_only_verified_certificate(agent: RunningAgent) -> None:
    pod = agent.pod("web-0")
    target = agent.publish(pod, {"csi.cert-agent.io/dns-names": "web.default.svc"}, fs_group=2000)

    assert files_of(target) == {"tls.crt", "tls.key", "ca.crt"}
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert f" {target} " in mountinfo
    with pytest.raises(OSError) as info:
        (target / "intruder").write_text("x")
    assert info.value.errno == errno.EROFS

    assert "OK" in openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.crt"))
    for name in ("tls.crt", "tls.key", "ca.crt"):
        st = (target / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o440, name
        assert st.st_gid == 2000, name
    assert stat.S_IMODE(target.stat().st_mode) == 0o550
    assert (target / "tls.key").read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    # The CA key never enters a pod's volume.
    ca_key = (agent.config.data_root / "ca" / "ca.key").read_bytes()
    for name in files_of(target):
        assert ca_key not in (target / name).read_bytes()


def test_elasticsearch_statefulset_gets_one_certificate_per_pod(
    agent_factory: Any, tmp_path: Path
) -> None:
    # The ECK example's policy allows the transport otherName (the default policy does not).
    agent = agent_factory(policy_file=REPO / "deploy/examples/elasticsearch/policy.yaml")
    pods = [agent.pod(f"es-{i}", namespace="elastic") for i in range(3)]
    targets = [agent.publish(pod, ES_ATTRIBUTES) for pod in pods]

    for pod, target in zip(pods, targets, strict=True):
        verify = openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.crt"))
        assert "OK" in verify
        text = openssl("x509", "-noout", "-text", "-in", str(target / "tls.crt"))
        san_line = text.split("X509v3 Subject Alternative Name:")[1].splitlines()[1].strip()
        sans = sorted(part.strip() for part in san_line.split(","))
        assert sans == sorted(
            [
                f"DNS:{pod.name}.elastic.svc.cluster.local",
                f"othername: commonName::{pod.name}.node.es.elastic.es.local",
            ]
        ), san_line
        assert "TLS Web Server Authentication, TLS Web Client Authentication" in text

    serials = {
        x509.load_pem_x509_certificate((t / "tls.crt").read_bytes()).serial_number for t in targets
    }
    assert len(serials) == 3
    _mutual_tls_handshake(targets[0], targets[1], server_name="es-0.elastic.svc.cluster.local")


def _mutual_tls_handshake(server_dir: Path, client_dir: Path, server_name: str) -> None:
    """es-0 serves, es-1 connects; both sides demand and verify the other's certificate."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=server_dir / "ca.crt")
    server_ctx.load_cert_chain(server_dir / "tls.crt", server_dir / "tls.key")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=client_dir / "ca.crt")
    client_ctx.load_cert_chain(client_dir / "tls.crt", client_dir / "tls.key")

    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            seen["client"] = tls.getpeercert()
            tls.sendall(tls.recv(5))

    thread = threading.Thread(target=serve)
    thread.start()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(b"hello")
        assert tls.recv(5) == b"hello"
        server_cert = tls.getpeercert()
    thread.join(5)
    listener.close()
    assert ("DNS", server_name) in server_cert["subjectAltName"]  # type: ignore[index]
    client_sans = seen["client"]["subjectAltName"]  # type: ignore[index]
    assert ("DNS", "es-1.elastic.svc.cluster.local") in client_sans


def test_cert_manager_prefix_is_accepted_unchanged(agent: RunningAgent) -> None:
    pod = agent.pod("es-0")
    target = agent.publish(
        pod,
        {
            "csi.cert-manager.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
            "csi.cert-manager.io/common-name": "${POD_NAME}.${POD_NAMESPACE}.svc",
            "csi.cert-manager.io/duration": "24h",
        },
    )
    cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=es-0.default.svc"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() == 24 * 3600


def test_publish_is_idempotent_and_conflicts_are_already_exists(agent: RunningAgent) -> None:
    pod = agent.pod("app")
    attributes = {"csi.cert-agent.io/dns-names": "app.default.svc"}
    target = agent.publish(pod, attributes)
    first = (target / "tls.crt").read_bytes()
    agent.publish(pod, attributes)  # the same call again: OK, nothing reissued
    assert (target / "tls.crt").read_bytes() == first

    changed = pod.request({"csi.cert-agent.io/dns-names": "other.default.svc"})
    error = rpc_error(agent.client.publish, changed)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "volume attributes" in (error.details() or "")
    assert (target / "tls.crt").read_bytes() == first  # the working volume is untouched


def test_unpublish_removes_target_and_is_idempotent(agent: RunningAgent) -> None:
    pod = agent.pod("app")
    target = agent.publish(pod, {"csi.cert-agent.io/dns-names": "app.default.svc"})
    agent.client.unpublish(pod.volume_id, str(target))
    assert not target.exists()
    assert f" {target} " not in Path("/proc/self/mountinfo").read_text()
    assert volumes_on_disk(agent) == []
    agent.client.unpublish(pod.volume_id, str(target))  # again: OK
    unknown = agent.pod("never-published")
    unknown.target.parent.mkdir(parents=True)
    agent.client.unpublish(unknown.volume_id, str(unknown.target))  # unknown volume: OK


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"csi.cert-agent.io/dns-names": "bad_name.example.com"}, "csi.cert-agent.io/dns-names"),
        ({"csi.cert-manager.io/dns-names": "-x.example.com"}, "csi.cert-manager.io/dns-names"),
        ({"csi.cert-agent.io/ip-sans": "10.0.0.300"}, "csi.cert-agent.io/ip-sans"),
        ({"csi.cert-agent.io/uri-sans": "not a uri"}, "csi.cert-agent.io/uri-sans"),
        ({"csi.cert-agent.io/email-sans": "nobody"}, "csi.cert-agent.io/email-sans"),
        ({"csi.cert-agent.io/other-names": "nonsense"}, "csi.cert-agent.io/other-names"),
        ({"csi.cert-agent.io/dns-names": "${POD_IP}.x"}, "POD_IP"),
        ({"csi.cert-agent.io/dns-nmes": "a.example.com"}, "csi.cert-agent.io/dns-nmes"),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-manager.io/dns-names": "a.b"},
            "csi.cert-manager.io/dns-names",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/duration": "90d"},
            "csi.cert-agent.io/duration",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/renew-before": "3000h"},
            "csi.cert-agent.io/renew-before",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/key-size": "1024"},
            "csi.cert-agent.io/key-size",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/key-algorithm": "DSA"},
            "csi.cert-agent.io/key-algorithm",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/key-usages": "flying"},
            "csi.cert-agent.io/key-usages",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/certificate-file": "../x"},
            "csi.cert-agent.io/certificate-file",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/fs-group": "0"},
            "csi.cert-agent.io/fs-group",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/pkcs12-enable": "true"},
            "csi.cert-agent.io/pkcs12-password",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.b", "csi.cert-agent.io/reuse-private-key": "yes"},
            "csi.cert-agent.io/reuse-private-key",
        ),
        (
            {"csi.cert-agent.io/dns-names": "a.default.svc", "csi.cert-agent.io/duration": "9000h"},
            "duration",
        ),
        ({}, "identif"),
    ],
)
def test_invalid_attributes_are_invalid_argument_and_leave_nothing(
    agent: RunningAgent, attributes: dict[str, str], named: str
) -> None:
    pod = agent.pod("bad")
    error = rpc_error(agent.client.publish, pod.request(attributes))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert named in (error.details() or ""), error.details()
    assert not pod.target.exists()
    assert volumes_on_disk(agent) == []


def _request_without(pod: Pod, field: str) -> csi_pb2.NodePublishVolumeRequest:
    request = pod.request({"csi.cert-agent.io/dns-names": "a.default.svc"})
    request.ClearField(field)  # type: ignore[arg-type]
    return request


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: _request_without(p, "volume_id"), "volume_id"),
        (lambda p: _request_without(p, "target_path"), "target_path"),
        (lambda p: _request_without(p, "volume_capability"), "volume_capability"),
        (lambda p: p.request({"csi.cert-agent.io/dns-names": "a.b"}, readonly=False), "read"),
    ],
)
def test_missing_or_invalid_csi_fields(agent: RunningAgent, mutate: object, message: str) -> None:
    pod = agent.pod("x")
    error = rpc_error(agent.client.publish, mutate(pod))  # type: ignore[operator]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")


def test_block_and_persistent_volumes_are_refused(agent: RunningAgent) -> None:
    pod = agent.pod("x")
    block = pod.request({"csi.cert-agent.io/dns-names": "a.b"})
    block.volume_capability.block.SetInParent()
    error = rpc_error(agent.client.publish, block)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block" in (error.details() or "")

    persistent = pod.request({"csi.cert-agent.io/dns-names": "a.b"})
    persistent.volume_context["csi.storage.k8s.io/ephemeral"] = "false"
    error = rpc_error(agent.client.publish, persistent)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ephemeral" in (error.details() or "")


def test_target_inside_the_data_root_is_refused(agent_factory: object, tmp_path: Path) -> None:
    # The DaemonSet's layout: the data root lives below the kubelet root (plugins/...).
    data_root = tmp_path / "kubelet" / "plugins" / "csi.cert-agent.io" / "data"
    agent = agent_factory(data_root=data_root, relaxed_target_paths=True)  # type: ignore[operator]
    pod = agent.pod("x")
    request = pod.request({"csi.cert-agent.io/dns-names": "a.b"})
    for target in (f"{data_root}/volumes/evil", f"/{data_root}/volumes", f"{data_root}/..x/../"):
        request.target_path = target
        error = rpc_error(agent.client.publish, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, target
        assert "[rule not-data-root]" in (error.details() or "") or "[rule no-dotdot]" in (
            error.details() or ""
        )
    request.target_path = "relative/path"
    error = rpc_error(agent.client.publish, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[rule absolute]" in (error.details() or "")


def test_pkcs12_keystore_and_custom_file_names(agent: RunningAgent) -> None:
    pod = agent.pod("java")
    target = agent.publish(
        pod,
        {
            "csi.cert-agent.io/dns-names": "java.default.svc",
            "csi.cert-agent.io/certificate-file": "cert.pem",
            "csi.cert-agent.io/privatekey-file": "key.pem",
            "csi.cert-agent.io/ca-file": "root.pem",
            "csi.cert-agent.io/pkcs12-enable": "true",
            "csi.cert-agent.io/pkcs12-password": "s3cret",
            "csi.cert-agent.io/key-encoding": "PKCS8",
        },
    )
    assert files_of(target) == {"cert.pem", "key.pem", "root.pem", "keystore.p12"}
    assert (target / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    info = openssl(
        "pkcs12", "-in", str(target / "keystore.p12"), "-nokeys", "-passin", "pass:s3cret"
    )
    assert "java.default.svc" in info or "BEGIN CERTIFICATE" in info


def test_without_mounts_the_payload_is_written_into_the_target(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a person gets from `make run` without root: files straight in target_path."""
    from agent.server import Agent
    from agent.volumes.mounter import NoMounter
    from tests.conftest import CSIClient, make_config

    config = make_config(tmp_path)
    running = Agent(config, mounter=NoMounter())
    with caplog.at_level("WARNING"):
        running.start()
    try:
        assert "not running as root" in caplog.text
        pod = Pod(tmp_path / "kubelet", "es-0")
        with CSIClient(config.endpoint) as client:
            client.publish(pod.request({"csi.cert-agent.io/dns-names": "es-0.default.svc"}))
            assert f" {pod.target} " not in Path("/proc/self/mountinfo").read_text()
            assert files_of(pod.target) == {"tls.crt", "tls.key", "ca.crt"}
            assert os.readlink(pod.target / "tls.crt") == "..data/tls.crt"
            ca, crt = str(pod.target / "ca.crt"), str(pod.target / "tls.crt")
            assert "OK" in openssl("verify", "-CAfile", ca, crt)
            client.unpublish(pod.volume_id, str(pod.target))
        assert not pod.target.exists()
        assert os.listdir(config.data_root / "volumes") == []
    finally:
        running.stop(grace=0)


def test_a_publish_while_another_runs_for_the_same_volume_is_aborted(agent: RunningAgent) -> None:
    from tests.test_rotation import install_flaky

    flaky = install_flaky(agent)
    flaky.gate.clear()
    flaky.entered.clear()
    pod = agent.pod("slow")
    request = pod.request({"csi.cert-agent.io/dns-names": "slow.default.svc"})
    first = threading.Thread(target=agent.client.publish, args=(request,))
    first.start()
    try:
        assert flaky.entered.wait(10), "the first publish never reached the issuer"
        error = rpc_error(agent.client.publish, request)
        assert error.code() == grpc.StatusCode.ABORTED
        assert "in progress" in (error.details() or "")
    finally:
        flaky.gate.set()
        first.join(10)
    assert (pod.target / "tls.crt").exists()
