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
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from agent.errors import FailedPrecondition, Internal
from agent.volumes.paths import TargetDir

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


class Mounter(Protocol):
    can_mount: bool

    def ensure_tmpfs(self, path: Path, size_bytes: int) -> None: ...

    def is_tmpfs(self, path: Path) -> bool: ...

    def unmount_tmpfs(self, path: Path) -> None: ...

    def bind_readonly(self, source: Path, target: TargetDir) -> None: ...

    def unmount_bind(self, target: TargetDir, source: Path) -> None: ...

    def is_bind_of(self, target: TargetDir, source: Path) -> bool: ...

    def is_mountpoint(self, target: TargetDir) -> bool: ...


# The new mount API (Linux 5.2+; mount_setattr 5.12+). The numbers are the same on every
# architecture (they come after the 424 unification of the syscall tables).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


class _MountAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _Libc:
    """mount(2), umount2(2) and the new mount API via ctypes; errors are OSError with errno."""

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
        self._syscall = lib.syscall
        self._syscall.restype = ctypes.c_long

    @staticmethod
    def _check(rc: int) -> int:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return rc

    def mount(
        self, source: str, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        self._check(
            self._mount(
                os.fsencode(source),
                os.fsencode(target),
                fstype.encode() if fstype else None,
                flags,
                data.encode() if data else None,
            )
        )

    def umount2(self, target: str, flags: int) -> None:
        self._check(self._umount2(os.fsencode(target), flags))

    def open_tree(self, path: str, flags: int) -> int:
        return self._check(
            self._syscall(
                ctypes.c_long(SYS_OPEN_TREE),
                ctypes.c_int(AT_FDCWD),
                ctypes.c_char_p(os.fsencode(path)),
                ctypes.c_uint(flags),
            )
        )

    def mount_setattr(self, fd: int, attr_set: int) -> None:
        attr = _MountAttr(attr_set, 0, 0, 0)
        self._check(
            self._syscall(
                ctypes.c_long(SYS_MOUNT_SETATTR),
                ctypes.c_int(fd),
                ctypes.c_char_p(b""),
                ctypes.c_uint(AT_EMPTY_PATH),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            )
        )

    def move_mount(self, from_fd: int, to_fd: int) -> None:
        self._check(
            self._syscall(
                ctypes.c_long(SYS_MOVE_MOUNT),
                ctypes.c_int(from_fd),
                ctypes.c_char_p(b""),
                ctypes.c_int(to_fd),
                ctypes.c_char_p(b""),
                ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
            )
        )


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{exc.strerror} ({name})"


def mount_id(fd: int) -> int:
    """The id of the mount a descriptor lives on (/proc/self/fdinfo; works for O_PATH)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise Internal(f"no mnt_id in /proc/self/fdinfo/{fd}")


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class LinuxMounter:
    """Real mounts; needs CAP_SYS_ADMIN in the mount namespace kubelet's pods dir lives in.

    The payload is bound onto a target already read-only: with the new mount API the detached
    copy made by ``open_tree`` gets ``MOUNT_ATTR_RDONLY`` before ``move_mount`` attaches it, so
    the copies that shared propagation makes (the host's, with Bidirectional propagation) are
    read-only from their first instant. A bind followed by a read-only remount would leave those
    copies writable, because a remount does not propagate. Kernels without the new API bind from
    a read-only view of the payload tmpfs instead (a bind inherits its source mount's flags).
    ``mount_api`` forces one way ("new" or "legacy"); "auto" tries the new API first.
    """

    can_mount = True

    def __init__(self, mount_api: str = "auto") -> None:
        self._libc = _Libc()
        self._new_api: bool | None = {"auto": None, "new": True, "legacy": False}[mount_api]
        self._tmpfs_roots: list[str] = []
        self._mounted_tmpfs: dict[str, MountInfo | None] = {}

    def ensure_tmpfs(self, path: Path, size_bytes: int) -> None:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise Internal(f"cannot create tmpfs mount point {path}: {_describe(exc)}") from exc
        real = os.path.realpath(path)
        if real not in self._tmpfs_roots:
            self._tmpfs_roots.append(real)
        top = _last_at(read_mountinfo(), real)
        if top is not None and top.fs_type == "tmpfs":
            return
        opts = f"size={int(size_bytes)},mode=0700"
        try:
            self._libc.mount("tmpfs", real, "tmpfs", _SAFE_FLAGS, opts)
        except OSError as exc:
            raise Internal(f"cannot mount a tmpfs at {real}: {_describe(exc)}") from exc
        self._mounted_tmpfs[real] = _last_at(read_mountinfo(), real)
        log.info("mounted tmpfs (%d bytes) at %s", size_bytes, real)

    def is_tmpfs(self, path: Path) -> bool:
        top = _last_at(read_mountinfo(), os.path.realpath(path))
        return top is not None and top.fs_type == "tmpfs"

    def unmount_tmpfs(self, path: Path) -> None:
        """Unmount a tmpfs that this mounter mounted at ``path`` (a failed start's undo).

        Only the very mount it made (same mount id on top) is unmounted, never with MNT_DETACH;
        a tmpfs it found already there holds live volumes and is never touched.
        """
        real = os.path.realpath(path)
        mine = self._mounted_tmpfs.pop(real, None)
        top = _last_at(read_mountinfo(), real)
        if mine is None or top is None or top.mount_id != mine.mount_id:
            return
        try:
            self._libc.umount2(real, UMOUNT_NOFOLLOW)
        except OSError as exc:
            raise Internal(f"cannot unmount the tmpfs at {real}: {_describe(exc)}") from exc

    def bind_readonly(self, source: Path, target: TargetDir) -> None:
        src = _real(source)
        if src is None or not os.path.isdir(src):
            raise Internal(f"cannot bind {source} to {target.raw}: source is not a directory")
        src_stat = os.stat(src)
        with target.open() as fd:
            if fd is None:
                raise Internal(f"cannot bind onto {target.raw}: it does not exist")
            if self._is_mount_root(target, fd):
                if not _same_inode(os.fstat(fd), src_stat):
                    raise FailedPrecondition(
                        f"target {target.raw} already has another mount; the agent unmounts "
                        "only its own binds: unmount it before publishing"
                    )
                if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
                    return  # already our read-only bind
                writable = True
            else:
                writable = False
        if writable:
            # A writable bind of our payload (an older agent's): replace it.
            self.unmount_bind(target, source)
        with target.open() as fd:
            if fd is None:
                raise Internal(f"cannot bind onto {target.raw}: it went away")
            if self._new_api is not False:
                try:
                    self._bind_new_api(src, fd)
                    self._new_api = True
                except OSError as exc:
                    if exc.errno != errno.ENOSYS or self._new_api:
                        raise Internal(
                            f"cannot bind-mount {src} onto {target.raw}: {_describe(exc)}"
                        ) from exc
                    log.info("the kernel has no new mount API: binding from a read-only view")
                    self._new_api = False
            if self._new_api is False:
                self._bind_from_readonly_view(src, fd, target.raw)
        with target.open() as fd:
            if fd is None or not os.fstatvfs(fd).f_flag & os.ST_RDONLY:
                # Never leave a writable view of the payload in the pod.
                self.unmount_bind(target, source)
                raise Internal(f"the bind of {src} onto {target.raw} is not read-only")

    def _bind_new_api(self, src: str, target_fd: int) -> None:
        tree = self._libc.open_tree(src, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_SYMLINK_NOFOLLOW)
        try:
            self._libc.mount_setattr(
                tree, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
            )
            self._libc.move_mount(tree, target_fd)
        finally:
            os.close(tree)

    def _bind_from_readonly_view(self, src: str, target_fd: int, shown: str) -> None:
        root = next(
            (r for r in self._tmpfs_roots if src == r or src.startswith(r.rstrip("/") + "/")),
            None,
        )
        if root is None:
            raise Internal(f"cannot bind {src} read-only: it is not on the agent's tmpfs")
        view = root + ".ro"
        self._ensure_readonly_view(root, view)
        source = view + src[len(root) :]
        try:
            self._libc.mount(source, f"/proc/self/fd/{target_fd}", None, MS_BIND, None)
        except OSError as exc:
            raise Internal(f"cannot bind-mount {src} onto {shown}: {_describe(exc)}") from exc

    def _ensure_readonly_view(self, root: str, view: str) -> None:
        """A read-only bind of the payload tmpfs beside it (the legacy source of every bind)."""
        top = _last_at(read_mountinfo(), view)
        if top is not None and top.readonly and top.fs_type == "tmpfs":
            return
        try:
            os.makedirs(view, mode=0o700, exist_ok=True)
            self._libc.mount(root, view, None, MS_BIND, None)
            self._libc.mount(root, view, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _SAFE_FLAGS, None)
        except OSError as exc:
            raise Internal(f"cannot make a read-only view of {root}: {_describe(exc)}") from exc

    def unmount_bind(self, target: TargetDir, source: Path) -> None:
        """Unmount the binds of ``source`` stacked on top of the target; nothing else, ever.

        Each round checks that the topmost mount at the target is a bind of the source (device
        and inode of its root against the source's), then unmounts it through the held parent
        directory with UMOUNT_NOFOLLOW; a busy one is detached through a descriptor of that
        very mount, so MNT_DETACH never reaches anything but the agent's own bind.
        """
        try:
            src_stat = os.stat(source)
        except FileNotFoundError:
            return
        for _ in range(_MAX_STACKED):
            with target.open() as fd:
                if fd is None or not self._is_mount_root(target, fd):
                    return
                if not _same_inode(os.fstat(fd), src_stat):
                    return
            try:
                self._libc.umount2(target.proc_path, UMOUNT_NOFOLLOW)
                continue
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):
                    return
                if exc.errno != errno.EBUSY:
                    raise Internal(f"cannot unmount {target.raw}: {_describe(exc)}") from exc
            # Busy (a process in the pod still has a file open): detach this very mount now,
            # the kernel finishes when the last user goes away.
            with target.open() as fd:
                if fd is None or not self._is_mount_root(target, fd):
                    return
                if not _same_inode(os.fstat(fd), src_stat):
                    return
                try:
                    self._libc.umount2(f"/proc/self/fd/{fd}", MNT_DETACH)
                except OSError as exc:
                    raise Internal(
                        f"cannot detach busy mount {target.raw}: {_describe(exc)}"
                    ) from exc
        raise Internal(f"{target.raw} is still mounted after {_MAX_STACKED} unmounts")

    @staticmethod
    def _is_mount_root(target: TargetDir, fd: int) -> bool:
        """Whether something is mounted at the target: it lives on another mount than its parent."""
        return mount_id(fd) != mount_id(target.parent_fd)

    def is_mountpoint(self, target: TargetDir) -> bool:
        with target.open() as fd:
            return fd is not None and self._is_mount_root(target, fd)

    def is_bind_of(self, target: TargetDir, source: Path) -> bool:
        # Directories cannot be hard-linked, so a mount at the target whose root is the source's
        # (device, inode) is a bind of the source.
        try:
            src_stat = os.stat(source)
        except OSError:
            return False
        with target.open() as fd:
            if fd is None or not self._is_mount_root(target, fd):
                return False
            return _same_inode(os.fstat(fd), src_stat)


class NoMounter:
    """Used when the agent cannot mount: payloads are written straight into target_path."""

    can_mount = False

    def ensure_tmpfs(self, path: Path, size_bytes: int) -> None:
        raise FailedPrecondition(
            f"cannot mount a tmpfs at {path}: the agent has no mount privilege "
            "(run it as root with CAP_SYS_ADMIN)"
        )

    def is_tmpfs(self, path: Path) -> bool:
        return False

    def unmount_tmpfs(self, path: Path) -> None:
        return None

    def bind_readonly(self, source: Path, target: TargetDir) -> None:
        raise FailedPrecondition(
            f"cannot bind {source} onto {target.raw}: the agent has no mount privilege "
            "(run it as root with CAP_SYS_ADMIN)"
        )

    def unmount_bind(self, target: TargetDir, source: Path) -> None:
        return None

    def is_mountpoint(self, target: TargetDir) -> bool:
        return False

    def is_bind_of(self, target: TargetDir, source: Path) -> bool:
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
