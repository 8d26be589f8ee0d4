"""ca.crt from a trust bundle (trust-bundle-* attributes), rewritten live when the bundle changes.

The volume manager asks ``bundle_for`` on issue; a missing or empty bundle at publish is
FAILED_PRECONDITION naming it (kubelet retries). Bundle changes arrive from the watch thread and
are queued to one rewriter thread, which swaps a new ca.crt into each volume through the
manager (atomic ``..data`` swap, no reissue): a watch thread never waits for a volume lock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import FailedPrecondition
from agent.kube.bundle_source import BundleSource
from agent.observe.metrics import AgentMetrics
from agent.spec.model import CertificateSpec, PodInfo, TrustBundleRef

log = logging.getLogger(__name__)


class BundleWatcher(Protocol):
    """agent.kube.trust_bundles.TrustBundleWatcher, as the manager uses it."""

    def acquire(self, source: BundleSource, volume_id: str, timeout: float) -> bytes: ...

    def attach(self, source: BundleSource, volume_id: str) -> None: ...

    def current(self, source: BundleSource) -> bytes | None: ...

    def release(self, volume_id: str, source: BundleSource | None = None) -> None: ...


def source_of(ref: TrustBundleRef, pod: PodInfo) -> BundleSource:
    return BundleSource(
        kind=ref.kind.value,
        namespace=pod.namespace if ref.kind.value == "configmap" else "",
        name=ref.name,
        key=ref.key,
        signer_name=ref.signer_name,
        label_selector=ref.label_selector,
    )


def compose_ca(bundle: bytes, issuer_ca: bytes, include_issuer: bool) -> bytes:
    """The bundle, then (if asked) the issuer's CA certificates it lacks; deduplicated."""
    if not include_issuer or not issuer_ca.strip():
        return bundle
    ders = [
        c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(bundle)
    ]
    extra = b""
    for cert in x509.load_pem_x509_certificates(issuer_ca):
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in ders:
            ders.append(der)
            extra += cert.public_bytes(serialization.Encoding.PEM)
    return bundle + extra


class TrustBundles:
    """The manager's side of trust bundles: lookups on issue and the rewrite queue."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self.watcher: BundleWatcher | None = None
        self.wait_timeout = 10.0
        # Set by the manager: rewrite one volume's ca.crt; True when it was rewritten.
        self.rewrite: Callable[[str], bool] = lambda volume_id: False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._done = threading.Condition()
        self.rewritten = 0  # ca.crt files rewritten so far (tests wait on it)

    # ---- issue path

    def bundle_for(self, volume_id: str, spec: CertificateSpec, pod: PodInfo) -> bytes | None:
        ref = spec.trust_bundle
        if ref is None:
            return None
        if self.watcher is None:
            raise FailedPrecondition(
                f"{ref.describe(pod.namespace)} is a trust bundle in Kubernetes, but this agent "
                "runs without Kubernetes (--standalone)"
            )
        return self.watcher.acquire(source_of(ref, pod), volume_id, self.wait_timeout)

    def current(self, spec: CertificateSpec, pod: PodInfo) -> bytes | None:
        """The last good bundle of the volume's source (None when not loaded)."""
        if spec.trust_bundle is None or self.watcher is None:
            return None
        return self.watcher.current(source_of(spec.trust_bundle, pod))

    def attach(self, volume_id: str, spec: CertificateSpec, pod: PodInfo) -> None:
        if spec.trust_bundle is not None and self.watcher is not None:
            self.watcher.attach(source_of(spec.trust_bundle, pod), volume_id)

    def release(self, volume_id: str) -> None:
        if self.watcher is not None:
            self.watcher.release(volume_id)

    # ---- changes (called on the watch thread)

    def on_change(self, source: BundleSource, _pem: bytes, volume_ids: set[str]) -> None:
        for volume_id in sorted(volume_ids):
            self._queue.put(volume_id)

    def on_problem(self, source: BundleSource, stale: bool) -> None:
        self.metrics.set_trust_bundle_stale(source.describe(), stale)

    # ---- the rewriter thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trust-rewriter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(1)  # a daemon: a rewrite waiting for a volume lock is dropped

    def wait_rewritten(self, count: int, timeout: float) -> bool:
        """Block until ``rewritten`` reaches ``count`` (tests and benchmarks)."""
        with self._done:
            return self._done.wait_for(lambda: self.rewritten >= count, timeout)

    def _run(self) -> None:
        while True:
            volume_id = self._queue.get()
            if volume_id is None:
                return
            try:
                done = self.rewrite(volume_id)
            except Exception:
                log.exception("could not rewrite ca.crt", extra={"volume_id": volume_id})
                continue
            if done:
                self.metrics.trust_bundle_rewritten()
                with self._done:
                    self.rewritten += 1
                    self._done.notify_all()
