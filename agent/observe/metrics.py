"""The agent's Prometheus metrics, on a registry of its own (never the process-global one).

Names are a contract (alert rules, dashboards, the README): see ``cert_agent_*`` below. Per-volume
series carry namespace, pod, volume id and issuer, never secret material, and go away with the
volume.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import agent

# No `*_created` sample beside every counter and histogram series: nothing here uses them
# (rate() and increase() do not), and they would double the series a scrape carries. The switch
# is process-wide and read when a metric is made, so it is thrown before any is.
disable_created_metrics()  # type: ignore[no-untyped-call]

LOCAL_ISSUER = "local"
CERT_MANAGER_ISSUER = "cert-manager"
OPERATIONS = ("issue", "renew")

# Failure reasons pre-created at zero for each issuer, so rate() and the "renewals failing" alert
# see a failure's first increment: AgentError.reason values, "storage" and "mount" (a step on the
# node failed after or before the issuer answered), and "error" (any other exception).
KNOWN_FAILURE_REASONS = (
    "storage",
    "mount",
    "invalid_argument",
    "permission_denied",
    "deadline_exceeded",
    "unavailable",
    "failed",
    "failed_precondition",
    "aborted",
    "internal",
    "error",
    "policy",
)

# Local signing takes milliseconds; cert-manager approval can take up to the issue timeout.
ISSUE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
GRPC_BUCKETS = ISSUE_BUCKETS
# From a pod's IP showing in the watch to a certificate carrying it: one local issue, or a
# cert-manager round trip.
POD_IP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# What became of an Event (agent/kube/events.py), pre-created at zero.
EVENT_RESULTS = ("written", "failed", "dropped", "limited")

_VOLUME_LABELS = ("namespace", "pod", "volume_id", "issuer")

NODE_CA_OUTCOMES = (
    "issued",
    "permission_denied",
    "deadline_exceeded",
    "unavailable",
    "failed",
    "failed_precondition",
    "invalid_request",
    "error",
)


class _VolumeGauges(Collector):
    """The two per-volume gauges, made into series at scrape time from one dict entry per
    volume: recording a volume (every publish and renewal, and every volume at start) is one
    dict store instead of two labelled children found or created under prometheus_client's
    locks (a tenth of a restart's time per volume)."""

    def __init__(self) -> None:
        # volume id -> ((namespace, pod, volume id, issuer), notAfter, next renewal)
        self.series: dict[str, tuple[tuple[str, str, str, str], float, float]] = {}

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> list[Metric]:
        return list(self._families(list(self.series.values())))

    @staticmethod
    def _families(
        rows: list[tuple[tuple[str, str, str, str], float, float]],
    ) -> tuple[Metric, Metric]:
        expiry = GaugeMetricFamily(
            "cert_agent_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate in a volume (Unix time).",
            labels=_VOLUME_LABELS,
        )
        renewal = GaugeMetricFamily(
            "cert_agent_certificate_renewal_timestamp_seconds",
            "When the certificate in a volume is due to renew (Unix time); stays in the past "
            "while renewals fail.",
            labels=_VOLUME_LABELS,
        )
        for labels, not_after, next_renewal in rows:
            expiry.add_metric(labels, not_after)
            renewal.add_metric(labels, next_renewal)
        return expiry, renewal


class AgentMetrics:
    """All of the agent's metrics. Thread-safe."""

    def __init__(
        self, registry: CollectorRegistry | None = None, version: str = agent.__version__
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._lock = threading.Lock()
        self._issuers_seen: set[str] = set()
        # Children of the per-call series, looked up once: labels() validates and locks on
        # every call, several times per publish. These series are never removed.
        self._grpc_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._issue_children: dict[tuple[str, str], tuple[Any, Any]] = {}

        self.build_info = Gauge(
            "cert_agent_build_info", "The agent's version (always 1).", ["version"], registry=r
        )
        self.build_info.labels(version).set(1)
        self.managed_volumes = Gauge(
            "cert_agent_managed_volumes", "Volumes the agent currently manages.", registry=r
        )
        self._volumes = _VolumeGauges()
        r.register(self._volumes)
        self.issue_attempts = Counter(
            "cert_agent_issue_attempts",
            "Certificate issue and renewal attempts.",
            ["issuer", "operation"],
            registry=r,
        )
        self.issue_failures = Counter(
            "cert_agent_issue_failures",
            "Failed certificate issue and renewal attempts, by reason.",
            ["issuer", "operation", "reason"],
            registry=r,
        )
        self.issue_duration = Histogram(
            "cert_agent_issue_duration_seconds",
            "Time to get a certificate signed (successful and failed attempts).",
            ["issuer", "operation"],
            buckets=ISSUE_BUCKETS,
            registry=r,
        )
        self.grpc_requests = Counter(
            "cert_agent_grpc_requests",
            "CSI gRPC requests handled, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_duration = Histogram(
            "cert_agent_grpc_request_duration_seconds",
            "CSI gRPC request latency.",
            ["method"],
            buckets=GRPC_BUCKETS,
            registry=r,
        )
        self.renew_before_ignored = Counter(
            "cert_agent_renew_before_ignored",
            "Volumes whose renew-before was not shorter than the lifetime the issuer granted, "
            "so they renew at 2/3 of the lifetime instead (counted once per volume and run).",
            ["issuer"],
            registry=r,
        )
        self.tmpfs_free = Gauge(
            "cert_agent_tmpfs_free_bytes",
            "Free bytes on the tmpfs that holds every volume's files (read at scrape time).",
            registry=r,
        )
        self.tmpfs_size = Gauge(
            "cert_agent_tmpfs_size_bytes",
            "Size of the tmpfs that holds every volume's files.",
            registry=r,
        )
        self.ca_expiry = Gauge(
            "cert_agent_ca_expiry_timestamp_seconds",
            "notAfter of the local CA certificate (Unix time).",
            registry=r,
        )
        # Node CA mode (0 / absent otherwise).
        self.node_ca_expiry = Gauge(
            "cert_agent_node_ca_expiry_timestamp_seconds",
            "notAfter of this node's intermediate CA (Unix time); 0 without node CA mode.",
            registry=r,
        )
        self.node_ca_renewal = Gauge(
            "cert_agent_node_ca_renewal_timestamp_seconds",
            "When this node's intermediate CA is due to renew (Unix time); stays in the past "
            "while renewals fail.",
            registry=r,
        )
        self.node_ca_info = Gauge(
            "cert_agent_node_ca_info",
            "The node CA in use (always 1): its issuer, and who enforces its name constraints "
            "(certificate: every verifier; agent: the issuer dropped them, only the agent).",
            ["issuer", "name_constraints"],
            registry=r,
        )
        self.node_ca_requests = Counter(
            "cert_agent_node_ca_requests",
            "Finished node CA requests (first issue and renewals) by outcome: issued, or the "
            "failure reason.",
            ["outcome"],
            registry=r,
        )
        self.pod_ip_latency = Histogram(
            "cert_agent_pod_ip_san_latency_seconds",
            "Seconds from a pod's IP appearing in the pod watch to its volume's certificate "
            "carrying it (${POD_IP}/${POD_IPS} in ip-sans).",
            buckets=POD_IP_BUCKETS,
            registry=r,
        )
        self.volumes_waiting_for_pod_ip = Gauge(
            "cert_agent_volumes_waiting_for_pod_ip",
            "Volumes whose certificate does not carry the pod's IPs yet.",
            registry=r,
        )
        self.trust_bundle_stale = Gauge(
            "cert_agent_trust_bundle_stale",
            "1 while a trust bundle source is missing or invalid and volumes keep its last good "
            "content.",
            ["source"],
            registry=r,
        )
        self.trust_bundle_rewrites = Counter(
            "cert_agent_trust_bundle_rewrites",
            "ca.crt files rewritten because their trust bundle changed (no reissue).",
            registry=r,
        )
        self.policy_reloads = Counter(
            "cert_agent_policy_reload",
            "Reloads of the --policy file, by result (failure: the last good policy stays).",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.policy_reloads.labels(result)
        self.policy_info = Gauge(
            "cert_agent_policy_info",
            "The issuance policy in force (always 1): its SHA-256 and source (file or default).",
            ["sha256", "source"],
            registry=r,
        )
        self.policy_loaded_timestamp = Gauge(
            "cert_agent_policy_loaded_timestamp_seconds",
            "When the issuance policy in force was loaded (Unix time).",
            registry=r,
        )
        self.policy_last_reload_successful = Gauge(
            "cert_agent_policy_last_reload_successful",
            "1 when the newest version of the --policy file is in force, 0 when it was refused.",
            registry=r,
        )
        self.policy_last_reload_successful.set(1)
        self.events = Counter(
            "cert_agent_events",
            "Kubernetes Events on pods by result: written; failed (refused or unreachable); "
            "dropped (the writer's queue was full); limited (a rate limit deferred the write, "
            "the occurrence still counts in its series).",
            ["result"],
            registry=r,
        )
        for result in EVENT_RESULTS:
            self.events.labels(result)
        self._init_issuer(LOCAL_ISSUER)

    def _init_issuer(self, issuer: str) -> None:
        """Create an issuer's counter series at zero so rate() works from the first scrape."""
        with self._lock:
            if issuer in self._issuers_seen:
                return
            self._issuers_seen.add(issuer)
        self.renew_before_ignored.labels(issuer)
        for operation in OPERATIONS:
            self.issue_attempts.labels(issuer, operation)
            self.issue_duration.labels(issuer, operation)
            for reason in KNOWN_FAILURE_REASONS:
                self.issue_failures.labels(issuer, operation, reason)

    # -------------------------------------------------------------------------- volumes

    def set_volume(
        self,
        volume_id: str,
        namespace: str,
        pod: str,
        issuer: str,
        not_after: float,
        next_renewal: float,
    ) -> None:
        """Record a volume's certificate expiry and due renewal, replacing its earlier series."""
        # One dict store (atomic under the GIL; a scrape copies the dict first).
        self._volumes.series[volume_id] = (
            (namespace, pod, volume_id, issuer),
            not_after,
            next_renewal,
        )

    def remove_volume(self, volume_id: str) -> None:
        """Drop both series of a volume (unknown volumes are ignored)."""
        self._volumes.series.pop(volume_id, None)

    def set_managed_volumes(self, count: int) -> None:
        self.managed_volumes.set(count)

    # -------------------------------------------------------------------------- issuance

    def _issue_series(self, issuer: str, operation: str) -> tuple[Any, Any]:
        """(attempts, duration) children of ``issuer`` and ``operation``."""
        children = self._issue_children.get((issuer, operation))
        if children is None:
            _check_operation(operation)
            self._init_issuer(issuer)
            children = (
                self.issue_attempts.labels(issuer, operation),
                self.issue_duration.labels(issuer, operation),
            )
            self._issue_children[(issuer, operation)] = children
        return children

    def issue_started(self, issuer: str, operation: str) -> None:
        self._issue_series(issuer, operation)[0].inc()

    def issue_finished(
        self, issuer: str, operation: str, seconds: float, failure_reason: str | None
    ) -> None:
        """Record a finished attempt; ``failure_reason`` is None on success (else a short code)."""
        duration = self._issue_series(issuer, operation)[1]
        # Failures first: a scrape in between must never look like a success (the
        # "renewals failing" alert counts successes as finished attempts minus failures).
        if failure_reason is not None:
            self.issue_failures.labels(issuer, operation, failure_reason).inc()
        duration.observe(seconds)

    # -------------------------------------------------------------------------- gRPC and CA

    def note_renew_before_ignored(self, issuer: str) -> None:
        self._init_issuer(issuer)
        self.renew_before_ignored.labels(issuer).inc()

    def observe_grpc(self, method: str, code: str, seconds: float) -> None:
        children = self._grpc_children.get((method, code))
        if children is None:
            children = (self.grpc_requests.labels(method, code), self.grpc_duration.labels(method))
            self._grpc_children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch_tmpfs(self, free_space: Callable[[], tuple[int, int]]) -> None:
        """Report ``free_space()`` ((free, size) in bytes) at every scrape."""

        def read(index: int) -> float:
            try:
                return float(free_space()[index])
            except Exception:  # a scrape must not fail because statvfs did
                return math.nan

        self.tmpfs_free.set_function(lambda: read(0))
        self.tmpfs_size.set_function(lambda: read(1))

    def set_ca_expiry(self, timestamp: float) -> None:
        self.ca_expiry.set(timestamp)

    # -------------------------------------------------------------------------- node CA

    def enable_node_ca(self) -> None:
        """Create the node CA request series at zero, so rate() sees the first of each."""
        for outcome in NODE_CA_OUTCOMES:
            self.node_ca_requests.labels(outcome)

    def set_node_ca(
        self, issuer: str, not_after: float, renew_at: float, *, enforced_by_agent: bool
    ) -> None:
        self.node_ca_expiry.set(not_after)
        self.node_ca_renewal.set(renew_at)
        with self._lock:
            self.node_ca_info.clear()
            self.node_ca_info.labels(issuer, "agent" if enforced_by_agent else "certificate").set(1)

    def node_ca_request(self, outcome: str) -> None:
        self.node_ca_requests.labels(outcome).inc()

    # -------------------------------------------------------------------------- pod IPs, bundles

    def observe_pod_ip_latency(self, seconds: float) -> None:
        self.pod_ip_latency.observe(max(0.0, seconds))

    def set_waiting_for_pod_ip(self, count: int) -> None:
        self.volumes_waiting_for_pod_ip.set(count)

    def set_trust_bundle_stale(self, source: str, stale: bool) -> None:
        if stale:
            self.trust_bundle_stale.labels(source).set(1)
        else:
            with contextlib.suppress(KeyError):
                self.trust_bundle_stale.remove(source)

    def event_result(self, result: str) -> None:
        """One Event write decided or done (``EVENT_RESULTS``)."""
        if result not in EVENT_RESULTS:
            raise ValueError(f"event result must be one of {', '.join(EVENT_RESULTS)}")
        self.events.labels(result).inc()

    def trust_bundle_rewritten(self) -> None:
        self.trust_bundle_rewrites.inc()

    # -------------------------------------------------------------------------- policy

    def policy_reloaded(self, result: str) -> None:
        """Count a reload of the policy file; ``result`` is success or failure."""
        self.policy_reloads.labels(result).inc()
        self.policy_last_reload_successful.set(1 if result == "success" else 0)

    def policy_loaded(self, sha256: str, source: str, timestamp: float) -> None:
        """Record the policy now in force (one info series at a time)."""
        with self._lock:
            self.policy_info.clear()
            self.policy_info.labels(sha256, source).set(1)
        self.policy_loaded_timestamp.set(timestamp)


def _check_operation(operation: str) -> None:
    # A fixed label set: a typo must not mint new series the alerts never look at.
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}, got {operation!r}")
