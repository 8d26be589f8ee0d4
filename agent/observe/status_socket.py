"""The read-only status endpoint: a UNIX socket under the data root that `cert-agent status` reads.

A client connects and receives one JSON document, then the connection closes. The server never
reads from the socket, so there is no request to parse and nothing a client can change. The
socket is 0600 in the 0700 data root: only root on the node (the agent's own user) reaches it,
and it is not on any network (see docs/security.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.observe.prompt_shutdown import PromptShutdownMixin

log = logging.getLogger(__name__)

STATUS_SOCKET = "status.sock"
Snapshot = Callable[[], dict[str, Any]]


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        try:
            document = self.server.snapshot()
            body = json.dumps(document, sort_keys=True).encode() + b"\n"
        except Exception as exc:
            log.exception("status snapshot failed")
            body = json.dumps({"error": f"status snapshot failed: {exc}"}).encode() + b"\n"
        with contextlib.suppress(OSError):
            self.request.sendall(body)
            # Closing with unread bytes resets the connection before the client has read the
            # answer: end our side, then discard (never interpret) whatever the client sent.
            self.request.shutdown(socket.SHUT_WR)
            self.request.settimeout(1.0)
            for _ in range(16):
                if not self.request.recv(4096):
                    break


class _Server(PromptShutdownMixin, socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        super().__init__(path, _Handler)

    def server_bind(self) -> None:
        # No umask dance: the umask is process-wide and would narrow files other threads create
        # meanwhile. The socket lives in a directory only root may enter (the data root is made
        # 0700 before any part starts; refuse anything looser), so the moment between bind and
        # chmod is not a window for another user.
        parent = os.path.dirname(str(self.server_address)) or "."
        if os.stat(parent).st_mode & 0o077:
            raise OSError(
                f"{parent} is open to other users; the status socket needs a 0700 directory"
            )
        super().server_bind()
        os.chmod(str(self.server_address), 0o600)


class StatusServer:
    """Serves ``snapshot()`` as JSON on the UNIX socket ``path``."""

    def __init__(self, path: Path, snapshot: Snapshot) -> None:
        self.path = path
        self._snapshot = snapshot
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of an earlier agent
        self._server = _Server(str(self.path), self._snapshot)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cert-agent-status", daemon=True
        )
        self._thread.start()
        log.debug("serving status", extra={"path": str(self.path)})

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._thread is not None:
            self._thread.join(5)


def read_status(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """Connect to the agent's status socket and return its document (raises OSError/ValueError)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.shutdown(socket.SHUT_WR)  # nothing to say: the server only talks
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    document = json.loads(b"".join(chunks))
    if not isinstance(document, dict):
        raise ValueError("the status socket answered something other than a JSON object")
    return document
