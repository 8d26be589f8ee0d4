"""Kubernetes API access: client construction with a client-side rate limit, and retries.

Every request the agent makes goes through ``ApiClient`` (``kube/rest.py``), so one token bucket
(``--kube-qps`` / ``--kube-burst``) bounds the agent's load on the API server however many volumes
it serves. ``with_retries`` turns the API's transient failures (429, 5xx, dropped connections) into
backoff and its permanent ones into ``agent.errors`` classes with messages a user can act on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from agent.errors import (
    Aborted,
    AgentError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from agent.kube.kubeconfig import from_kubeconfig, in_cluster, kubeconfig_path
from agent.kube.rest import ApiClient, KubeApiError, KubeUnreachable

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

# Backoff between retries: full jitter over an exponentially growing window, capped.
BACKOFF_BASE_SECONDS = 0.2
BACKOFF_CAP_SECONDS = 10.0


@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: str | None = None
    qps: float = 20
    burst: int = 40
    request_timeout: float = 30


class TokenBucket:
    """A thread-safe token bucket: ``burst`` requests at once, then ``qps`` per second."""

    def __init__(
        self,
        qps: float,
        burst: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if qps <= 0 or burst < 1:
            raise InvalidArgument(
                f"kube rate limit needs qps > 0 and burst >= 1, got {qps}/{burst}"
            )
        self.qps = float(qps)
        self.burst = int(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Take one token, sleeping until one is available."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
            self._stamp = now
            # Reserve the token now (the balance may go negative) so waiters queue up fairly.
            self._tokens -= 1
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)


def make_api_client(settings: KubeSettings) -> ApiClient:
    """In-cluster config when no kubeconfig is given and we run in a pod, else a kubeconfig file.

    ``settings.kubeconfig`` None outside a pod means ``$KUBECONFIG`` (its first file) or
    ``~/.kube/config``.
    """
    try:
        if settings.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config = in_cluster()
        else:
            config = from_kubeconfig(kubeconfig_path(settings.kubeconfig))
    except FailedPrecondition as exc:
        where = settings.kubeconfig or "the in-cluster service account or ~/.kube/config"
        raise FailedPrecondition(
            f"cannot load Kubernetes client configuration from {where}: {exc.message}"
        ) from exc
    if config.endpoint.insecure:
        log.warning(
            "the kubeconfig sets insecure-skip-tls-verify: the API server's certificate is "
            "not checked, so anyone on the path can impersonate it",
            extra={"server": config.endpoint.server},
        )
    limiter = TokenBucket(settings.qps, settings.burst)
    return ApiClient(config.endpoint, config.credentials, limiter, settings.request_timeout)


def bearer_token_client(api: ApiClient, token: str) -> ApiClient:
    """A client for the same API server that authenticates with ``token`` instead.

    Only the bearer token: never the agent's own client certificate. It shares ``api``'s rate
    limiter, so requests made on behalf of pods count against the agent's budget.
    """
    return api.with_token(token)


class NotFound(FailedPrecondition):
    """The object (or the API itself) does not exist; callers that expect this catch it."""


class Gone(Unavailable):
    """A resourceVersion is too old (HTTP 410): list again and watch from the new version."""


def status_message(exc: KubeApiError) -> str:
    """The ``message`` of a Kubernetes Status body, or the HTTP reason."""
    body = exc.body
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            return body[:500]
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    return str(exc.reason or f"HTTP {exc.status}")


def is_retryable(exc: BaseException) -> bool:
    """Transient: throttled, a server error, or the connection failed or dropped."""
    if isinstance(exc, KubeApiError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, KubeUnreachable | ConnectionError | TimeoutError)


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's Retry-After (seconds) on a 429/503, when it sent one."""
    headers = getattr(exc, "headers", None)
    if not headers:
        return None
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def map_api_error(exc: BaseException, what: str) -> AgentError:
    """Map a failed API call to the agent error a user (or the caller) can act on.

    ``what`` reads as the action, e.g. ``create certificaterequests.cert-manager.io in
    namespace "apps"``; it names the RBAC verb and resource for 403s.
    """
    if not isinstance(exc, KubeApiError):
        return Unavailable(f"Kubernetes API unreachable while trying to {what}: {exc}")
    status = exc.status or 0
    message = status_message(exc)
    if status == 401:
        return PermissionDenied(
            f"Kubernetes API rejected the credentials while trying to {what}: {message}"
        )
    if status == 403 and "admission webhook" in message:
        # A webhook's denial (cert-manager's validation, a policy engine), not RBAC.
        return InvalidArgument(f"Kubernetes API refused to {what}: {message}")
    if status == 403:
        return PermissionDenied(
            f"Kubernetes API forbids it to {what}: {message}. Grant that verb on that resource "
            "to the service account making the call (see docs/cert-manager.md, RBAC)"
        )
    if status == 404:
        return NotFound(f"cannot {what}: not found ({message})")
    if status == 409:
        return Aborted(f"conflict while trying to {what}: {message}; retry")
    if status == 410:
        return Gone(f"cannot {what}: {message}")
    if status in (400, 422):
        return InvalidArgument(f"Kubernetes API refused to {what}: {message}")
    if is_retryable(exc):
        return Unavailable(f"Kubernetes API failed to {what} (HTTP {status}): {message}")
    return Internal(f"unexpected Kubernetes API answer while trying to {what}: {status} {message}")


def backoff_delay(attempt: int) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)], at least a few milliseconds."""
    window = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * (2**attempt))
    return max(0.01, random.uniform(0, window))


def with_retries(
    call: Callable[[], T],
    *,
    what: str,
    deadline: float,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``call`` until it succeeds, a permanent error occurs, or ``clock()`` passes ``deadline``.

    Retries 429 (after the server's Retry-After), 5xx and connection errors with exponential
    backoff and jitter. Raises the ``map_api_error`` mapping of the last error.
    """
    attempt = 0
    while True:
        try:
            return call()
        except AgentError:
            raise
        except Exception as exc:
            if not is_retryable(exc):
                raise map_api_error(exc, what) from exc
            delay = retry_after_seconds(exc)
            if delay is None:
                delay = backoff_delay(attempt)
            remaining = deadline - clock()
            if delay > remaining:
                raise map_api_error(exc, what) from exc
            log.info(
                "Kubernetes API call failed, retrying",
                extra={"what": what, "error": str(exc)[:200], "delay": round(delay, 3)},
            )
            sleep(delay)
            attempt += 1
