"""Issue 8: the agent never mounts, unmounts or writes anything that is not its own.

The path policy as a pure function, then each attack of the issue against a real agent on its
real socket, inside the test session's private mount namespace (see conftest), with the mount
table compared before and after.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path, PurePosixPath

import grpc
import pytest

from agent.errors import InvalidArgument
from agent.volumes.mounter import LinuxMounter, read_mountinfo
from agent.volumes.paths import NAME_MAX, PATH_MAX, TargetPolicy, canonical_path
from tests.conftest import IS_ROOT, AgentProcess, RunningAgent, kubelet_target

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")
ATTRS = {
    "csi.cert-agent.io/dns-names": "app.default.svc",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}
KUBELET = Path("/var/lib/kubelet")
GOOD = "/var/lib/kubelet/pods/0d7e/volumes/kubernetes.io~csi/tls/mount"


def rule_of(call: object) -> str:
    """The [rule ...] an INVALID_ARGUMENT names."""
    with pytest.raises(InvalidArgument) as info:
        call()  # type: ignore[operator]
    message = info.value.message
    assert "[rule " in message, message
    return message.rsplit("[rule ", 1)[1].rstrip("]")


def rpc_rule(call: object, *args: object) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    details = info.value.details() or ""
    assert "[rule " in details, details
    return details.rsplit("[rule ", 1)[1].rstrip("]")


def table() -> list[tuple[str, str, str, tuple[str, ...]]]:
    return [(m.mount_point, m.fs_type, m.root, m.options) for m in read_mountinfo()]


# --- the policy, pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("//", "/"),
        ("/", "/"),
        ("//var//lib/./kubelet/", "/var/lib/kubelet"),
        ("/a/.../b", "/a/.../b"),  # '...' is a name, not a parent reference
    ],
)
def test_canonical_form_collapses_without_touching_the_filesystem(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == PurePosixPath(canonical)


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        ("", "required"),
        ("relative/mount", "absolute"),
        ("/a/\x00/b", "no-nul"),
        ("/a/../etc", "no-dotdot"),
        ("/a/b/..", "no-dotdot"),
        ("/" + "a" * (NAME_MAX + 1), "name-max"),
        ("/" + "/".join(["a" * 200] * 21), "path-max"),
    ],
)
def test_canonical_form_rejects_with_the_rule(raw: str, rule: str) -> None:
    assert rule_of(lambda: canonical_path(raw)) == rule


def test_path_max_counts_bytes_and_the_terminating_nul() -> None:
    longest = "/" + "/".join(["é" * 100] * 20)  # 2-byte characters
    longest += "/" + "a" * (PATH_MAX - 1 - len(longest.encode()) - 1)
    assert len(longest.encode()) == PATH_MAX - 1
    assert str(canonical_path(longest)) == longest
    assert rule_of(lambda: canonical_path(longest + "a")) == "path-max"


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        ("//", "under-kubelet-root"),  # issue 8 item 1: '//' was taken for a target
        ("/", "under-kubelet-root"),
        ("/etc", "under-kubelet-root"),
        ("/var/lib/kubelet", "under-kubelet-root"),
        ("/var/lib/kubelet-other/pods/u/volumes/kubernetes.io~csi/tls/mount", "under-kubelet-root"),
        ("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/tls", "kubelet-shape"),
        ("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/tls/mount/x", "kubelet-shape"),
        ("/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/tls/mount", "kubelet-shape"),
        ("/var/lib/kubelet/plugins/csi.cert-agent.io/data/volumes", "kubelet-shape"),
    ],
)
def test_targets_outside_kubelets_shape_are_refused(raw: str, rule: str) -> None:
    policy = TargetPolicy(KUBELET, KUBELET / "plugins" / "csi.cert-agent.io" / "data")
    assert rule_of(lambda: policy.check(raw)) == rule


def test_kubelet_shaped_targets_are_accepted_in_canonical_form() -> None:
    policy = TargetPolicy(KUBELET, KUBELET / "plugins" / "csi.cert-agent.io" / "data")
    assert policy.check(GOOD) == PurePosixPath(GOOD)
    assert policy.check("/" + GOOD.replace("/", "//") + "/") == PurePosixPath(GOOD)


def test_data_root_overlap_is_refused_in_every_spelling(tmp_path: Path) -> None:
    """Issue 8 item 2: '//<data-root>/volumes' slipped past is_relative_to."""
    kubelet = tmp_path / "kubelet"
    data = kubelet / "plugins" / "d" / "data"
    data.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(kubelet)  # the data root reached by another spelling
    policy = TargetPolicy(kubelet, data, relaxed_shape=True)
    for raw in (f"{data}", f"/{data}/volumes", f"{data}//volumes/x", f"{kubelet}/plugins"):
        assert rule_of(lambda raw=raw: policy.check(raw)) == "not-data-root", raw
    aliased = TargetPolicy(tmp_path / "alias", data, relaxed_shape=True)
    assert rule_of(lambda: aliased.check(f"{tmp_path}/alias/plugins/d/data/v")) == "not-data-root"
    assert policy.check(f"{kubelet}/pods/x") == PurePosixPath(f"{kubelet}/pods/x")


# --- a real agent: each attack of issue 8 -------------------------------------------------------


def _pod_dir(agent: RunningAgent, uid: str) -> Path:
    target = kubelet_target(agent.tmp / "kubelet", uid)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


@needs_root
def test_double_slash_never_unmounts_the_namespace_root(agent: RunningAgent) -> None:
    """Issue 8 item 1: unpublish and publish of '//' detached the root of the mount namespace."""
    before = table()
    assert rpc_rule(agent.client.unpublish, "no-such-volume", "//") == "under-kubelet-root"
    pod = agent.pod("app")
    request = pod.request(ATTRS)
    request.target_path = "//"
    assert rpc_rule(agent.client.publish, request) == "under-kubelet-root"
    assert table() == before
    # The agent still works, and its keys are still on its tmpfs, not on the disk under it.
    target = agent.publish(agent.pod("after"), ATTRS)
    assert (target / "tls.key").exists()
    volumes = agent.config.data_root / "volumes"
    assert any(m.mount_point == str(volumes) and m.fs_type == "tmpfs" for m in read_mountinfo())


@needs_root
def test_a_symlink_to_root_at_the_target_is_refused(agent: RunningAgent, tmp_path: Path) -> None:
    """Issue 8 items 1 and 4: a symlink at the target was followed to '/' (or to /etc)."""
    decoy = tmp_path / "etc"  # stands in for /etc: must never be mounted over
    decoy.mkdir()
    (decoy / "passwd").write_text("root:x:0:0\n")
    pod = agent.pod("app")
    request = pod.request(ATTRS)
    before = table()
    for pointee in ("/", str(decoy)):
        pod.target.symlink_to(pointee)
        assert rpc_rule(agent.client.publish, request) == "no-symlinks"
        assert rpc_rule(agent.client.unpublish, pod.volume_id, str(pod.target)) == "no-symlinks"
        assert table() == before
        assert pod.target.is_symlink()  # left as it was
        pod.target.unlink()
    assert os.listdir(decoy) == ["passwd"]


@needs_root
def test_a_symlink_in_a_parent_is_never_followed(agent: RunningAgent, tmp_path: Path) -> None:
    """Issue 8 item 4: a symlink at the parent made the agent mkdir and mount outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    pod = agent.pod("app")
    request = pod.request(ATTRS)
    pod.target.parent.rmdir()
    pod.target.parent.symlink_to(outside)  # .../kubernetes.io~csi/tls -> outside
    before = table()
    assert rpc_rule(agent.client.publish, request) == "no-symlinks"
    assert table() == before
    assert os.listdir(outside) == []
    # Higher up too: the pod's directory itself.
    pod_dir = agent.tmp / "kubelet" / "pods" / pod.uid
    pod.target.parent.unlink()
    os.rename(pod_dir, tmp_path / "moved")
    pod_dir.symlink_to(outside)
    assert rpc_rule(agent.client.publish, request) == "no-symlinks"
    assert os.listdir(outside) == []


@needs_root
def test_targets_are_confined_and_no_intermediate_directory_is_created(
    agent: RunningAgent, tmp_path: Path
) -> None:
    """Issue 8 item 4: any target was accepted and its intermediate directories created."""
    pod = agent.pod("app")
    request = pod.request(ATTRS)
    request.target_path = str(tmp_path / "anywhere" / "deep" / "mount")
    assert rpc_rule(agent.client.publish, request) == "under-kubelet-root"
    assert not (tmp_path / "anywhere").exists()
    # Kubelet-shaped, but kubelet never made the parent: the agent makes only 'mount'.
    missing = kubelet_target(agent.tmp / "kubelet", "no-such-pod")
    request.target_path = str(missing)
    assert rpc_rule(agent.client.publish, request) == "parent-exists"
    assert not missing.parent.parent.parent.parent.exists()  # pods/no-such-pod


@needs_root
def test_data_root_via_double_slash_cannot_be_unpublished(agent_factory: object) -> None:
    """Issue 8 item 2: '//<data-root>/volumes' unmounted the payload tmpfs."""
    running: RunningAgent = agent_factory(relaxed_target_paths=True)  # type: ignore[operator]
    data = running.config.data_root
    before = table()
    for raw in (f"/{data}/volumes", f"//{data}", f"{data}/volumes"):
        rule = rpc_rule(running.client.unpublish, "no-such-volume", raw)
        assert rule in ("not-data-root", "under-kubelet-root"), raw
    assert table() == before


@needs_root
def test_unpublish_of_an_unknown_volume_leaves_a_foreign_mount(agent: RunningAgent) -> None:
    """Issue 8 item 3: an unknown volume id unmounted a foreign tmpfs and removed its dir."""
    target = _pod_dir(agent, "foreign-pod")
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "foreign", str(target)], check=True)
    (target / "data").write_text("theirs")
    before = table()
    agent.client.unpublish("no-such-volume", str(target))  # OK: the volume is not ours
    assert table() == before
    assert (target / "data").read_text() == "theirs"
    subprocess.run(["umount", str(target)], check=True)
    # With nothing mounted: an empty directory at a valid target is all it removes...
    (target / "file").write_text("x")
    agent.client.unpublish("no-such-volume", str(target))
    assert (target / "file").exists()
    (target / "file").unlink()
    agent.client.unpublish("no-such-volume", str(target))
    assert not target.exists()
    assert target.parent.is_dir()  # ...never kubelet's directories
    agent.client.unpublish("no-such-volume", str(target))  # idempotent


@needs_root
def test_unpublish_with_another_volumes_target_is_refused(agent: RunningAgent) -> None:
    """Issue 8 item 3: unpublish of A with B's target removed B's bind (answer OK)."""
    a, b = agent.pod("a"), agent.pod("b")
    agent.publish(a, ATTRS)
    agent.publish(b, ATTRS)
    before = table()
    assert rpc_rule(agent.client.unpublish, a.volume_id, str(b.target)) == "volume-target-pair"
    assert table() == before
    assert (b.target / "tls.crt").exists() and (a.target / "tls.crt").exists()
    agent.client.unpublish(b.volume_id, str(b.target))
    assert not b.target.exists()
    assert (a.target / "tls.crt").exists()


@needs_root
def test_restart_does_not_follow_a_symlink_planted_at_the_target(
    agent_process: object, tmp_path: Path
) -> None:
    """Issue 8 item 4: the payload was re-mounted over the symlink's target after a restart."""
    from tests.test_restart import publish

    first: AgentProcess = agent_process()  # type: ignore[operator]
    target = kubelet_target(tmp_path / "kubelet", "es-0")
    publish(first, target, "es-0")
    first.kill()
    decoy = tmp_path / "etc"
    decoy.mkdir()
    subprocess.run(["umount", str(target)], check=True)
    target.rmdir()
    target.symlink_to(decoy)

    before = table()
    second: AgentProcess = agent_process()  # type: ignore[operator]
    log = second.stop()
    assert "no-symlinks" in log
    assert [m for m in table() if m[0] == str(decoy)] == []
    assert [m for m in table() if m not in before] == []
    assert os.listdir(decoy) == []


# --- item 5: read-only in every peer ------------------------------------------------------------


class Peer:
    """A second mount namespace whose copy of a shared mount is a peer of ours (as the host's
    copy of the DaemonSet's pods directory is with Bidirectional propagation)."""

    def __init__(self) -> None:
        # The shell says "ready" from inside the new namespace, then becomes the sleeper.
        self.process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "unchanged",
                "sh",
                "-c",
                "echo ready; exec sleep 600",
            ],
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            raise AssertionError("the peer namespace did not come up")
        assert os.readlink(f"/proc/{self.process.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

    def mounts_at(self, path: Path) -> list[tuple[str, ...]]:
        with open(f"/proc/{self.process.pid}/mountinfo") as f:
            lines = [line.split(" ") for line in f]
        return [tuple(fields[5].split(",")) for fields in lines if fields[4] == str(path)]

    def write(self, path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--mount=/proc/{self.process.pid}/ns/mnt", "sh", "-c", f"echo x > {path}"],
            capture_output=True,
            text=True,
        )

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@needs_root
@pytest.mark.parametrize("mount_api", ["new", "legacy"])
def test_the_bind_is_read_only_in_every_peer_namespace(
    agent_factory: object, tmp_path: Path, mount_api: str
) -> None:
    """Issue 8 item 5: a bind then a read-only remount left the host's peer copy writable."""
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    # The pods directory as the DaemonSet sees it: a shared mount, with a peer on the "host".
    subprocess.run(["mount", "--bind", str(kubelet), str(kubelet)], check=True)
    subprocess.run(["mount", "--make-shared", str(kubelet)], check=True)
    peer = Peer()
    try:
        running: RunningAgent = agent_factory(  # type: ignore[operator]
            mounter=LinuxMounter(mount_api=mount_api)
        )
        pod = running.pod("app")
        target = running.publish(pod, ATTRS)
        ours = [m.options for m in read_mountinfo() if m.mount_point == str(target)]
        theirs = peer.mounts_at(target)
        assert len(ours) == 1 and len(theirs) == 1, (ours, theirs)
        for options in (ours[0], theirs[0]):
            assert "ro" in options and "rw" not in options, options
            assert {"nosuid", "nodev", "noexec"} <= set(options)
        written = peer.write(target / "tls.key")
        assert written.returncode != 0 and "Read-only file system" in written.stderr
        with pytest.raises(OSError) as info:
            (target / "tls.key").write_text("x")
        assert info.value.errno == errno.EROFS

        running.client.unpublish(pod.volume_id, str(target))
        assert peer.mounts_at(target) == []  # the unmount reached the peer too
    finally:
        peer.stop()


@needs_root
def test_the_test_session_runs_in_a_private_mount_namespace() -> None:
    """No agent bug in this suite can reach the machine's own mounts (conftest unshares)."""
    assert os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    for m in read_mountinfo():
        assert not any(f.startswith(("shared:", "master:")) for f in m.optional_fields), m


def _walk_outcome(policy: TargetPolicy, raw: str) -> tuple[str, int]:
    """("ok", inode of the target's parent) or (the rule, 0)."""
    try:
        with policy.open_target(policy.check(raw), create=False) as handle:
            return "ok", os.fstat(handle.parent_fd).st_ino
    except InvalidArgument as exc:
        return exc.message.rsplit("[rule ", 1)[1].rstrip("]"), 0


def test_openat2_and_the_walk_by_hand_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) reaches the target's parent where the
    kernel has it; the walk by hand runs otherwise and names the rule. Both must decide alike."""
    from agent.volumes import paths

    kubelet = tmp_path / "kubelet"
    good = kubelet_target(kubelet, "good")
    good.parent.mkdir(parents=True)
    linked = kubelet_target(kubelet, "linked")
    (kubelet / "pods" / "linked").symlink_to(kubelet / "pods" / "good")
    deep_link = kubelet_target(kubelet, "deep")
    (kubelet / "pods" / "deep" / "volumes").mkdir(parents=True)
    (kubelet / "pods" / "deep" / "volumes" / "kubernetes.io~csi").symlink_to(tmp_path)
    not_dir = kubelet_target(kubelet, "file")
    (kubelet / "pods" / "file").mkdir(parents=True)
    (kubelet / "pods" / "file" / "volumes").write_text("")
    missing = kubelet_target(kubelet, "missing")
    policy = TargetPolicy(kubelet, tmp_path / "data")
    cases = [good, linked, deep_link, not_dir, missing]

    by_openat2 = [_walk_outcome(policy, str(t)) for t in cases]
    assert paths._BENEATH.available is True  # this kernel has it: the fast way was taken
    monkeypatch.setattr(paths._BENEATH, "available", False)
    by_hand = [_walk_outcome(policy, str(t)) for t in cases]
    assert by_openat2 == by_hand
    assert [rule for rule, _ in by_hand] == [
        "ok",
        "no-symlinks",
        "no-symlinks",
        "directories-only",
        "parent-exists",
    ]
    assert by_hand[0][1] == good.parent.stat().st_ino


def test_check_remembers_only_targets_that_pass() -> None:
    """check() is pure, so a publish's second check of its target is a lookup; a target that
    breaks a rule is refused every time, with its rule."""
    policy = TargetPolicy(KUBELET, KUBELET / "plugins" / "csi.cert-agent.io" / "data")
    assert policy.check(GOOD) is policy.check(GOOD)
    bad = GOOD.replace("/tls/", "/../")
    for _ in range(2):
        assert rule_of(lambda: policy.check(bad)) == "no-dotdot"
    equal = TargetPolicy(KUBELET, KUBELET / "plugins" / "csi.cert-agent.io" / "data")
    assert equal == policy  # the memory is not part of the policy's identity
