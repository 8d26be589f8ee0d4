"""The one path policy: every target_path from a request passes here before any filesystem call.

Two steps, in this order:

1. ``TargetPolicy.check`` is pure (it never touches the filesystem): it computes the canonical
   form (``//`` and ``.`` collapsed, trailing ``/`` dropped) and rejects NUL, relative paths,
   ``..``, paths longer than ``PATH_MAX`` and components longer than ``NAME_MAX``. The canonical
   path must lie below the kubelet root (``--kubelet-root``) in kubelet's shape
   ``<kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount`` (or anywhere below the
   kubelet root with ``--relaxed-target-paths``) and must not overlap the agent's data root.

2. ``open_target`` reaches the target by an ``openat(2)`` walk: the kubelet root is opened once
   (it is the operator's configuration, so a symlink *in the configured root itself* is
   followed), then every component below it is opened with ``O_PATH | O_NOFOLLOW |
   O_DIRECTORY`` relative to the previous one. That is ``openat2(RESOLVE_BENEATH |
   RESOLVE_NO_SYMLINKS)`` semantics done by hand (portable to kernels and libcs without
   openat2; where the kernel has openat2, one call does the walk to the target's parent, and
   the walk by hand runs only when it refuses, to name the rule): a symlink anywhere below the
   root fails the walk, and because each step holds a
   descriptor of the directory it came from, swapping a component for a symlink between the
   check and the use cannot redirect the agent — the mount, mkdir and rmdir that follow use the
   descriptors (``/proc/self/fd/N``, ``*at`` calls), never the path string again.

The agent creates only the final ``mount`` directory (kubelet creates its parent) and removes
only that directory, and only when it is empty.

Every violation is ``INVALID_ARGUMENT`` naming the rule, such as ``[rule no-dotdot]``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent.errors import Internal, InvalidArgument, shorten
from agent.volumes.mount_syscalls import OpenBeneath

# <linux/limits.h>: PATH_MAX counts the terminating NUL; NAME_MAX is per component, in bytes.
PATH_MAX = 4096
NAME_MAX = 255
CSI_PLUGIN_DIR = "kubernetes.io~csi"
TARGET_DIR_MODE = 0o750

_WALK_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


_PASSED_MAX = 4096


def _show(raw: str) -> str:
    return repr(shorten(raw))


class PathMissing(InvalidArgument):
    """A directory on the way to the target does not exist (rule parent-exists)."""


def _violation(raw: str, rule: str, why: str) -> InvalidArgument:
    cls = PathMissing if rule == "parent-exists" else InvalidArgument
    return cls(f"target_path {_show(raw)} {why} [rule {rule}]", "target_path")


def canonical_path(raw: str) -> PurePosixPath:
    """The canonical form of an absolute path, computed without touching the filesystem."""
    return PurePosixPath(_joined(_canonical_parts(raw)))


def _canonical_parts(raw: str) -> list[str]:
    """The components of ``raw``'s canonical form, or the violation (plain strings: the policy
    runs on every request, and pathlib's parsing was a sixth of a publish's own time)."""
    if not raw:
        raise InvalidArgument("target_path is required [rule required]", "target_path")
    if "\x00" in raw:
        raise _violation(raw, "no-nul", "contains a NUL byte")
    if not raw.startswith("/"):
        raise _violation(raw, "absolute", "must be an absolute path")
    if len(os.fsencode(raw)) >= PATH_MAX:
        raise _violation(raw, "path-max", f"is longer than PATH_MAX ({PATH_MAX - 1} bytes)")
    # Splitting on "/" and dropping empty parts collapses "//" everywhere, including a leading
    # "//" (which os.path.normpath keeps, POSIX allowing it a special meaning).
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _violation(raw, "no-dotdot", "must not contain '..'")
    for part in parts:
        # At most 4 bytes a character (raw encoded above), so short parts need no encoding.
        if len(part) > NAME_MAX // 4 and len(os.fsencode(part)) > NAME_MAX:
            raise _violation(
                raw, "name-max", f"has a component longer than NAME_MAX ({NAME_MAX} bytes)"
            )
    return parts


def _joined(parts: list[str] | tuple[str, ...]) -> str:
    return "/" + "/".join(parts)


def _below(path: str, root: str) -> bool:
    """Whether canonical ``path`` lies strictly below canonical ``root``."""
    return path != root and path.startswith(root if root == "/" else root + "/")


def _overlaps(a: str, b: str) -> bool:
    return a == b or _below(a, b) or _below(b, a)


@dataclass(frozen=True)
class TargetPolicy:
    """Where targets may be: below the kubelet root, in kubelet's shape, clear of the data root."""

    kubelet_root: Path
    data_root: Path
    relaxed_shape: bool = False
    # Spellings of the two roots: as configured and with symlinks resolved (computed once).
    _roots: tuple[PurePosixPath, ...] = field(init=False, repr=False, compare=False)
    _data_roots: tuple[PurePosixPath, ...] = field(init=False, repr=False, compare=False)
    # The same as strings, with the kubelet roots' component counts, for the checks.
    _root_strs: tuple[tuple[str, int], ...] = field(init=False, repr=False, compare=False)
    _data_root_strs: tuple[str, ...] = field(init=False, repr=False, compare=False)
    # Targets that passed check() (it is pure): a publish checks its target twice.
    _passed: dict[str, PurePosixPath] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        def spellings(path: Path) -> tuple[PurePosixPath, ...]:
            given = canonical_path(str(Path(path).absolute()))
            real = PurePosixPath(os.path.realpath(given))
            return (given,) if real == given else (given, real)

        object.__setattr__(self, "_roots", spellings(self.kubelet_root))
        object.__setattr__(self, "_data_roots", spellings(self.data_root))
        object.__setattr__(
            self, "_root_strs", tuple((str(r), len(r.parts) - 1) for r in self._roots)
        )
        object.__setattr__(self, "_data_root_strs", tuple(str(r) for r in self._data_roots))

    @property
    def shape(self) -> str:
        if self.relaxed_shape:
            return f"a directory below {self._roots[0]}"
        return f"{self._roots[0]}/pods/<pod-uid>/volumes/{CSI_PLUGIN_DIR}/<volume-name>/mount"

    def check(self, raw: str) -> PurePosixPath:
        """The canonical target, or INVALID_ARGUMENT naming the rule it breaks (pure)."""
        passed = self._passed.get(raw)
        if passed is not None:
            return passed
        checked = self._check(raw)
        if len(self._passed) >= _PASSED_MAX:
            self._passed.clear()  # a bound, not an LRU: refilled by the next calls
        self._passed[raw] = checked
        return checked

    def _check(self, raw: str) -> PurePosixPath:
        target_parts = _canonical_parts(raw)
        target = _joined(target_parts)
        relative = self._relative(target, target_parts)
        if relative is None:
            raise _violation(
                raw, "under-kubelet-root", f"must lie below the kubelet root {self._roots[0]}"
            )
        if not self.relaxed_shape:
            parts = relative
            if not (
                len(parts) == 6
                and parts[0] == "pods"
                and parts[2] == "volumes"
                and parts[3] == CSI_PLUGIN_DIR
                and parts[5] == "mount"
            ):
                raise _violation(raw, "kubelet-shape", f"must be {self.shape}")
        below = "/".join(relative)
        resolved = [(root if root == "/" else root + "/") + below for root, _ in self._root_strs]
        for data_root in self._data_root_strs:
            if any(_overlaps(path, data_root) for path in (target, *resolved)):
                raise _violation(
                    raw, "not-data-root", f"overlaps the agent's data root {self._data_roots[0]}"
                )
        return PurePosixPath(target)

    def _relative(self, target: str, parts: list[str]) -> tuple[str, ...] | None:
        """The components of canonical ``target`` below the first kubelet root holding it."""
        for root, depth in self._root_strs:
            if _below(target, root):
                return tuple(parts[depth:])
        return None

    def relative(self, target: PurePosixPath) -> tuple[str, ...]:
        """The components of a checked target below the kubelet root."""
        raw = str(target)
        relative = self._relative(raw, raw.split("/")[1:])
        if not relative:  # check() ran first; this is a programming error
            raise Internal(f"{target} is not below the kubelet root")
        return relative

    def open_target(self, target: PurePosixPath, *, create: bool) -> _OpenTarget:
        """Walk to ``target`` without following symlinks; yields its parent held open.

        ``create`` makes the final directory when it is missing (the only directory the agent
        ever creates). The parent must exist: kubelet creates it.
        """
        return _OpenTarget(self, target, create)

    def _walk(self, target: PurePosixPath, create: bool) -> TargetDir:
        raw = str(target)
        relative = self.relative(target)
        try:
            fd = os.open(self._roots[0], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _violation(
                raw, "parent-exists", f"cannot be reached: kubelet root: {exc.strerror}"
            ) from exc
        try:
            # One openat2(2) with the same rules when the kernel has it; the walk below when it
            # does not, and whenever openat2 refuses, so the error names the rule and the part.
            beneath = _beneath(fd, relative[:-1])
            if beneath is not None:
                os.close(fd)
                fd = beneath
            else:
                for part in relative[:-1]:
                    child = _open_child(fd, part, raw)
                    os.close(fd)
                    fd = child
            handle = TargetDir(fd, relative[-1], raw)
            if create:
                handle.create()
        except BaseException:
            os.close(fd)
            raise
        return handle


class _OpenTarget:
    """``with paths.open_target(...) as handle``: the walk on entry, the parent closed on exit.

    A class rather than a ``@contextmanager`` generator, which costs several times more per
    use; a publish enters it twice."""

    __slots__ = ("_create", "_handle", "_paths", "_target")

    def __init__(self, paths: TargetPolicy, target: PurePosixPath, create: bool) -> None:
        self._paths = paths
        self._target = target
        self._create = create
        self._handle: TargetDir | None = None

    def __enter__(self) -> TargetDir:
        self._handle = self._paths._walk(self._target, self._create)
        return self._handle

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            os.close(self._handle.parent_fd)


# The same flags as the walk, minus O_NOFOLLOW: the resolve rules refuse every symlink instead.
_BENEATH = OpenBeneath(_WALK_FLAGS & ~os.O_NOFOLLOW)


def _beneath(dir_fd: int, parts: tuple[str, ...]) -> int | None:
    """An O_PATH directory descriptor of ``parts`` below ``dir_fd``, or None (the caller walks)."""
    return _BENEATH.open("/".join(parts), dir_fd) if parts else None


def _open_child(parent_fd: int, name: str, raw: str) -> int:
    """Open ``name`` below ``parent_fd`` as a directory, never through a symlink."""
    try:
        return os.open(name, _WALK_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise _walk_error(parent_fd, name, raw, exc) from exc


def _walk_error(parent_fd: int, name: str, raw: str, exc: OSError) -> InvalidArgument:
    if exc.errno == errno.ENOENT:
        return _violation(
            raw, "parent-exists", f"has a missing directory {name!r} (kubelet creates the parent)"
        )
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return _violation(raw, "no-symlinks", f"passes through a symlink at {name!r}")
        return _violation(raw, "directories-only", f"passes through a non-directory {name!r}")
    return _violation(raw, "reachable", f"cannot be opened at {name!r}: {exc.strerror}")


@dataclass
class TargetDir:
    """The target's parent directory, held open, and the target's name in it."""

    parent_fd: int
    name: str
    raw: str
    # True when create() made the directory just now: nothing can be mounted on it yet.
    created: bool = False

    @property
    def proc_path(self) -> str:
        """A path that reaches the target through the held parent: its last step not followed."""
        return f"/proc/self/fd/{self.parent_fd}/{self.name}"

    def stat(self) -> os.stat_result | None:
        """lstat of the target (the topmost mount's root if something is mounted there)."""
        try:
            return os.lstat(self.name, dir_fd=self.parent_fd)
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        return self.stat() is not None

    def open(self) -> _OpenChild:
        """An O_PATH descriptor of the target directory (None when it does not exist)."""
        return _OpenChild(self)

    def check(self) -> bool:
        """Whether the target exists; INVALID_ARGUMENT when it is a symlink or not a directory."""
        with self.open() as fd:
            return fd is not None

    def create(self) -> None:
        try:
            os.mkdir(self.name, TARGET_DIR_MODE, dir_fd=self.parent_fd)
        except FileExistsError:
            with self.open():  # refuses a symlink or a file that was already there
                pass
        except OSError as exc:
            raise Internal(f"cannot create target directory {self.raw}: {exc.strerror}") from exc
        else:
            self.created = True

    def remove_if_empty(self) -> bool:
        """rmdir the target if it is an empty directory (never a symlink, never recursive)."""
        try:
            os.rmdir(self.name, dir_fd=self.parent_fd)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False


class _OpenChild:
    """``with handle.open() as fd`` (a class: cheaper per use than a generator-based manager)."""

    __slots__ = ("_dir", "_fd")

    def __init__(self, target_dir: TargetDir) -> None:
        self._dir = target_dir
        self._fd: int | None = None

    def __enter__(self) -> int | None:
        target = self._dir
        try:
            self._fd = _open_child(target.parent_fd, target.name, target.raw)
        except InvalidArgument:
            if target.exists():
                raise
        return self._fd

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
