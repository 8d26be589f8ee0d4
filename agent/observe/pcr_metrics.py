"""Metrics of the PodCertificateRequest signer, on the agent's registry.

Kept apart from ``metrics.py`` so the signer's series exist only when it runs (and the CSI
metrics stay as they are). Outcomes are ``issued``, ``denied`` and ``failed``; ``reason`` is the
condition reason written to the PCR (``Issued`` for issued ones).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

OUTCOMES = ("issued", "denied", "failed")
# Watch event to status written: a pod GET, one signature, one status update.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip


class PcrMetrics:
    """``cert_agent_pcr_requests_total`` and ``cert_agent_pcr_sign_latency_seconds``."""

    def __init__(self, registry: CollectorRegistry, signers: tuple[str, ...] = ()) -> None:
        self.requests = Counter(
            "cert_agent_pcr_requests",
            "PodCertificateRequests this agent answered, by signer, outcome (issued, denied, "
            "failed) and condition reason.",
            ["signer", "outcome", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "cert_agent_pcr_sign_latency_seconds",
            "Seconds from a pending PodCertificateRequest arriving in the watch to its status "
            "written (issued, denied or failed).",
            ["signer"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for signer in signers:
            # Zero from the start, so rate() sees the first issue.
            self.requests.labels(signer, "issued", "Issued")
            self.latency.labels(signer)

    def answered(self, signer: str, outcome: str, reason: str, seconds: float | None) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown PCR outcome {outcome!r}")
        if seconds is not None:
            self.latency.labels(signer).observe(max(0.0, seconds))
        self.requests.labels(signer, outcome, reason).inc()
