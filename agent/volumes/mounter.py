"""Mounts: the payload tmpfs and the read-only bind of each payload onto the pod's target path.

LinuxMounter calls mount(2)/umount2(2) through ctypes (no subprocess per call) and reads
/proc/self/mountinfo to answer questions about mounts. NoMounter is for running unprivileged:
the agent then writes payloads straight into target_path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.errors import FailedPrecondition, Internal

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_SAFE_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
# A bound limit on stacked mounts at one target, so a mount storm cannot loop us forever.
_MAX_STACKED = 64


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo (see proc(5))."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    optional_fields: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


_OCTAL_RE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash in paths as \ooo.
    return _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse /proc/self/mountinfo text; malformed lines are skipped."""
    mounts = []
    for line in text.split("\n"):  # not splitlines(): paths may hold \x85 or \u2028
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            super_options = fields[sep + 3] if len(fields) > sep + 3 else ""
            major, minor = fields[2].split(":")
            mounts.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    major=int(major),
                    minor=int(minor),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=tuple(fields[5].split(",")),
                    optional_fields=tuple(fields[6:sep]),
                    fs_type=_unescape(fields[sep + 1]),
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(super_options.split(",")) if super_options else (),
                )
            )
        except (ValueError, IndexError):
            if line.strip():
                log.warning("skipping malformed mountinfo line: %r", line)
    return mounts


def read_mountinfo() -> list[MountInfo]:
    with open(MOUNTINFO, "rb") as f:
        return parse_mountinfo(os.fsdecode(f.read()))


def mount_points_below(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (the order to unmount them in)."""
    top = os.path.realpath(root)
    points = {
        m.mount_point
        for m in read_mountinfo()
        if m.mount_point == top or m.mount_point.startswith(top.rstrip("/") + "/")
    }
    return sorted(points, key=len, reverse=True)


def _real(path: Path) -> str | None:
    """The absolute, symlink-free path, or None when it does not exist."""
    real = os.path.realpath(path)
    return real if os.path.lexists(real) else None


def _last_at(mounts: list[MountInfo], mount_point: str) -> MountInfo | None:
    """The topmost mount at exactly ``mount_point`` (later lines are mounted on top)."""
    found = None
    for m in mounts:
        if m.mount_point == mount_point:
            found = m
    return found


def _containing(mounts: list[MountInfo], path: str) -> MountInfo | None:
    """The topmost mount whose mount point is the longest path prefix of ``path``."""
    best: MountInfo | None = None
    for m in mounts:
        mp = m.mount_point
        inside = path == mp or mp == "/" or path.startswith(mp + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    return best


def expected_bind_root(mounts: list[MountInfo], source: str) -> tuple[int, int, str] | None:
    """(major, minor, root) a bind mount of the real path ``source`` shows in mountinfo."""
    host = _containing(mounts, source)
    if host is None:
        return None
    rel = posixpath.relpath(source, host.mount_point)
    root = posixpath.normpath(posixpath.join(host.root, rel)) if rel != "." else host.root
    return host.major, host.minor, root


class Mounter(Protocol):
    can_mount: bool

    def ensure_tmpfs(self, path: Path, size_bytes: int) -> None: ...

    def bind_readonly(self, source: Path, target: Path) -> None: ...

    def unmount(self, target: Path) -> None: ...

    def is_mountpoint(self, path: Path) -> bool: ...

    def is_bind_of(self, target: Path, source: Path) -> bool: ...


class _Libc:
    """mount(2) and umount2(2) via ctypes; errors come back as OSError with errno."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._mount = lib.mount
        self._mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self._mount.restype = ctypes.c_int
        self._umount2 = lib.umount2
        self._umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._umount2.restype = ctypes.c_int

    def mount(
        self, source: str, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        rc = self._mount(
            os.fsencode(source),
            os.fsencode(target),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def umount2(self, target: str, flags: int) -> None:
        if self._umount2(os.fsencode(target), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{exc.strerror} ({name})"


class LinuxMounter:
    """Real mounts; needs CAP_SYS_ADMIN in the mount namespace kubelet's pods dir lives in."""

    can_mount = True

    def __init__(self) -> None:
        self._libc = _Libc()

    def ensure_tmpfs(self, path: Path, size_bytes: int) -> None:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise Internal(f"cannot create tmpfs mount point {path}: {_describe(exc)}") from exc
        real = os.path.realpath(path)
        top = _last_at(read_mountinfo(), real)
        if top is not None and top.fs_type == "tmpfs":
            return
        opts = f"size={int(size_bytes)},mode=0700"
        try:
            self._libc.mount("tmpfs", real, "tmpfs", _SAFE_FLAGS, opts)
        except OSError as exc:
            raise Internal(f"cannot mount a tmpfs at {real}: {_describe(exc)}") from exc
        log.info("mounted tmpfs (%d bytes) at %s", size_bytes, real)

    def bind_readonly(self, source: Path, target: Path) -> None:
        src = _real(source)
        if src is None or not os.path.isdir(src):
            raise Internal(f"cannot bind {source} to {target}: source is not a directory")
        created = not os.path.lexists(target)
        try:
            os.makedirs(target, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise Internal(f"cannot create target directory {target}: {_describe(exc)}") from exc
        dst = os.path.realpath(target)
        # A directory made just now has nothing mounted on it: skip parsing the mount table,
        # which costs milliseconds on a node with hundreds of mounts.
        mounts = [] if created else read_mountinfo()
        top = _last_at(mounts, dst)
        if top is not None:
            if not _matches(top, expected_bind_root(mounts, src)):
                raise FailedPrecondition(
                    f"target {dst} already has another mount ({top.fs_type} {top.root}); "
                    "unmount it before binding the payload"
                )
            if top.readonly:
                return
        else:
            try:
                self._libc.mount(src, dst, None, MS_BIND, None)
            except OSError as exc:
                raise Internal(f"cannot bind-mount {src} onto {dst}: {_describe(exc)}") from exc
        try:
            self._libc.mount(src, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _SAFE_FLAGS, None)
        except OSError as exc:
            # Never leave a writable view of the payload in the pod.
            with contextlib.suppress(OSError):
                self._libc.umount2(dst, MNT_DETACH | UMOUNT_NOFOLLOW)
            raise Internal(f"cannot make bind mount {dst} read-only: {_describe(exc)}") from exc

    def unmount(self, target: Path) -> None:
        dst = _real(target)
        if dst is None:
            return
        for _ in range(_MAX_STACKED):
            if _last_at(read_mountinfo(), dst) is None:
                return
            try:
                self._libc.umount2(dst, UMOUNT_NOFOLLOW)
                continue
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):
                    return  # not (or no longer) a mount point
                if exc.errno != errno.EBUSY:
                    raise Internal(f"cannot unmount {dst}: {_describe(exc)}") from exc
            # Busy (a process in the pod still has a file open): detach it now, the kernel
            # finishes when the last user goes away.
            try:
                self._libc.umount2(dst, MNT_DETACH | UMOUNT_NOFOLLOW)
            except OSError as exc:
                raise Internal(f"cannot detach busy mount {dst}: {_describe(exc)}") from exc
        raise Internal(f"{dst} is still mounted after {_MAX_STACKED} unmounts")

    def is_mountpoint(self, path: Path) -> bool:
        real = _real(path)
        return real is not None and _last_at(read_mountinfo(), real) is not None

    def is_bind_of(self, target: Path, source: Path) -> bool:
        # Directories cannot be hard-linked, so two paths showing the same (device, inode)
        # directory means one is a bind mount of the other. A stat is O(1); parsing mountinfo
        # costs milliseconds once a node holds hundreds of mounts, and recovery asks per volume.
        try:
            dst, src = os.stat(target), os.stat(source)
        except OSError:
            return False
        if os.path.realpath(target) == os.path.realpath(source):
            return False
        return (dst.st_dev, dst.st_ino) == (src.st_dev, src.st_ino)


def _matches(mount: MountInfo, expected: tuple[int, int, str] | None) -> bool:
    return expected is not None and (mount.major, mount.minor, mount.root) == expected


class NoMounter:
    """Used when the agent cannot mount: payloads are written straight into target_path."""

    can_mount = False

    def ensure_tmpfs(self, path: Path, size_bytes: int) -> None:
        raise FailedPrecondition(
            f"cannot mount a tmpfs at {path}: the agent has no mount privilege "
            "(run it as root with CAP_SYS_ADMIN)"
        )

    def bind_readonly(self, source: Path, target: Path) -> None:
        raise FailedPrecondition(
            f"cannot bind {source} onto {target}: the agent has no mount privilege "
            "(run it as root with CAP_SYS_ADMIN)"
        )

    def unmount(self, target: Path) -> None:
        return None

    def is_mountpoint(self, path: Path) -> bool:
        return False

    def is_bind_of(self, target: Path, source: Path) -> bool:
        return False


def detect_mounter() -> Mounter:
    """LinuxMounter when running as root and a probe tmpfs mount works, else NoMounter."""
    if os.geteuid() != 0:
        log.info("not running as root: payloads are written directly, without mounts")
        return NoMounter()
    try:
        libc = _Libc()
        probe = tempfile.mkdtemp(prefix=".cert-agent-mount-probe-")
    except OSError as exc:
        log.warning("cannot probe mount support (%s): payloads are written directly", exc)
        return NoMounter()
    try:
        libc.mount("tmpfs", probe, "tmpfs", _SAFE_FLAGS, "size=4k,mode=0700")
        libc.umount2(probe, MNT_DETACH)
    except OSError as exc:
        log.warning("mounting is not permitted (%s): payloads are written directly", exc)
        return NoMounter()
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe)
    return LinuxMounter()
