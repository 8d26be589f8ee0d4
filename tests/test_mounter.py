"""The mounter: real tmpfs and bind mounts as root, plus mountinfo parsing."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import FailedPrecondition
from agent.volumes.mounter import (
    LinuxMounter,
    MountInfo,
    NoMounter,
    detect_mounter,
    expected_bind_root,
    parse_mountinfo,
    read_mountinfo,
)
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


def test_expected_bind_root_uses_the_longest_containing_mount() -> None:
    mounts = parse_mountinfo(SAMPLE)
    assert expected_bind_root(mounts, "/var/lib/agent data/volumes/v/data") == (
        0,
        39,
        "/volumes/v/data",
    )
    assert expected_bind_root(mounts, "/var/lib/agent data") == (0, 39, "/")
    # A sibling whose name merely starts with the mount point is on the root filesystem.
    assert expected_bind_root(mounts, "/var/lib/agent data2/x") == (
        254,
        0,
        "/var/lib/agent data2/x",
    )


def test_expected_bind_root_inside_a_bind_mount_adds_its_root() -> None:
    mounts = [
        MountInfo(1, 0, 8, 1, "/", "/", ("rw",), (), "ext4", "/dev/sda", ()),
        MountInfo(2, 1, 8, 1, "/srv/state", "/data", ("rw",), (), "ext4", "/dev/sda", ()),
        # A later mount on the same point hides the earlier one.
        MountInfo(3, 2, 0, 50, "/", "/data", ("rw",), (), "tmpfs", "tmpfs", ()),
    ]
    assert expected_bind_root(mounts, "/data/volumes/v") == (0, 50, "/volumes/v")
    assert expected_bind_root(mounts[:2], "/data/volumes/v") == (8, 1, "/srv/state/volumes/v")


# --- NoMounter and detection ---------------------------------------------------------------


def test_no_mounter_refuses_mounts_and_answers_false(tmp_path: Path) -> None:
    m = NoMounter()
    assert m.can_mount is False
    with pytest.raises(FailedPrecondition, match="mount privilege"):
        m.bind_readonly(tmp_path, tmp_path / "t")
    with pytest.raises(FailedPrecondition, match="mount privilege"):
        m.ensure_tmpfs(tmp_path / "t", 1 << 20)
    m.unmount(tmp_path)
    assert m.is_mountpoint(tmp_path) is False
    assert m.is_bind_of(tmp_path, tmp_path) is False
    assert not (tmp_path / "t").exists()


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
        assert m.is_mountpoint(root)
        (root / "marker").write_text("x")
        m.ensure_tmpfs(root, 2 << 20)
        assert len(_entries_at(root)) == 1
        assert (root / "marker").read_text() == "x"

    def test_bind_readonly_blocks_writes_but_source_stays_writable(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        source, target = tmp_path / "source", tmp_path / "pod" / "mount"
        source.mkdir()
        (source / "tls.crt").write_text("cert")
        mounts.append(target)
        m = LinuxMounter()
        m.bind_readonly(source, target)
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
        m.bind_readonly(source, target)
        assert len(_entries_at(target)) == 1

    def test_bind_readonly_makes_an_existing_writable_bind_read_only(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        source, target = tmp_path / "source", tmp_path / "target"
        source.mkdir()
        target.mkdir()
        mounts.append(target)
        _mount("--bind", str(source), str(target))
        m = LinuxMounter()
        m.bind_readonly(source, target)
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
        with pytest.raises(FailedPrecondition, match="another mount"):
            LinuxMounter().bind_readonly(source, target)
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
        m.bind_readonly(payload, target)
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
        assert m.is_bind_of(target, payload)

    def test_is_bind_of_cases(self, tmp_path: Path, mounts: list[Path]) -> None:
        root, target = tmp_path / "root", tmp_path / "target"
        mounts.extend([root, target])
        m = LinuxMounter()
        m.ensure_tmpfs(root, 1 << 20)
        payload, other = root / "volumes" / "v" / "data", root / "volumes" / "w" / "data"
        payload.mkdir(parents=True)
        other.mkdir(parents=True)

        assert not m.is_bind_of(tmp_path / "missing", payload)
        assert not m.is_bind_of(target, payload)  # does not exist yet
        target.mkdir()
        assert not m.is_bind_of(target, payload)  # not a mount point
        assert not m.is_mountpoint(target)

        m.bind_readonly(payload, target)
        assert m.is_bind_of(target, payload)
        assert m.is_mountpoint(target)
        (entry,) = _entries_at(target)
        assert entry.root == "/volumes/v/data"
        assert not m.is_bind_of(target, other)
        assert not m.is_bind_of(target, root)

        m.unmount(target)
        assert not m.is_bind_of(target, payload)
        m.bind_readonly(other, target)
        assert not m.is_bind_of(target, payload)
        assert m.is_bind_of(target, other)

    def test_target_left_on_a_replaced_tmpfs_is_detected_and_healed(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        # An agent restart that remounts its tmpfs: the pod's bind still shows the old one.
        root, target = tmp_path / "root", tmp_path / "target"
        mounts.extend([root, target])
        m = LinuxMounter()
        m.ensure_tmpfs(root, 1 << 20)
        payload = root / "volumes" / "v" / "data"
        write_payload(payload, {"tls.crt": b"old"}, None)
        m.bind_readonly(payload, target)
        subprocess.run(["umount", str(root)], check=True)
        m.ensure_tmpfs(root, 1 << 20)
        write_payload(payload, {"tls.crt": b"new"}, None)

        assert (target / "tls.crt").read_bytes() == b"old"
        assert not m.is_bind_of(target, payload)
        m.unmount(target)
        m.bind_readonly(payload, target)
        assert m.is_bind_of(target, payload)
        assert (target / "tls.crt").read_bytes() == b"new"

    def test_unmount_is_idempotent_and_removes_stacked_mounts(
        self, tmp_path: Path, mounts: list[Path]
    ) -> None:
        target = tmp_path / "target"
        target.mkdir()
        mounts.append(target)
        m = LinuxMounter()
        m.unmount(target)  # nothing mounted
        m.unmount(tmp_path / "missing")
        for i in range(3):
            _mount("-t", "tmpfs", "-o", "size=64k", f"stack{i}", str(target))
        assert len(_entries_at(target)) == 3
        m.unmount(target)
        assert _entries_at(target) == []
        assert not m.is_mountpoint(target)
        assert target.is_dir()  # removing the directory is the caller's job
        m.unmount(target)

    def test_unmount_detaches_a_busy_mount(self, tmp_path: Path, mounts: list[Path]) -> None:
        target = tmp_path / "target"
        target.mkdir()
        mounts.append(target)
        _mount("-t", "tmpfs", "-o", "size=64k", "busy", str(target))
        with open(target / "held-open", "w") as held:
            m = LinuxMounter()
            m.unmount(target)
            assert _entries_at(target) == []
            held.write("still writable through the open file")
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
        m.bind_readonly(payload, target)
        m.bind_readonly(payload, target)
        (entry,) = _entries_at(target)
        assert entry.root == "/volumes/v 1/data"
        assert m.is_mountpoint(target)
        assert m.is_bind_of(target, payload)
        assert (target / "tls.crt").read_bytes() == b"c"
        m.unmount(target)
        assert not m.is_mountpoint(target)
        m.unmount(root)
        assert not m.is_mountpoint(root)
