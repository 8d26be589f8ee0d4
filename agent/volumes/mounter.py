"""Mounts: the payload tmpfs and the read-only bind of each payload onto the pod's target path.

LinuxMounter calls mount(2)/umount2(2) through ctypes (no subprocess per call) and answers
questions about mounts from descriptors (mount ids, fstatfs), never by parsing the whole
/proc/self/mountinfo (thousands of lines on a node with thousands of volumes). NoMounter is
for running unprivileged: the agent then writes payloads straight into target_path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

from agent.errors import FailedPrecondition, Internal
from agent.volumes.mount_syscalls import (
    MNT_DETACH,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    MS_BIND,
    MS_RDONLY,
    MS_REMOUNT,
    OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE,
    SAFE_FLAGS,
    UMOUNT_NOFOLLOW,
    Libc,
    describe_os_error,
)
from agent.volumes.mountinfo import (
    MountInfo,
    mount_id,
    mount_points_below,
    parse_mountinfo,
    read_mountinfo,
    top_mount_at,
)
from agent.volumes.paths import TargetDir

__all__ = [
    "MNT_DETACH",
    "LinuxMounter",
    "MountInfo",
    "Mounter",
    "NoMounter",
    "detect_mounter",
    "mount_id",
    "mount_points_below",
    "parse_mountinfo",
    "read_mountinfo",
]


log = logging.getLogger(__name__)


# A bound limit on stacked mounts at one target, so a mount storm cannot loop us forever.
_MAX_STACKED = 64


def _real(path: Path) -> str | None:
    """The absolute, symlink-free path, or None when it does not exist."""
    real = os.path.realpath(path)
    return real if os.path.lexists(real) else None


class Mounter(Protocol):
    can_mount: bool

    def ensure_tmpfs(self, path: Path, size_bytes: int) -> None: ...

    def is_tmpfs(self, path: Path) -> bool: ...

    def unmount_tmpfs(self, path: Path) -> None: ...

    def bind_readonly(self, source: Path, target: TargetDir) -> None: ...

    def unmount_bind(self, target: TargetDir, source: Path) -> None: ...

    def is_bind_of(self, target: TargetDir, source: Path) -> bool: ...

    def is_mountpoint(self, target: TargetDir) -> bool: ...


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
        self._libc = Libc()
        self._new_api: bool | None = {"auto": None, "new": True, "legacy": False}[mount_api]
        self._tmpfs_roots: list[str] = []
        self._mounted_tmpfs: dict[str, int] = {}  # mount point -> id of the tmpfs mounted there

    def ensure_tmpfs(self, path: Path, size_bytes: int) -> None:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise Internal(
                f"cannot create tmpfs mount point {path}: {describe_os_error(exc)}"
            ) from exc
        real = os.path.realpath(path)
        if real not in self._tmpfs_roots:
            self._tmpfs_roots.append(real)
        top = top_mount_at(real)
        if top is not None and top.is_tmpfs:
            return
        opts = f"size={int(size_bytes)},mode=0700"
        try:
            self._libc.mount("tmpfs", real, "tmpfs", SAFE_FLAGS, opts)
        except OSError as exc:
            raise Internal(f"cannot mount a tmpfs at {real}: {describe_os_error(exc)}") from exc
        mounted = top_mount_at(real)
        if mounted is not None:
            self._mounted_tmpfs[real] = mounted.mount_id
        log.info("mounted tmpfs (%d bytes) at %s", size_bytes, real)

    def is_tmpfs(self, path: Path) -> bool:
        top = top_mount_at(os.path.realpath(path))
        return top is not None and top.is_tmpfs

    def unmount_tmpfs(self, path: Path) -> None:
        """Unmount a tmpfs that this mounter mounted at ``path`` (a failed start's undo).

        Only the very mount it made (same mount id on top) is unmounted, never with MNT_DETACH;
        a tmpfs it found already there holds live volumes and is never touched.
        """
        real = os.path.realpath(path)
        mine = self._mounted_tmpfs.pop(real, None)
        top = top_mount_at(real)
        if mine is None or top is None or top.mount_id != mine:
            return
        try:
            self._libc.umount2(real, UMOUNT_NOFOLLOW)
        except OSError as exc:
            raise Internal(f"cannot unmount the tmpfs at {real}: {describe_os_error(exc)}") from exc

    def bind_readonly(self, source: Path, target: TargetDir) -> None:
        try:
            src_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise Internal(
                f"cannot bind {source} to {target.raw}: source is not a directory"
            ) from exc
        try:
            # A directory made this instant has no mount to look at.
            if not target.created and self._already_bound(source, src_fd, target):
                return
            self._bind(source, src_fd, target)
            target.created = False  # it holds our bind now
        finally:
            os.close(src_fd)

    def _already_bound(self, source: Path, src_fd: int, target: TargetDir) -> bool:
        """True when our read-only bind is there; refuses a foreign mount at the target and
        removes an older agent's writable bind of the payload."""
        src_stat = os.fstat(src_fd)
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
                    return True
                writable = True
            else:
                writable = False
        if writable:
            # A writable bind of our payload (an older agent's): replace it.
            self.unmount_bind(target, source)
        return False

    def _bind(self, source: Path, src_fd: int, target: TargetDir) -> None:
        with target.open() as fd:
            if fd is None:
                raise Internal(f"cannot bind onto {target.raw}: it went away")
            if self._new_api is not False:
                try:
                    self._bind_new_api(src_fd, fd)
                    self._new_api = True
                except OSError as exc:
                    if exc.errno != errno.ENOSYS or self._new_api:
                        raise Internal(
                            f"cannot bind-mount {source} onto {target.raw}: "
                            f"{describe_os_error(exc)}"
                        ) from exc
                    log.info("the kernel has no new mount API: binding from a read-only view")
                    self._new_api = False
            if self._new_api is False:
                src = _real(source)
                if src is None:
                    raise Internal(f"cannot bind {source} to {target.raw}: it went away")
                self._bind_from_readonly_view(src, fd, target.raw)
        with target.open() as fd:
            if fd is None or not os.fstatvfs(fd).f_flag & os.ST_RDONLY:
                # Never leave a writable view of the payload in the pod.
                self.unmount_bind(target, source)
                raise Internal(f"the bind of {source} onto {target.raw} is not read-only")

    def _bind_new_api(self, src_fd: int, target_fd: int) -> None:
        # The descriptor the caller opened without following a symlink at the payload's place.
        tree = self._libc.open_tree_fd(src_fd, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
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
            raise Internal(
                f"cannot bind-mount {src} onto {shown}: {describe_os_error(exc)}"
            ) from exc

    def _ensure_readonly_view(self, root: str, view: str) -> None:
        """A read-only bind of the payload tmpfs beside it (the legacy source of every bind)."""
        top = top_mount_at(view)
        if top is not None and top.readonly and top.is_tmpfs:
            return
        try:
            os.makedirs(view, mode=0o700, exist_ok=True)
            self._libc.mount(root, view, None, MS_BIND, None)
            self._libc.mount(root, view, None, MS_REMOUNT | MS_BIND | MS_RDONLY | SAFE_FLAGS, None)
        except OSError as exc:
            raise Internal(
                f"cannot make a read-only view of {root}: {describe_os_error(exc)}"
            ) from exc

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
                if not self._is_bind_at(target, fd, src_stat):
                    return
            try:
                self._libc.umount2(target.proc_path, UMOUNT_NOFOLLOW)
                continue
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):
                    return
                if exc.errno != errno.EBUSY:
                    raise Internal(
                        f"cannot unmount {target.raw}: {describe_os_error(exc)}"
                    ) from exc
            # Busy (a process in the pod still has a file open): detach this very mount now,
            # the kernel finishes when the last user goes away.
            with target.open() as fd:
                if not self._is_bind_at(target, fd, src_stat):
                    return
                try:
                    self._libc.umount2(f"/proc/self/fd/{fd}", MNT_DETACH)
                except OSError as exc:
                    raise Internal(
                        f"cannot detach busy mount {target.raw}: {describe_os_error(exc)}"
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
        try:
            src_stat = os.stat(source)
        except OSError:
            return False
        with target.open() as fd:
            return self._is_bind_at(target, fd, src_stat)

    def _is_bind_at(self, target: TargetDir, fd: int | None, src_stat: os.stat_result) -> bool:
        """Whether the mount on top of the target (opened as ``fd``) has the source's root:
        directories cannot be hard-linked, so then it is a bind of the source."""
        return (
            fd is not None
            and self._is_mount_root(target, fd)
            and _same_inode(os.fstat(fd), src_stat)
        )


class NoMounter:
    """Used when the agent cannot mount: payloads are written straight into target_path."""

    can_mount = False

    def __init__(self, reason: str = "not running as root") -> None:
        # Why mounting is off, for the start-up error of a mode that needs it.
        self.reason = reason

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
        return NoMounter("not running as root")
    try:
        libc = Libc()
        probe = tempfile.mkdtemp(prefix=".cert-agent-mount-probe-")
    except OSError as exc:
        log.warning("cannot probe mount support (%s): payloads are written directly", exc)
        return NoMounter(f"cannot make a probe directory in {tempfile.gettempdir()}: {exc}")
    try:
        libc.mount("tmpfs", probe, "tmpfs", SAFE_FLAGS, "size=4k,mode=0700")
        libc.umount2(probe, MNT_DETACH)
    except OSError as exc:
        log.warning("mounting is not permitted (%s): payloads are written directly", exc)
        return NoMounter(f"a probe tmpfs mount failed: {exc}")
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe)
    return LinuxMounter()
