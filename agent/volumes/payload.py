"""The payload directory: ``..data`` swapped atomically to a new generation, and reading it.

Writers build a complete hidden generation (``..<timestamp>_<random>``), then rename a new
``..data`` link over the old one: a reader sees the old files or the new ones, never a mix.
Every step works on directory descriptors and refuses symlinks it did not make.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from agent.errors import Internal, InvalidArgument
from agent.volumes.safe_files import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    open_nofollow,
    read_all,
    write_all,
)

DATA_LINK = "..data"


DATA_TMP_LINK = "..data_tmp"


FILE_MODE = 0o440


DIR_MODE = 0o550


_MAX_NAME_BYTES = 255


# Hidden generation directories: ..<UTC timestamp>_<random>.
_HIDDEN_DIR_RE = re.compile(r"\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}_[0-9a-f]{16}")


_TMP_LINK_RE = re.compile(r"\.\.tmp_[0-9a-f]{16}")


_MAX_GID = 2**32 - 2  # (gid_t)-1 means "unchanged" to chown


def _validate_file_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"payload file name {name!r} must be a non-empty string")
    if "/" in name or "\0" in name:
        raise InvalidArgument(f"payload file name {name!r} must be a plain name without '/'")
    if name.startswith("."):
        raise InvalidArgument(f"payload file name {name!r} must not start with '.'")
    if len(os.fsencode(name)) > _MAX_NAME_BYTES:
        raise InvalidArgument(f"payload file name {name[:32]!r}... is longer than 255 bytes")
    return name


def _ownership(gid: int | None) -> tuple[int, int]:
    """(uid, gid) for fchown; -1 leaves a value unchanged when not running as root."""
    if gid is not None and not (isinstance(gid, int) and 0 <= gid <= _MAX_GID):
        raise InvalidArgument(f"fs-group {gid!r} must be an integer between 0 and {_MAX_GID}")
    root = os.geteuid() == 0
    uid = 0 if root else -1
    if gid is None:
        gid = 0 if root else -1
    return uid, gid


def _make_private_dirs(path: Path) -> None:
    """``os.makedirs`` with 0700 whatever the umask (process-wide: another thread may have
    narrowed it for a moment), as the store makes its volume directories."""
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        return
    except FileNotFoundError:
        _make_private_dirs(path.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)


def _open_payload_root(directory: Path, uid: int, gid: int) -> tuple[int, bool]:
    """Create ``directory`` if missing and open it without following a symlink at its place;
    also says whether it was created just now (empty, and nobody has seen it yet)."""
    try:
        os.mkdir(directory, DIR_MODE)
        created = True
    except FileExistsError:
        created = False
    except FileNotFoundError:  # a new volume's directory too
        _make_private_dirs(directory.parent)
        try:
            os.mkdir(directory, DIR_MODE)
            created = True
        except FileExistsError:
            created = False
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Internal(f"payload directory {directory} is not a directory") from exc
        raise
    try:
        try:
            os.fchown(dfd, uid, gid)
        except PermissionError as exc:
            raise Internal(
                f"cannot give payload directory {directory} group {gid}: the agent runs "
                "without root and is not a member of that group"
            ) from exc
        # Owner write only while we work, so a non-root agent can update its own directory.
        os.fchmod(dfd, DIR_MODE | stat.S_IWUSR)
    except BaseException:
        os.close(dfd)
        raise
    return dfd, created


def _lstat_at(dfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _readlink_at(dfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:  # missing, or not a symlink
        return None


def _remove_at(dfd: int, name: str) -> None:
    """Remove an entry of the payload root: a symlink or file, or a whole directory."""
    st = _lstat_at(dfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    with open_nofollow(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd) as sub:
        os.fchmod(sub, PRIVATE_DIR_MODE)  # our own generation dir; lets a non-root agent empty it
    shutil.rmtree(name, dir_fd=dfd)


def _write_generation(dfd: int, files: Mapping[str, bytes], uid: int, gid: int) -> str:
    """Write the files into a fresh hidden directory and return its name."""
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    hidden = f"..{stamp}_{secrets.token_hex(8)}"
    os.mkdir(hidden, PRIVATE_DIR_MODE, dir_fd=dfd)
    try:
        with open_nofollow(hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd) as hfd:
            for name, content in files.items():
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with open_nofollow(name, flags, PRIVATE_FILE_MODE, dir_fd=hfd) as fd:
                    write_all(fd, content)
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, FILE_MODE)
                    os.fsync(fd)
            os.fchown(hfd, uid, gid)
            os.fchmod(hfd, DIR_MODE)
            os.fsync(hfd)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_at(dfd, hidden)
        raise
    return hidden


def _replace_symlink(dfd: int, name: str, target: str) -> None:
    """Point ``name`` at ``target`` atomically (a temporary link renamed over it)."""
    if _readlink_at(dfd, name) == target:
        return
    tmp = f"..tmp_{secrets.token_hex(8)}"
    os.symlink(target, tmp, dir_fd=dfd)
    try:
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def write_payload(directory: Path, files: Mapping[str, bytes], gid: int | None) -> None:
    """Atomically replace the payload in ``directory`` with ``files`` (Kubernetes AtomicWriter).

    Files are 0440 root:gid inside a 0550 hidden directory; ``..data`` points at it and each
    visible name is a relative symlink ``name -> ..data/name``.
    """
    for name, content in files.items():
        _validate_file_name(name)
        if not isinstance(content, bytes):
            raise InvalidArgument(f"payload file {name!r} content must be bytes")
    uid, group = _ownership(gid)
    try:
        dfd, created = _open_payload_root(Path(directory), uid, group)
    except OSError as exc:
        raise Internal(f"cannot prepare payload directory {directory}: {exc.strerror}") from exc
    done = False
    try:
        if created:
            _first_generation(dfd, files, uid, group)
            done = True
            return
        hidden = _write_generation(dfd, files, uid, group)
        # Kept one more round: a reader that resolved ..data just before the swap still finds
        # every file of the generation it started on.
        previous = _readlink_at(dfd, DATA_LINK)
        # The one atomic step readers depend on: ..data switches from the old set to the new.
        _remove_at(dfd, DATA_TMP_LINK)
        os.symlink(hidden, DATA_TMP_LINK, dir_fd=dfd)
        os.rename(DATA_TMP_LINK, DATA_LINK, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
        for name in files:
            _replace_symlink(dfd, name, f"{DATA_LINK}/{name}")
        for entry in os.listdir(dfd):
            if entry.startswith("."):
                # Older generations, or leftovers of an interrupted write. Only our own name
                # shapes: a planted ``..data -> /elsewhere`` target is never touched.
                ours = _HIDDEN_DIR_RE.fullmatch(entry) or _TMP_LINK_RE.fullmatch(entry)
                if ours and entry not in (hidden, previous):
                    _remove_at(dfd, entry)
            elif entry not in files:
                link = _readlink_at(dfd, entry)
                if link is not None and link.startswith(f"{DATA_LINK}/"):
                    os.unlink(entry, dir_fd=dfd)
        os.fchmod(dfd, DIR_MODE)
        os.fsync(dfd)
        done = True
    except OSError as exc:
        raise Internal(f"cannot write payload into {directory}: {exc.strerror}") from exc
    finally:
        if not done:  # back to read-only whatever failed
            with contextlib.suppress(OSError):
                os.fchmod(dfd, DIR_MODE)
        os.close(dfd)


def _first_generation(dfd: int, files: Mapping[str, bytes], uid: int, gid: int) -> None:
    """The first payload of a directory created this instant: the same layout, made directly.

    Nobody can have resolved ``..data`` in a directory that did not exist a moment ago (the
    bind comes after), so the links are made in place, without the temporary link renamed
    over an old one, and there is no older generation to clean up. A failure here leaves a
    partial directory that the next write_payload replaces the careful way.
    """
    hidden = _write_generation(dfd, files, uid, gid)
    os.symlink(hidden, DATA_LINK, dir_fd=dfd)
    for name in files:
        os.symlink(f"{DATA_LINK}/{name}", name, dir_fd=dfd)
    os.fchmod(dfd, DIR_MODE)
    os.fsync(dfd)


def _current_generation(dfd: int) -> str | None:
    """The hidden generation ``..data`` names, or None when there is none of ours."""
    hidden = _readlink_at(dfd, DATA_LINK)
    return hidden if hidden is not None and _HIDDEN_DIR_RE.fullmatch(hidden) else None


def read_payload_file(directory: Path, name: str) -> bytes | None:
    """Read one payload file through ``..data`` without following anything out of ``directory``.

    None when the directory, the ``..data`` link or the file does not exist.
    """
    _validate_file_name(name)
    try:
        with open_nofollow(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) as dfd:
            hidden = _current_generation(dfd)
            if hidden is None:
                return None
            with (
                open_nofollow(
                    hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd
                ) as hfd,
                open_nofollow(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=hfd) as fd,
            ):
                return read_all(fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Internal(f"cannot read {name} from payload {directory}: {exc.strerror}") from exc


def payload_files_present(directory: Path, names: list[str]) -> bool:
    """Whether every one of ``names`` is a regular file in the payload's current generation.

    What recovery asks of each volume on start: one stat per file instead of reading them
    (``read_payload_file``), through ``..data`` without following anything out of ``directory``.
    """
    for name in names:
        _validate_file_name(name)
    try:
        with open_nofollow(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) as dfd:
            hidden = _current_generation(dfd)
            if hidden is None:
                return False
            with open_nofollow(
                hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd
            ) as hfd:
                for name in names:
                    st = _lstat_at(hfd, name)
                    if st is None or not stat.S_ISREG(st.st_mode):
                        return False
                return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise Internal(f"cannot look into payload {directory}: {exc.strerror}") from exc
