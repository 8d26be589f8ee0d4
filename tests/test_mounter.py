"""The mounter: real tmpfs and bind mounts as root, plus mountinfo parsing."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import FailedPrecondition
from agent.volumes.mounter import (
    LinuxMounter,
    MountInfo,
    NoMounter,
    detect_mounter,
    parse_mountinfo,
    read_mountinfo,
)
from agent.volumes.mountinfo import top_mount_at
from agent.volumes.paths import TargetDir, TargetPolicy
from agent.volumes.store import write_payload

SAMPLE = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    "42 27 0:39 / /var/lib/agent\\040data rw,nosuid,nodev,noexec,relatime shared:5 master:2"
    " - tmpfs tmpfs rw,size=1024k,mode=700\n"
    "43 27 0:39 /volumes/v\\134x/data /pods/a\\011b/mount ro,nosuid - tmpfs tmpfs rw\n"
    "garbage line\n"
    "\n"
)


# --- pure parsing --------------------------------------------------------------------------


def test_parse_mountinfo_fields_and_escapes() -> None:
    mounts = parse_mountinfo(SAMPLE)
    assert [m.mount_id for m in mounts] == [22, 27, 42, 43]
    root = mounts[1]
    assert (root.parent_id, root.major, root.minor, root.root) == (1, 254, 0, "/")
    assert root.optional_fields == ("shared:1",)
    assert (root.fs_type, root.source, root.super_options) == (
        "ext4",
        "/dev/vda",
        ("rw", "discard"),
    )
    data = mounts[2]
    assert data.mount_point == "/var/lib/agent data"
    assert data.optional_fields == ("shared:5", "master:2")
    assert data.options == ("rw", "nosuid", "nodev", "noexec", "relatime")
    assert not data.readonly
    bind = mounts[3]
    assert bind.root == "/volumes/v\\x/data"
    assert bind.mount_point == "/pods/a\tb/mount"
    assert bind.readonly
    assert bind.optional_fields == ()


# --- NoMounter and detection ---------------------------------------------------------------


def test_no_mounter_refuses_mounts_and_answers_false(tmp_path: Path) -> None:
    m = NoMounter()
    assert m.can_mount is False
    with at(tmp_path, tmp_path / "t") as target:
        with pytest.raises(FailedPrecondition, match="mount privilege"):
            m.bind_readonly(tmp_path, target)
        m.unmount_bind(target, tmp_path)
        assert m.is_mountpoint(target) is False
        assert m.is_bind_of(target, tmp_path) is False
    with pytest.raises(FailedPrecondition, match="mount privilege"):
        m.ensure_tmpfs(tmp_path / "t", 1 << 20)


def test_detect_mounter_without_root_is_no_mounter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert isinstance(detect_mounter(), NoMounter)


# --- real mounts ---------------------------------------------------------------------------


def _entries_at(path: Path) -> list[MountInfo]:
    real = os.path.realpath(path)
    return [m for m in read_mountinfo() if m.mount_point == real]


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths the test may mount on; every mount there is removed afterwards, whatever happens."""
    paths: list[Path] = []
    try:
        yield paths
    finally:
        # Deepest first, with the umount tool rather than the code under test.
        for path in sorted(paths, key=lambda p: len(str(p)), reverse=True):
            for _ in range(100):
                if not _entries_at(path):
                    break
                subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
        leaked = [p for p in paths if _entries_at(p)]
        assert not leaked, f"mounts leaked: {leaked}"


@contextlib.contextmanager
def at(root: Path, target: Path, create: bool = True) -> Iterator[TargetDir]:
    """The target held open the agent's way (an O_NOFOLLOW walk below ``root``)."""
    policy = TargetPolicy(root, root / ".no-data-root", relaxed_shape=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with policy.open_target(policy.check(str(target)), create=create) as handle:
        yield handle


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
class TestLinuxMounter:
    def test_detect_mounter_as_root(self) -> None:
        m = detect_mounter()
        assert isinstance(m, LinuxMounter)
        assert m.can_mount is True

    def test_ensure_tmpfs_mounts_once(self, tmp_path: Path, mounts: list[Path]) -> None:
        root = tmp_path / "state" / "root"
        mounts.append(root)
        m = LinuxMounter()
        m.ensure_tmpfs(root, 2 << 20)
        (entry,) = _entries_at(root)
        assert entry.fs_type == "tmpfs"
        assert {"nosuid", "nodev", "noexec"} <= set(entry.options)
        assert "size=2048k" in entry.super_options
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        (root / "marker").write_text("x")
        m.ensure_tmpfs(root, 2 << 20)
        assert len(_entries_at(root)) == 1
        assert (root / "marker").read_text() == "x"

    def test_bind_readonly_blocks_writes_but_source_stays_writable(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        root, target = tmp_path / "root", tmp_path / "pod" / "mount"
        mounts.extend([root, target])
        m = LinuxMounter()
        m.ensure_tmpfs(root, 1 << 20)
        source = root / "source"
        source.mkdir()
        (source / "tls.crt").write_text("cert")
        with at(tmp_path, target) as handle:
            m.bind_readonly(source, handle)
            (entry,) = _entries_at(target)
            assert {"ro", "nosuid", "nodev", "noexec"} <= set(entry.options)
            assert (target / "tls.crt").read_text() == "cert"
            with pytest.raises(OSError) as info:
                (target / "new").write_text("x")
            assert info.value.errno == errno.EROFS
            with pytest.raises(OSError) as info:
                (target / "tls.crt").write_text("overwrite")
            assert info.value.errno == errno.EROFS
            (source / "later").write_text("from the agent")
            assert (target / "later").read_text() == "from the agent"
            # Idempotent: a second call neither fails nor stacks another mount.
            m.bind_readonly(source, handle)
            assert len(_entries_at(target)) == 1

    def test_bind_readonly_replaces_its_own_writable_bind(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        source, target = tmp_path / "source", tmp_path / "target"
        source.mkdir()
        target.mkdir()
        mounts.append(target)
        _mount("--bind", str(source), str(target))  # what an older agent left: a writable bind
        m = LinuxMounter()
        with at(tmp_path, target) as handle:
            m.bind_readonly(source, handle)
        (entry,) = _entries_at(target)
        assert entry.readonly
        with pytest.raises(OSError) as info:
            (target / "x").write_text("x")
        assert info.value.errno == errno.EROFS

    def test_bind_readonly_refuses_a_foreign_mount(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        source, other, target = tmp_path / "source", tmp_path / "other", tmp_path / "target"
        for d in (source, other, target):
            d.mkdir()
        mounts.append(target)
        _mount("--bind", str(other), str(target))
        with at(tmp_path, target) as handle, pytest.raises(FailedPrecondition, match="another"):
            LinuxMounter().bind_readonly(source, handle)
        assert len(_entries_at(target)) == 1

    def test_payload_swap_is_visible_through_the_bind(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        root, target = tmp_path / "root", tmp_path / "pod" / "mount"
        mounts.extend([root, target])
        m = LinuxMounter()
        m.ensure_tmpfs(root, 1 << 20)
        payload = root / "volumes" / "v" / "data"
        write_payload(payload, {"tls.crt": b"cert-1", "tls.key": b"key-1", "old": b"o"}, 2000)
        with at(tmp_path, target) as handle:
            m.bind_readonly(payload, handle)
            assert m.is_bind_of(handle, payload)
        assert (target / "tls.crt").read_bytes() == b"cert-1"
        first = os.readlink(target / "..data")
        st = target.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o550, 2000)

        write_payload(payload, {"tls.crt": b"cert-2", "tls.key": b"key-2"}, 2000)
        assert (target / "tls.crt").read_bytes() == b"cert-2"
        assert (target / "tls.key").read_bytes() == b"key-2"
        assert os.readlink(target / "..data") != first
        assert not (target / "old").exists()
        # The previous generation stays for one more swap (in-flight readers), then goes.
        assert first in os.listdir(target)
        write_payload(payload, {"tls.crt": b"cert-3", "tls.key": b"key-3"}, 2000)
        assert first not in os.listdir(target)

    def test_is_bind_of_cases(self, tmp_path: Path, mounts: list[Path]) -> None:
        root, target = tmp_path / "root", tmp_path / "target"
        mounts.extend([root, target])
        m = LinuxMounter()
        m.ensure_tmpfs(root, 1 << 20)
        payload, other = root / "volumes" / "v" / "data", root / "volumes" / "w" / "data"
        payload.mkdir(parents=True)
        other.mkdir(parents=True)

        with at(tmp_path, target, create=False) as handle:
            assert not m.is_bind_of(handle, payload)  # does not exist yet
            assert not m.is_mountpoint(handle)
            handle.create()
            assert not m.is_bind_of(handle, payload)  # not a mount point
            assert not m.is_mountpoint(handle)

            m.bind_readonly(payload, handle)
            assert m.is_bind_of(handle, payload)
            assert m.is_mountpoint(handle)
            (entry,) = _entries_at(target)
            assert entry.root == "/volumes/v/data"
            assert not m.is_bind_of(handle, other)
            assert not m.is_bind_of(handle, root)
            assert not m.is_bind_of(handle, tmp_path / "missing")

            m.unmount_bind(handle, payload)
            assert not m.is_bind_of(handle, payload)
            assert not m.is_mountpoint(handle)
            m.bind_readonly(other, handle)
            assert not m.is_bind_of(handle, payload)
            assert m.is_bind_of(handle, other)
            m.unmount_bind(handle, payload)  # not payload's bind: left alone
            assert m.is_bind_of(handle, other)

    def test_a_bind_left_on_a_replaced_tmpfs_is_not_the_agents_to_unmount(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        # The tmpfs was replaced under a pod's bind: that bind no longer shows this payload's
        # inode, so the agent cannot prove it its own and leaves it (issue 8: dev+inode only).
        root, target = tmp_path / "root", tmp_path / "target"
        mounts.extend([root, target])
        m = LinuxMounter()
        m.ensure_tmpfs(root, 1 << 20)
        payload = root / "volumes" / "v" / "data"
        write_payload(payload, {"tls.crt": b"old"}, None)
        with at(tmp_path, target) as handle:
            m.bind_readonly(payload, handle)
            subprocess.run(["umount", str(root)], check=True)
            m.ensure_tmpfs(root, 1 << 20)
            write_payload(payload, {"tls.crt": b"new"}, None)

            assert (target / "tls.crt").read_bytes() == b"old"
            assert not m.is_bind_of(handle, payload)
            m.unmount_bind(handle, payload)
            assert len(_entries_at(target)) == 1
            with pytest.raises(FailedPrecondition, match="another mount"):
                m.bind_readonly(payload, handle)

    def test_unmount_bind_removes_its_stacked_binds_and_nothing_else(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        source, target = tmp_path / "source", tmp_path / "target"
        source.mkdir()
        target.mkdir()
        mounts.append(target)
        m = LinuxMounter()
        with at(tmp_path, target) as handle:
            m.unmount_bind(handle, source)  # nothing mounted
            _mount("-t", "tmpfs", "-o", "size=64k", "foreign", str(target))
            for _ in range(3):
                _mount("--bind", str(source), str(target))
            assert len(_entries_at(target)) == 4
            m.unmount_bind(handle, source)
            (left,) = _entries_at(target)
            assert left.fs_type == "tmpfs" and left.source == "foreign"
            m.unmount_bind(handle, source)
            assert len(_entries_at(target)) == 1
            assert m.is_mountpoint(handle)
        with at(tmp_path, tmp_path / "missing", create=False) as handle:
            m.unmount_bind(handle, source)

    def test_unmount_bind_detaches_its_busy_bind(self, tmp_path: Path, mounts: list[Path]) -> None:
        root, target = tmp_path / "root", tmp_path / "target"
        mounts.extend([root, target])
        m = LinuxMounter()
        m.ensure_tmpfs(root, 1 << 20)
        payload = root / "data"
        write_payload(payload, {"tls.crt": b"c"}, None)
        with at(tmp_path, target) as handle:
            m.bind_readonly(payload, handle)
            with open(target / "tls.crt", "rb") as held:
                m.unmount_bind(handle, payload)
                assert _entries_at(target) == []
                assert held.read() == b"c"
        assert os.listdir(target) == []

    def test_paths_with_spaces_and_tabs(self, tmp_path: Path, mounts: list[Path]) -> None:
        root = tmp_path / "agent data"
        target = tmp_path / "pod\tuid" / "my volume" / "mount"
        mounts.extend([root, target])
        m = LinuxMounter()
        m.ensure_tmpfs(root, 1 << 20)
        m.ensure_tmpfs(root, 1 << 20)
        assert len(_entries_at(root)) == 1
        payload = root / "volumes" / "v 1" / "data"
        write_payload(payload, {"tls.crt": b"c"}, None)
        with at(tmp_path, target) as handle:
            m.bind_readonly(payload, handle)
            m.bind_readonly(payload, handle)
            (entry,) = _entries_at(target)
            assert entry.root == "/volumes/v 1/data"
            assert m.is_mountpoint(handle)
            assert m.is_bind_of(handle, payload)
            assert (target / "tls.crt").read_bytes() == b"c"
            m.unmount_bind(handle, payload)
            assert not m.is_mountpoint(handle)

    def test_top_mount_at_agrees_with_the_mount_table(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        # The tmpfs checks at start-up look at two descriptors instead of parsing the whole
        # mount table (thousands of lines with thousands of binds): the table is the oracle.
        def oracle(path: Path) -> tuple[int, bool, bool] | None:
            entries = _entries_at(path)
            if not entries:
                return None
            top = entries[-1]
            return top.mount_id, top.fs_type == "tmpfs", top.readonly

        def seen(path: Path) -> tuple[int, bool, bool] | None:
            top = top_mount_at(os.path.realpath(path))
            return None if top is None else (top.mount_id, top.is_tmpfs, top.readonly)

        tmpfs, bound, stacked = tmp_path / "tmpfs", tmp_path / "bound", tmp_path / "stacked"
        plain = tmpfs / "plain"  # a directory on a tmpfs, with nothing mounted at it
        mounts.extend([tmpfs, bound, stacked])
        for path in (tmpfs, bound, stacked):
            path.mkdir()
        _mount("-t", "tmpfs", "-o", "size=64k", "t", str(tmpfs))
        plain.mkdir()
        _mount("--bind", "-o", "ro", str(tmp_path / "bound"), str(bound))
        _mount("--bind", str(tmpfs), str(stacked))
        _mount("-t", "tmpfs", "-o", "size=64k,ro", "s", str(stacked))
        cases = [tmpfs, plain, bound, stacked, tmp_path, tmp_path / "missing", Path("/")]
        answers = {path: seen(path) for path in cases}
        assert answers == {path: oracle(path) for path in cases}
        assert answers[tmpfs] is not None
        assert answers[tmpfs][1:] == (True, False)
        assert answers[plain] is None and answers[tmp_path / "missing"] is None
        assert answers[bound] is not None
        assert answers[bound][1] is False
        assert answers[stacked] is not None
        assert answers[stacked][1:] == (True, True)
        m = LinuxMounter()
        assert m.is_tmpfs(tmpfs) and m.is_tmpfs(stacked)
        assert not m.is_tmpfs(plain) and not m.is_tmpfs(bound)


def test_a_failed_mount_probe_names_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root with no writable temporary directory cannot probe: the reason travels with the
    NoMounter, so a cluster-mode start says what is wrong instead of 'needs root'."""
    missing = tmp_path / "no-such-tmp"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    mounter = detect_mounter()
    assert isinstance(mounter, NoMounter)
    assert f"cannot make a probe directory in {missing}" in mounter.reason


def test_a_cluster_mode_start_without_mounts_fails_naming_the_reason(tmp_path: Path) -> None:
    from dataclasses import replace

    from agent.server import Agent
    from tests.conftest import make_config

    config = replace(make_config(tmp_path), standalone=False)
    agent = Agent(config, mounter=NoMounter("a probe tmpfs mount failed: [Errno 1] EPERM"))
    with pytest.raises(RuntimeError, match=r"cannot mount \(a probe tmpfs mount failed"):
        agent.start()
