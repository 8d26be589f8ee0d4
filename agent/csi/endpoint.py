"""The CSI socket file: claim it without orphaning a live agent, and check that it still serves.

gRPC unlinks whatever sits at a UNIX socket path when it binds, so a second agent started on the
same ``--endpoint`` would silently take the socket away from the first (kubelet then talks to the
newcomer while the old one keeps its renewals running). ``claim`` connects first: an answer means
a live agent owns the path, and the caller must stop; a refused connection means a stale file
left by a crash, which is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

# Long enough for a busy but healthy agent's accept queue, short enough for a readiness probe.
CONNECT_TIMEOUT_SECONDS = 1.0


class EndpointInUse(Exception):
    """Another process serves the socket path (or something that is not a socket sits there)."""


def _connect(path: Path) -> OSError | None:
    """None when something accepts a connection on ``path``, else the error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT_SECONDS)
        try:
            sock.connect(str(path))
        except OSError as exc:
            return exc
    return None


def claim(path: Path) -> None:
    """Make ``path`` free for this agent's socket, or raise ``EndpointInUse``."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise EndpointInUse(
            f"{path} exists and is not a socket; remove it or choose another --endpoint"
        )
    error = _connect(path)
    if error is None:
        raise EndpointInUse(
            f"another agent is serving on {path}; stop it first or choose another --endpoint "
            "(its socket was left alone)"
        )
    if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
        raise EndpointInUse(f"cannot tell whether {path} is in use: {error.strerror or error}")
    # Nobody listens: a socket left behind by an agent that crashed.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def inode(path: Path) -> int:
    return os.stat(path).st_ino


def serving_problem(path: Path, expected_inode: int, *, connect: bool = True) -> str | None:
    """Why ``path`` no longer reaches this agent's gRPC server, or None when it does.

    The inode tells our socket from a file someone put in its place; the connect tells that the
    listening socket still accepts (kubelet and the registrar connect exactly like this). A
    caller answering a request that came over the socket passes ``connect=False``.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"the CSI socket {path} was removed; restart the agent to serve again"
    except OSError as exc:
        return f"cannot stat the CSI socket {path}: {exc.strerror or exc}"
    if not stat.S_ISSOCK(info.st_mode) or info.st_ino != expected_inode:
        return f"the CSI socket {path} was replaced by another file; restart the agent"
    error = _connect(path) if connect else None
    if error is not None:
        return f"the CSI socket {path} does not accept connections: {error.strerror or error}"
    return None
