"""File steps the store trusts: reads that follow no symlink, atomic 0600 writes, tree removal."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from pathlib import Path

from agent.errors import Internal

PRIVATE_FILE_MODE = 0o600


PRIVATE_DIR_MODE = 0o700


class open_nofollow:  # named as the function it replaced: ``with open_nofollow(...) as fd``
    """A descriptor opened on entry (close-on-exec) and closed on exit.

    A class rather than a ``@contextmanager`` generator: it is entered about a dozen times per
    publish, and a generator-based manager costs several times more per use."""

    __slots__ = ("_dir_fd", "_fd", "_flags", "_mode", "_path")

    def __init__(
        self, path: str | Path, flags: int, mode: int = 0o777, dir_fd: int | None = None
    ) -> None:
        self._path = path
        self._flags = flags | os.O_CLOEXEC
        self._mode = mode
        self._dir_fd = dir_fd
        self._fd = -1

    def __enter__(self) -> int:
        self._fd = os.open(self._path, self._flags, self._mode, dir_fd=self._dir_fd)
        return self._fd

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_nofollow(path: str | Path) -> bytes:
    with open_nofollow(path, os.O_RDONLY | os.O_NOFOLLOW) as fd:
        return read_all(fd)


def atomic_write(directory: str | Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` (0600) via a temporary file in the same directory and rename."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    try:
        with open_nofollow(directory, os.O_RDONLY | os.O_DIRECTORY) as dfd:
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with open_nofollow(tmp, flags, PRIVATE_FILE_MODE, dir_fd=dfd) as fd:
                    os.fchmod(fd, PRIVATE_FILE_MODE)  # umask-proof
                    write_all(fd, data)
                    os.fsync(fd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)
    except OSError as exc:
        raise Internal(f"cannot write {os.path.join(directory, name)}: {exc.strerror}") from exc


def rmtree(path: str | Path) -> None:
    """Remove a tree that may contain 0550 directories, without following symlinks."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if os.geteuid() != 0:
        # Root ignores the 0550 modes; anyone else must make the directories writable first.
        for _root, _dirs, _files, dfd in os.fwalk(path, follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.fchmod(dfd, PRIVATE_DIR_MODE)
    shutil.rmtree(path)
