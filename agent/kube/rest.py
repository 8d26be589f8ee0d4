"""The agent's Kubernetes REST transport: JSON over HTTPS with urllib3, no generated models.

The ``kubernetes`` package costs ~0.3 s of import (about 1,900 generated modules) and most of the
container image, and the agent reads and writes every object as plain JSON anyway. What a
component needs from a client is small and lives here: one connection pool per API server,
the credentials (``kube/kubeconfig.py`` builds them), a token from the shared rate limiter for
every request, a timeout on every request, JSON in and out, the API's ``Status`` errors as one
exception type (``KubeApiError``), transport failures as another (``KubeUnreachable``), and
watches streamed as newline-delimited JSON that another thread can cut.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import urllib3

from agent import __version__

log = logging.getLogger(__name__)

Obj = dict[str, Any]
USER_AGENT = f"cert-agent/{__version__}"
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
WATCH_CONNECT_SECONDS = 10.0
# Idle connections kept per server: each watch (pods, trust-bundle sources, PCR signers, the CA
# Secret) holds one while it runs, and issuance calls run beside them.
POOL_SIZE = 32


class KubeApiError(Exception):
    """The API server answered with an error status (or a watch sent an ERROR event).

    ``body`` is the response body as text (a ``Status`` object as JSON, usually), ``headers`` the
    response headers (``Retry-After`` on 429/503)."""

    def __init__(
        self,
        status: int,
        reason: str = "",
        body: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        # Case-insensitive, as HTTP header names are: headers.get("retry-after") works.
        self.headers: Mapping[str, str] = urllib3.HTTPHeaderDict(headers or {})
        super().__init__(f"({status}) {reason}: {body[:300]}" if body else f"({status}) {reason}")


class KubeUnreachable(ConnectionError):
    """No answer: connecting, TLS (including a failed server certificate check), or a connection
    dropped or timed out mid-request. Always worth retrying."""


class Limiter(Protocol):
    def acquire(self) -> None: ...


class Credentials(Protocol):
    """Where the bearer token of a request comes from (``None``: no Authorization header)."""

    def token(self) -> str | None: ...


@dataclass(frozen=True)
class StaticToken:
    value: str | None

    def token(self) -> str | None:
        return self.value


@dataclass
class Endpoint:
    """One API server and how to reach it: base URL, TLS context, SNI/verification name."""

    server: str  # "https://10.96.0.1:443", no trailing slash
    ssl_context: ssl.SSLContext | None = None  # None: plain http (tests, kubectl proxy)
    tls_server_name: str | None = None
    insecure: bool = False
    # The same trust without the client certificate (when ssl_context presents one): requests
    # made with a pod's token must never authenticate as the agent too.
    trust_context: ssl.SSLContext | None = None
    pool: urllib3.PoolManager = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.server = self.server.rstrip("/")
        options: dict[str, Any] = {"maxsize": POOL_SIZE, "retries": False}
        if self.ssl_context is not None:
            options["ssl_context"] = self.ssl_context
            if self.tls_server_name:
                options["server_hostname"] = self.tls_server_name
            if self.insecure:
                options["assert_hostname"] = False
                # Said once at start-up (make_api_client logs it), not on every request.
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.pool = urllib3.PoolManager(**options)


def _describe_transport_error(endpoint: Endpoint, exc: BaseException) -> str:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            f"TLS verification of the API server {endpoint.server} failed ({text}); the "
            "server's certificate must be signed by the cluster CA the agent trusts (kubeconfig "
            "certificate-authority(-data), or the service account's ca.crt in a pod)"
        )
    if "doesn't match" in text or "Hostname mismatch" in text:
        return (
            f"the API server {endpoint.server} presented a certificate for another name ({text});"
            " set tls-server-name in the kubeconfig if the server is reached by another address"
        )
    return f"cannot reach the API server {endpoint.server}: {text}"


class ApiClient:
    """Requests to one API server with one set of credentials, all through ``limiter``."""

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        limiter: Limiter,
        request_timeout: float,
    ) -> None:
        self.endpoint = endpoint
        self.credentials = credentials
        self.limiter = limiter
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._token_endpoint: Endpoint | None = None

    @property
    def server(self) -> str:
        return self.endpoint.server

    # ---- plain requests

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | bool] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout: float | None = None,
    ) -> Any:
        """One request; the answer's JSON. Raises ``KubeApiError`` or ``KubeUnreachable``."""
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        response = self._send(
            method,
            path,
            params,
            payload,
            content_type,
            urllib3.Timeout(total=timeout or self.request_timeout),
            stream=False,
        )
        data = response.data
        if not data:
            return {}
        try:
            return json.loads(data)
        except ValueError as exc:
            raise KubeUnreachable(
                f"the API server {self.server} answered {method} {path} with no JSON: "
                f"{data[:200]!r}"
            ) from exc

    def get(self, path: str, params: Mapping[str, str | int | bool] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def watch(
        self,
        path: str,
        *,
        params: Mapping[str, str | int | bool] | None = None,
        resource_version: str | None = None,
        timeout_seconds: int,
        read_timeout: float | None = None,
    ) -> Watch:
        """A watch of the collection at ``path`` (not started until iterated)."""
        query: dict[str, str | int | bool] = dict(params or {})
        query.update(watch="true", allowWatchBookmarks="true", timeoutSeconds=timeout_seconds)
        if resource_version:
            query["resourceVersion"] = resource_version
        return Watch(self, path, query, read_timeout or timeout_seconds + 10.0)

    def with_token(self, token: str) -> ApiClient:
        """The same server and TLS trust with only ``token`` as credentials: never this
        client's own client certificate. Shares the rate limiter and, when this client has no
        client certificate, the connection pool (the token is a header, not the connection's)."""
        with self._lock:
            if self._token_endpoint is None:
                trust = self.endpoint.trust_context
                self._token_endpoint = (
                    self.endpoint
                    if trust is None
                    else Endpoint(
                        self.endpoint.server,
                        trust,
                        self.endpoint.tls_server_name,
                        self.endpoint.insecure,
                    )
                )
            endpoint = self._token_endpoint
        return ApiClient(endpoint, StaticToken(token), self.limiter, self.request_timeout)

    def close(self) -> None:
        """Nothing to release per client: connections belong to the endpoint's pool, which
        lives as long as the agent."""

    # ---- the wire

    def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, str | int | bool] | None,
        payload: bytes | None,
        content_type: str,
        timeout: urllib3.Timeout,
        *,
        stream: bool,
    ) -> urllib3.BaseHTTPResponse:
        url = self.server + path
        if params:
            url += "?" + urlencode(
                {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items()}
            )
        headers = {"Accept": JSON, "User-Agent": USER_AGENT}
        if payload is not None:
            headers["Content-Type"] = content_type
        token = self.credentials.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.limiter.acquire()
        try:
            response = self.endpoint.pool.request(
                method,
                url,
                body=payload,
                headers=headers,
                timeout=timeout,
                preload_content=not stream,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise KubeUnreachable(_describe_transport_error(self.endpoint, exc)) from exc
        if response.status >= 300:
            text = response.data.decode("utf-8", "replace")
            headers_out = urllib3.HTTPHeaderDict(response.headers)
            response.release_conn()
            raise KubeApiError(response.status, response.reason or "", text, headers_out)
        return response


class Watch:
    """One watch request: iterate for its events (``{"type", "object"}`` dicts, BOOKMARKs
    included); ``stop()`` from any thread ends the iteration at once.

    An ``ERROR`` event raises ``KubeApiError`` with the Status's code (410: the resourceVersion
    is too old; list again). A dropped connection or a read timeout raises ``KubeUnreachable``;
    the server's own timeout ends the iteration normally.
    """

    def __init__(
        self, api: ApiClient, path: str, params: dict[str, str | int | bool], read_timeout: float
    ) -> None:
        self._api = api
        self._path = path
        self._params = params
        self._read_timeout = read_timeout
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._stopped = False

    def stop(self) -> None:
        """End the watch: the thread iterating it returns (from any thread, any time)."""
        with self._lock:
            self._stopped = True
            response = self._response
        if response is not None:
            _shutdown(response)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def __iter__(self) -> Iterator[Obj]:
        if self._stopped:
            return
        response = self._api._send(
            "GET",
            self._path,
            self._params,
            None,
            JSON,
            urllib3.Timeout(connect=WATCH_CONNECT_SECONDS, read=self._read_timeout),
            stream=True,
        )
        with self._lock:
            self._response = response
            stopped = self._stopped
        try:
            if stopped:
                return
            yield from self._events(response)
        finally:
            with self._lock:
                self._response = None
            response.close()  # never back to the pool: it may be cut or half read
            response.release_conn()

    def _events(self, response: urllib3.BaseHTTPResponse) -> Iterator[Obj]:
        buffer = b""
        try:
            for chunk in response.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield _event(line)
                if self._stopped:
                    return
        except Exception as exc:
            if self._stopped:
                return  # cut by stop(): whatever the read raised is the cut itself
            if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
                raise KubeUnreachable(
                    f"the watch of {self._path} on {self._api.server} dropped: {exc}"
                ) from exc
            raise
        if buffer.strip() and not self._stopped:
            yield _event(buffer)


def _event(line: bytes) -> Obj:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise KubeUnreachable(f"a watch sent a line that is not JSON: {line[:200]!r}") from exc
    if not isinstance(event, dict):
        raise KubeUnreachable(f"a watch sent an event that is not an object: {line[:200]!r}")
    if event.get("type") == "ERROR":
        status = event.get("object") or {}
        raise KubeApiError(
            int(status.get("code") or 500),
            str(status.get("reason") or "Error"),
            json.dumps(status),
        )
    return event


def _shutdown(response: urllib3.BaseHTTPResponse) -> None:
    """Wake a thread blocked reading ``response``: shut the socket's read side down."""
    # Already released or closed: the reader is past it.
    with contextlib.suppress(ValueError, RuntimeError, OSError, NotImplementedError):
        response.shutdown()
