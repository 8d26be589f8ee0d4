"""The HTTP endpoint on ``--metrics-address``: ``/metrics``, ``/healthz`` and ``/readyz``.

Scraped by several Prometheus replicas and probed by kubelet, so it must neither refuse
connections under a burst nor grow a thread per connection: a listen backlog of
``LISTEN_BACKLOG`` holds a burst in the kernel, ``WORKERS`` threads answer, and each connection
is closed after its response so a keep-alive client never holds a worker between scrapes.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from agent.observe.prompt_shutdown import PromptShutdownMixin

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], tuple[bool, str]]
_TEXT = "text/plain; charset=utf-8"
# socketserver's default backlog is 5: a burst of scrapes overflowed it (SYNs dropped, clients
# retrying after 1 s, 3 s, ...). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
# A scrape takes milliseconds; more threads would only add contention on two cores.
WORKERS = 4


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port). An empty host (``:9402``) means all interfaces;
    IPv6 hosts are bracketed (``[::1]:9402``)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(
            f"invalid metrics address {address!r}: expected host:port, e.g. ':9402' or "
            "'127.0.0.1:9402'"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"invalid metrics address {address!r}: put an IPv6 host in brackets")
    return host, int(port_text)


class _Server(PromptShutdownMixin, HTTPServer):
    # A restarted agent must rebind at once even with connections in TIME_WAIT.
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        ready: ReadyCheck,
        family: socket.AddressFamily,
        alive: ReadyCheck,
    ) -> None:
        self.address_family = family
        self.registry = registry
        self.ready = ready
        self.alive = alive
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="cert-agent-http")
        # Accept only when a worker is free: the rest wait in the listen backlog, not in memory.
        self._free_workers = threading.BoundedSemaphore(WORKERS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._free_workers.acquire()
        try:
            self.pool.submit(self._serve_one, request, client_address)
        except RuntimeError:  # shutting down
            self._free_workers.release()
            self.shutdown_request(request)

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._free_workers.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http connection from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Dual stack for the all-interfaces address, so IPv4 and IPv6 clusters both scrape.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would resolve our own name (getfqdn), which can hang on a node
        # with broken reverse DNS; the name is never used.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client must not hold a worker for long

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        headers: dict[str, str] = {}
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            body = encoder(self.server.registry)
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                body = gzip.compress(body)
                headers["Content-Encoding"] = "gzip"
            self._send(200, body, content_type, headers, send_body)
        elif path in ("/healthz", "/readyz"):
            check = self.server.alive if path == "/healthz" else self.server.ready
            try:
                ok, reason = check()
            except Exception as exc:  # a broken check means not ready, not a dead server
                log.warning("%s check failed: %s", path, exc)
                ok, reason = False, f"check failed: {exc}"
            status, text = (200, "ok") if ok else (503, reason or "not ready")
            self._send(status, (text + "\n").encode(), _TEXT, headers, send_body)
        else:
            self._send(404, b"not found\n", _TEXT, headers, send_body)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str], send_body: bool
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # One request per connection (see the module docstring).
        self.send_header("Connection", "close")
        self.close_connection = True
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes and scrapes arrive every few seconds: keep them out of the info log.
        log.debug("http %s " + format, self.client_address[0], *args)


class HealthServer:
    """Serves metrics and health on ``address`` ("host:port"; ":9402" = all interfaces, port 0 =
    any free port, see ``port`` after ``start``). ``alive`` answers /healthz (default: always),
    ``ready`` /readyz."""

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        ready: ReadyCheck,
        alive: ReadyCheck | None = None,
    ) -> None:
        self.address = address
        self._host, self.port = parse_address(address)
        self._registry = registry
        self._ready = ready
        self._alive = alive or (lambda: (True, ""))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the health server was already started")
        self._server = self._bind()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cert-agent-http", daemon=True
        )
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz", extra={"address": self.address})

    def _bind(self) -> _Server:
        host = self._host
        if host in ("", "::", "0.0.0.0"):
            if host != "0.0.0.0" and socket.has_ipv6:
                try:
                    return self._server_on("::", socket.AF_INET6)
                except OSError:
                    pass  # IPv6 disabled on this node: IPv4 only
            return self._server_on("0.0.0.0", socket.AF_INET)
        infos = socket.getaddrinfo(host, self.port, type=socket.SOCK_STREAM)
        return self._server_on(host, infos[0][0])

    def _server_on(self, host: str, family: socket.AddressFamily) -> _Server:
        return _Server((host, self.port), self._registry, self._ready, family, self._alive)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(5)
        self._server = self._thread = None
