"""The agent as a real process: the CLI client, restarts, and mount healing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import IS_ROOT, REPO, AgentProcess, kubelet_target, openssl

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, cwd=REPO
    )


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def publish(agent: AgentProcess, target: Path, name: str) -> None:
    result = cli(
        "publish",
        "--endpoint",
        agent.endpoint,
        "--target",
        str(target),
        "--pod-name",
        name,
        "--pod-namespace",
        "elastic",
        "--attr",
        "dns-names=${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    )
    assert result.returncode == 0, result.stderr
    assert "published volume csi-" in result.stdout


def test_cli_publish_gives_a_verified_certificate(agent_process: object, tmp_path: Path) -> None:
    agent = agent_process()  # type: ignore[operator]
    target = kubelet_target(tmp_path / "kubelet", "es-0")
    publish(agent, target, "es-0")
    assert "OK" in openssl("verify", "-CAfile", str(target / "ca.crt"), str(target / "tls.crt"))
    text = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", str(target / "tls.crt"))
    assert "DNS:es-0.elastic.svc.cluster.local" in text

    bad = cli(
        "publish",
        "--endpoint",
        agent.endpoint,
        "--target",
        str(kubelet_target(tmp_path / "kubelet", "bad")),
        "--attr",
        "dns-names=under_score.example.com",
    )
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "csi.cert-agent.io/dns-names" in bad.stderr

    result = cli("unpublish", "--endpoint", agent.endpoint, "--target", str(target))
    assert result.returncode == 0, result.stderr
    assert not target.exists()


def test_restart_keeps_volumes_and_certificates(agent_process: object, tmp_path: Path) -> None:
    first = agent_process()  # type: ignore[operator]
    targets = [kubelet_target(tmp_path / "kubelet", f"es-{i}") for i in range(3)]
    for i, target in enumerate(targets):
        publish(first, target, f"es-{i}")
    serials = [serial_of(t / "tls.crt") for t in targets]
    first.stop()

    second = agent_process()  # type: ignore[operator]
    assert [serial_of(t / "tls.crt") for t in targets] == serials
    if IS_ROOT:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        for target in targets:
            assert f" {target} " in mountinfo
    log = second.stop()
    recovered = [json.loads(line) for line in log.splitlines() if '"volumes recovered"' in line]
    assert [entry["volumes_recovered"] for entry in recovered] == [3], log
    assert "published volume" not in log  # nothing was reissued
    # The start-up timeline the restart bench reads: each step in ms, in the order they ran,
    # adding up to the total (from the first import of the package to the serving socket).
    (serving,) = [json.loads(line) for line in log.splitlines() if '"agent serving"' in line]
    steps = serving["startup_ms"]
    assert list(steps)[:3] == [
        "imports: cli, cryptography.x509",
        "configuration",
        "imports: agent, grpc, prometheus_client, protobuf",
    ]
    assert list(steps)[-2:] == ["status socket, gRPC serving", "total"]
    assert all(isinstance(ms, float) and ms >= 0 for ms in steps.values())
    assert steps["total"] > 0
    assert abs(sum(ms for name, ms in steps.items() if name != "total") - steps["total"]) < 1


@needs_root
def test_restart_heals_a_target_that_lost_its_mount(agent_process: object, tmp_path: Path) -> None:
    first = agent_process()  # type: ignore[operator]
    target = kubelet_target(tmp_path / "kubelet", "es-0")
    publish(first, target, "es-0")
    serial = serial_of(target / "tls.crt")
    first.kill()  # no graceful stop

    subprocess.run(["umount", str(target)], check=True)
    assert not (target / "tls.crt").exists()

    second = agent_process()  # type: ignore[operator]
    assert serial_of(target / "tls.crt") == serial
    with pytest.raises(OSError):
        (target / "x").write_text("x")
    assert "re-binding" not in second.stop()


@needs_root
def test_restart_leaves_a_foreign_mount_alone(agent_process: object, tmp_path: Path) -> None:
    """A mount at the target that is not the payload's bind is never unmounted (issue 8)."""
    first = agent_process()  # type: ignore[operator]
    target = kubelet_target(tmp_path / "kubelet", "es-0")
    publish(first, target, "es-0")
    first.kill()

    # Something the agent did not make, mounted at the target while it was down.
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "not-ours").write_text("x")
    subprocess.run(["umount", str(target)], check=True)
    subprocess.run(["mount", "--bind", str(decoy), str(target)], check=True)

    second = agent_process()  # type: ignore[operator]
    assert (target / "not-ours").read_text() == "x"
    log = second.stop()
    assert "could not mount a recovered volume" in log and "another mount" in log
    assert f" {target} " in Path("/proc/self/mountinfo").read_text()


def test_make_run_defaults_start_without_flags_beyond_standalone(tmp_path: Path) -> None:
    """`cert-agent serve --standalone` needs nothing else to resolve its configuration."""
    from agent.cli import build_parser
    from agent.config import resolve

    args = build_parser().parse_args(["serve", "--standalone"])
    config = resolve(args, environ={})
    assert config.node_id == os.uname().nodename
    assert config.metrics_address == ":9402"
    assert str(config.data_root).startswith("/var/lib/kubelet/plugins/csi.cert-agent.io")
    assert str(config.kubelet_root) == "/var/lib/kubelet"
    assert not config.relaxed_target_paths
    moved = resolve(
        build_parser().parse_args(["serve", "--standalone", "--kubelet-root", "/k"]), {}
    )
    assert str(moved.data_root) == "/k/plugins/csi.cert-agent.io/data"


def test_a_first_issue_that_never_finished_is_finished_on_start(
    agent_process: object, tmp_path: Path
) -> None:
    """The agent died between saving a new volume's metadata and writing its certificate."""
    import time

    from agent.client import PodIdentity, kubelet_volume_id, pod_volume_context
    from agent.volumes.store import VolumeMeta, VolumeState, VolumeStore

    # A first run mounts the payload tmpfs; the unfinished volume is then left inside it.
    agent_process().stop()  # type: ignore[operator]
    target = kubelet_target(tmp_path / "kubelet", "es-0")
    target.parent.mkdir(parents=True)
    volume_id = kubelet_volume_id(str(target.parent), target.name)
    pod = PodIdentity("es-0", "elastic", "0c5e5e0e-3b1f-4c55-9c6a-1f2f0b7c9d11", "default")
    context = pod_volume_context(pod, {"csi.cert-agent.io/dns-names": "es-0.elastic.svc"})
    VolumeStore(tmp_path / "data").save(
        VolumeMeta(
            volume_id=volume_id,
            target_path=str(target),
            volume_context=context,
            readonly=True,
            volume_mount_group=None,
            node_id="node-1",
            state=VolumeState.ISSUING,
            mode="mount" if IS_ROOT else "direct",
        )
    )

    agent = agent_process()  # type: ignore[operator]
    deadline = time.monotonic() + 15
    while not (target / "tls.crt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    ca, crt = str(target / "ca.crt"), str(target / "tls.crt")
    assert "OK" in openssl("verify", "-CAfile", ca, crt)
    meta = VolumeStore(tmp_path / "data").load(volume_id)
    assert meta is not None and meta.state == VolumeState.READY
    assert '"published volume"' in agent.stop()
