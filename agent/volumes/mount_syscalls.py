"""The system calls the os module lacks, through ctypes: mount(2), umount2(2), the new mount API,
statx(2) mount ids and openat2(2).

``open_tree``/``mount_setattr``/``move_mount`` (Linux 5.12+) make a bind read-only before it is
attached; ``_Libc`` says whether the kernel has them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import ClassVar

# <sys/mount.h>
MS_RDONLY = 1


MS_NOSUID = 2


MS_NODEV = 4


MS_NOEXEC = 8


MS_REMOUNT = 32


MS_BIND = 4096


MNT_DETACH = 2


UMOUNT_NOFOLLOW = 8


SAFE_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC


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


def load_libc() -> ctypes.CDLL:
    """The C library, for the calls the os module lacks: dlopen(NULL), the process's own symbols
    (libc's among them). ``ctypes.util.find_library("c")`` found the same library by running
    ldconfig, a child process of ~2 ms on every call, three of them before the socket served."""
    return ctypes.CDLL(None, use_errno=True)


class Libc:
    """mount(2), umount2(2) and the new mount API via ctypes; errors are OSError with errno."""

    def __init__(self) -> None:
        lib = load_libc()
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

    def open_tree_fd(self, fd: int, flags: int) -> int:
        """open_tree(2) of the directory ``fd`` refers to (AT_EMPTY_PATH)."""
        return self._check(
            self._syscall(
                ctypes.c_long(SYS_OPEN_TREE),
                ctypes.c_int(fd),
                ctypes.c_char_p(b""),
                ctypes.c_uint(flags | AT_EMPTY_PATH),
            )
        )

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


# statx(2) (glibc's wrapper: its syscall number differs between architectures).
STATX_MNT_ID = 0x1000


_STATX_SIZE = 256


_STATX_MNT_ID_OFFSET = 144  # struct statx: stx_mnt_id follows stx_dev_minor


class MountIds:
    """The mount id of a descriptor in one statx(2) call (Linux 5.8+), or None where the kernel
    or libc cannot say (the caller then reads /proc/self/fdinfo)."""

    def __init__(self) -> None:
        lib = load_libc()
        self._statx = getattr(lib, "statx", None)
        if self._statx is not None:
            self._statx.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_uint,
                ctypes.c_void_p,
            ]
            self._statx.restype = ctypes.c_int

    def of(self, fd: int) -> int | None:
        if self._statx is None:
            return None
        buf = ctypes.create_string_buffer(_STATX_SIZE)
        if self._statx(fd, b"", AT_EMPTY_PATH, STATX_MNT_ID, buf) != 0:
            return None
        mask: int = struct.unpack_from("=I", buf, 0)[0]
        if not mask & STATX_MNT_ID:
            return None
        mount: int = struct.unpack_from("=Q", buf, _STATX_MNT_ID_OFFSET)[0]
        return mount


# <linux/magic.h>
TMPFS_MAGIC = 0x01021994


_fstatfs: ctypes._NamedFuncPointer | None = None


def fs_magic(fd: int) -> int:
    """fstatfs(2)'s f_type of the filesystem ``fd`` lives on (an O_PATH descriptor will do).

    ``os.fstatvfs`` has no f_type; it is the first field of ``struct statfs`` (a long) on every
    64-bit Linux the agent runs on.
    """
    global _fstatfs
    if _fstatfs is None:
        lib = load_libc()
        _fstatfs = lib.fstatfs
        _fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
        _fstatfs.restype = ctypes.c_int
    buf = ctypes.create_string_buffer(256)  # sizeof(struct statfs) is 120 on x86_64 and arm64
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value


def describe_os_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{exc.strerror} ({name})"


# openat2(2) (Linux 5.6+; the number is the same on every architecture, after the 424
# unification), with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS: no symlink and nothing outside the
# starting directory, which is what the target walk (volumes/paths.py) does one component at a
# time.
SYS_OPENAT2 = 437
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_: ClassVar = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class OpenBeneath:
    """openat2(``flags``, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), built once for many calls."""

    def __init__(self, flags: int) -> None:
        # The same arguments on every call (the kernel only reads ``how``): built once; the C
        # library is loaded at the first call, not at import.
        self._how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        self._how_ref = ctypes.byref(self._how)
        self._how_size = ctypes.c_size_t(ctypes.sizeof(_OpenHow))
        self._number = ctypes.c_long(SYS_OPENAT2)
        self._libc: ctypes.CDLL | None = None
        self.available: bool | None = None  # unknown until the first call; False after ENOSYS

    def open(self, path: str, dir_fd: int) -> int | None:
        """A descriptor of ``path`` below ``dir_fd``, or None when the call refused it (the
        caller finds out why by other means) or the kernel lacks openat2."""
        if self.available is False:
            return None
        if self._libc is None:
            self._libc = load_libc()
            self._libc.syscall.restype = ctypes.c_long
        fd = self._libc.syscall(
            self._number,
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(os.fsencode(path)),
            self._how_ref,
            self._how_size,
        )
        if fd < 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # no openat2, or a seccomp filter
                self.available = False
            return None
        self.available = True
        return int(fd)
