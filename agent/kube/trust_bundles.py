"""Trust bundles from ConfigMaps and ClusterTrustBundles: one watch per source, shared by volumes.

A source is a ConfigMap key in a namespace, one ClusterTrustBundle by name, or every
ClusterTrustBundle of a signer (optionally narrowed by a label selector, as the kubelet's
``clusterTrustBundle`` projection selects them). Its bundle is the certificates it holds, parsed,
deduplicated and re-encoded, in a stable order (bundles by name, certificates in file order).
When a bundle changes, ``on_change(source, pem, volume_ids)`` tells the manager which volumes to
rewrite. A bundle that disappears or turns invalid later keeps serving its last good content and
is reported (``on_problem``, a log line); a source nobody uses any more stops its watch.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import FailedPrecondition, PermissionDenied, Unavailable
from agent.kube.bundle_source import BundleSource
from agent.kube.informer import Informer, Snapshot
from agent.kube.rest import ApiClient

log = logging.getLogger(__name__)

RBAC_HINT = (
    "grant get, list and watch on configmaps and clustertrustbundles.certificates.k8s.io to the "
    "agent (the deploy/components/pod-info component)"
)
CTB_PATH = "/apis/certificates.k8s.io/v1beta1/clustertrustbundles"
_PEM_BLOCK = re.compile(r"-----BEGIN ([^-]+)-----(.*?)-----END ([^-]+)-----", re.DOTALL)


class BundleError(ValueError):
    """The source's content is not a usable bundle (the message says why)."""


def parse_bundle(text: str, where: str) -> list[bytes]:
    """PEM CERTIFICATE blocks -> DER, deduplicated, in order; anything else is a BundleError."""
    blocks = list(_PEM_BLOCK.finditer(text))
    if not blocks:
        raise BundleError(f"{where} holds no PEM certificates")
    result: list[bytes] = []
    for number, block in enumerate(blocks, 1):
        if block.group(1) != "CERTIFICATE" or block.group(3) != "CERTIFICATE":
            raise BundleError(
                f"{where}: PEM block {number} is {block.group(1)!r}, not CERTIFICATE "
                "(a trust bundle holds only certificates, never keys)"
            )
        try:
            cert = x509.load_pem_x509_certificate(block.group(0).encode())
        except ValueError as exc:
            raise BundleError(
                f"{where}: PEM block {number} is not a valid certificate: {exc}"
            ) from None
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in result:
            result.append(der)
    return result


def to_pem(ders: list[bytes]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM) for der in ders
    )


class _Source:
    def __init__(self, source: BundleSource, informer: Informer) -> None:
        self.source = source
        self.informer = informer
        self.users: set[str] = set()
        self.good: bytes | None = None  # the last good bundle (PEM)
        self.problem: str | None = None  # why the current content is not used, if it is not


class TrustBundleWatcher:
    """The agent's trust-bundle sources; thread-safe."""

    def __init__(
        self,
        api: ApiClient,
        *,
        on_change: Callable[[BundleSource, bytes, set[str]], None] | None = None,
        on_problem: Callable[[BundleSource, bool], None] | None = None,
        informer_options: dict[str, Any] | None = None,
    ) -> None:
        self._api = api
        self.on_change = on_change
        self.on_problem = on_problem
        self._informer_options = informer_options or {}
        self._lock = threading.Lock()
        self._sources: dict[BundleSource, _Source] = {}

    # ---- volumes

    def acquire(self, source: BundleSource, volume_id: str, timeout: float) -> bytes:
        """Use ``source`` for ``volume_id``: its current bundle, or FAILED_PRECONDITION naming it.

        The watch starts with the first volume that uses the source.
        """
        state = self._attach(source, volume_id)
        if not state.informer.wait_first_list(timeout) and state.good is None:
            self.release(volume_id, source)
            error = state.informer.last_error
            if isinstance(error, PermissionDenied):
                raise PermissionDenied(f"{error.message}; {RBAC_HINT}")
            detail = error.message if error is not None else "no answer from the API server"
            raise Unavailable(f"cannot read the trust bundle {source.describe()}: {detail}")
        with self._lock:
            good, problem = state.good, state.problem
        if good is None:
            self.release(volume_id, source)
            raise FailedPrecondition(
                f"trust bundle {source.describe()}: {problem or 'not found'}; create it (or fix "
                "the trust-bundle attribute) and the mount is retried"
            )
        return good

    def attach(self, source: BundleSource, volume_id: str) -> None:
        """Use ``source`` for a volume already served (agent restart), without waiting."""
        self._attach(source, volume_id)

    def current(self, source: BundleSource) -> bytes | None:
        """The last good bundle of a source in use, or None."""
        with self._lock:
            state = self._sources.get(source)
            return None if state is None else state.good

    def release(self, volume_id: str, source: BundleSource | None = None) -> None:
        """``volume_id`` no longer uses ``source`` (or any source); unused watches stop."""
        stopped = []
        with self._lock:
            for key, state in list(self._sources.items()):
                if source is not None and key != source:
                    continue
                state.users.discard(volume_id)
                if not state.users:
                    del self._sources[key]
                    stopped.append(state)
        for state in stopped:
            state.informer.stop()
            if state.problem is not None and self.on_problem is not None:
                self.on_problem(state.source, False)

    def stop(self) -> None:
        with self._lock:
            states = list(self._sources.values())
            self._sources.clear()
        for state in states:
            state.informer.stop()

    def watched(self) -> list[BundleSource]:
        with self._lock:
            return list(self._sources)

    # ---- watching

    def _attach(self, source: BundleSource, volume_id: str) -> _Source:
        with self._lock:
            state = self._sources.get(source)
            if state is None:
                state = _Source(source, self._informer(source))
                self._sources[source] = state
                start = True
            else:
                start = False
            state.users.add(volume_id)
        if start:
            state.informer.start()
        return state

    def _informer(self, source: BundleSource) -> Informer:
        def changed(snapshot: Snapshot) -> None:
            self._on_snapshot(source, snapshot)

        options: dict[str, Any] = dict(self._informer_options)
        if source.kind == "configmap":
            return Informer(
                self._api,
                f"/api/v1/namespaces/{source.namespace}/configmaps",
                what=f'list and watch configmaps "{source.name}" in namespace "{source.namespace}"',
                on_change=changed,
                name=f"bundle-cm-{source.namespace}-{source.name}",
                field_selector=f"metadata.name={source.name}",
                **options,
            )
        if source.kind == "cluster":
            return Informer(
                self._api,
                CTB_PATH,
                what=f'list and watch clustertrustbundles "{source.name}"',
                on_change=changed,
                name=f"bundle-ctb-{source.name}",
                field_selector=f"metadata.name={source.name}",
                **options,
            )
        return Informer(
            self._api,
            CTB_PATH,
            what=f"list and watch clustertrustbundles of signer {source.signer_name}",
            on_change=changed,
            name=f"bundle-signer-{source.signer_name}",
            field_selector=f"spec.signerName={source.signer_name}",
            label_selector=source.label_selector or None,
            **options,
        )

    def _content(self, source: BundleSource, snapshot: Snapshot) -> bytes:
        where = source.describe()
        if source.kind == "configmap":
            obj = snapshot.get(f"{source.namespace}/{source.name}")
            if obj is None:
                raise BundleError(f"ConfigMap {source.namespace}/{source.name} does not exist")
            text = (obj.get("data") or {}).get(source.key)
            if text is None:
                have = ", ".join(sorted(obj.get("data") or {})) or "none"
                raise BundleError(f"{where}: the ConfigMap has no such key (it has: {have})")
            return to_pem(parse_bundle(text, where))
        if not snapshot:
            raise BundleError(
                "no such ClusterTrustBundle"
                if source.kind == "cluster"
                else "no ClusterTrustBundle matches"
            )
        ders: list[bytes] = []
        for name in sorted(snapshot):
            text = (snapshot[name].get("spec") or {}).get("trustBundle") or ""
            for der in parse_bundle(text, f"ClusterTrustBundle {name}"):
                if der not in ders:
                    ders.append(der)
        return to_pem(ders)

    def _on_snapshot(self, source: BundleSource, snapshot: Snapshot) -> None:
        with self._lock:
            state = self._sources.get(source)
        if state is None:
            return
        try:
            pem = self._content(source, snapshot)
        except BundleError as exc:
            with self._lock:
                had_problem, state.problem = state.problem, str(exc)
                good = state.good
            if good is not None:
                log.error(
                    "trust bundle unusable; volumes keep the last good one",
                    extra={"source": source.describe(), "error": str(exc)},
                )
                if had_problem is None and self.on_problem is not None:
                    self.on_problem(source, True)
            return
        with self._lock:
            had_problem, state.problem = state.problem, None
            previous, state.good = state.good, pem
            users = set(state.users)
        if had_problem is not None and previous is not None and self.on_problem is not None:
            self.on_problem(source, False)
        if previous != pem and users:
            # Also on a first load after a restart, when volumes still hold what they had.
            log.info(
                "trust bundle changed",
                extra={"source": source.describe(), "volumes": len(users)},
            )
            if self.on_change is not None:
                self.on_change(source, pem, users)
