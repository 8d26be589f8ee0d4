"""What is mounted where: /proc/self/mountinfo parsed, and the mount a descriptor lives on."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.errors import Internal
from agent.volumes.mount_syscalls import TMPFS_MAGIC, MountIds, fs_magic

# The logger of agent.volumes.mounter: these steps log as part of it, as before the split.
log = logging.getLogger("agent.volumes.mounter")


MOUNTINFO = "/proc/self/mountinfo"


_MOUNT_IDS = MountIds()


_USE_STATX: bool | None = None  # decided by the first mount_id() call


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


def last_mount_at(mounts: list[MountInfo], mount_point: str) -> MountInfo | None:
    """The topmost mount at exactly ``mount_point`` (later lines are mounted on top)."""
    found = None
    for m in mounts:
        if m.mount_point == mount_point:
            found = m
    return found


def mount_id(fd: int) -> int:
    """The id of the mount a descriptor lives on (works for O_PATH): statx(2) where the kernel
    has STATX_MNT_ID, else /proc/self/fdinfo. Both give the same id (not the unique 64-bit one);
    which one is decided once, so two ids compared always come from the same source."""
    global _USE_STATX
    if _USE_STATX is not False:
        found = _MOUNT_IDS.of(fd)
        if found is not None:
            _USE_STATX = True
            return found
        if _USE_STATX is None:
            _USE_STATX = False
    return _fdinfo_mount_id(fd)


def _fdinfo_mount_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise Internal(f"no mnt_id in /proc/self/fdinfo/{fd}")


@dataclass(frozen=True)
class TopMount:
    """The topmost mount at a mount point, as the kernel shows it through a descriptor."""

    mount_id: int
    fs_magic: int
    readonly: bool

    @property
    def is_tmpfs(self) -> bool:
        return self.fs_magic == TMPFS_MAGIC


def top_mount_at(path: str) -> TopMount | None:
    """The topmost mount whose mount point is exactly ``path`` (absolute, symlinks resolved), or
    None when nothing is mounted there (or it does not exist).

    What ``last_mount_at(read_mountinfo(), path)`` answers, from two descriptors: the path
    lives on another mount than its parent only when something is mounted at it. Parsing the
    whole mount table instead cost a start with 5,000 binds in place half a second.
    """
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        mine = mount_id(fd)
        if path != "/":
            parent = os.open(os.path.dirname(path), flags)
            try:
                if mount_id(parent) == mine:
                    return None
            finally:
                os.close(parent)
        return TopMount(mine, fs_magic(fd), bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY))
    finally:
        os.close(fd)
