"""`cert-agent publish` as a person runs it: rerunning a command is a no-op, and a failed
publish leaves no directory of its own behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, AgentProcess


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, cwd=REPO
    )


def kubelet_target(root: Path, uid: str) -> Path:
    return root / "pods" / uid / "volumes" / "kubernetes.io~csi" / "tls" / "mount"


def test_rerunning_the_same_publish_is_idempotent(agent_process: object, tmp_path: Path) -> None:
    agent: AgentProcess = agent_process()  # type: ignore[operator]
    target = kubelet_target(tmp_path / "kubelet", "pod-1")
    args = ["publish", "--endpoint", agent.endpoint, "--target", str(target)]
    args += ["--pod-name", "es-0", "--attr", "dns-names=es-0.default.svc"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    certificate = (target / "tls.crt").read_bytes()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == first.stdout.splitlines()[0]
    assert (target / "tls.crt").read_bytes() == certificate  # the same volume, not reissued
    # A different target is a different pod: its own UID, its own volume.
    other = kubelet_target(tmp_path / "kubelet", "pod-2")
    args[args.index(str(target))] = str(other)
    assert cli(*args).returncode == 0
    assert (other / "tls.crt").read_bytes() != certificate
    # An explicit --pod-uid still wins (and, differing, is a different volume context).
    explicit = cli(*args, "--pod-uid", "11111111-2222-3333-4444-555555555555")
    assert explicit.returncode == 1 and "ALREADY_EXISTS" in explicit.stderr


def test_failed_publish_leaves_no_parent_directory(agent_process: object, tmp_path: Path) -> None:
    agent: AgentProcess = agent_process()  # type: ignore[operator]
    (tmp_path / "kubelet").mkdir()
    target = kubelet_target(tmp_path / "kubelet", "pod-bad")
    result = cli(
        "publish", "--endpoint", agent.endpoint, "--target", str(target),
        "--attr", "dns-names=not_a_host",
    )  # fmt: skip
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr
    assert sorted(p.name for p in (tmp_path / "kubelet").iterdir()) == []


def test_failed_publish_keeps_directories_that_existed(
    agent_process: object, tmp_path: Path
) -> None:
    agent: AgentProcess = agent_process()  # type: ignore[operator]
    target = kubelet_target(tmp_path / "kubelet", "pod-bad")
    target.parent.mkdir(parents=True)
    (target.parent / "keep").write_text("someone else's")
    result = cli(
        "publish", "--endpoint", agent.endpoint, "--target", str(target),
        "--attr", "dns-names=not_a_host",
    )  # fmt: skip
    assert result.returncode == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["keep"]
