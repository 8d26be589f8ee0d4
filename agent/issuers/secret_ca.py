"""The local CA from a Kubernetes Secret (``--ca-secret NAMESPACE/NAME``), reloaded on change.

The Secret holds ``ca.crt`` and ``ca.key`` (the seed's custom-CA format). A watch on that one
Secret picks up a rotation without a restart. After a rotation the volumes' ``ca.crt`` carries
the new CA and the previous one(s), so peers holding certificates from either CA keep trusting
each other, until ``retire`` drops a previous one (``ca_rotation`` decides when: after the
overlap).
A broken update (bad PEM, key not matching) is logged and ignored: the agent keeps signing with
the last good CA rather than stopping.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, cast

from agent.errors import FailedPrecondition
from agent.kube.client import NotFound, backoff_delay, with_retries
from agent.kube.informer import Informer, Snapshot
from agent.kube.rest import ApiClient
from agent.pki.ca import CAError, CertificateAuthority, load_ca_pem

log = logging.getLogger(__name__)

CERT_KEY = "ca.crt"
KEY_KEY = "ca.key"
STARTUP_SECONDS = 30.0

Obj = dict[str, Any]


@dataclass(frozen=True)
class PreviousCA:
    """A CA the Secret held before: its trust anchor (kept in ca.crt) and its notAfter."""

    trust_pem: bytes
    not_after: float  # Unix time; no certificate it issued is valid after it


class SecretCAProvider:
    """A ``CAProvider`` backed by a Secret, kept current by a list+watch (``kube/informer``)."""

    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        name: str,
        *,
        on_change: Callable[[], None] | None = None,
        on_load: Callable[[CertificateAuthority], None] | None = None,
        startup_timeout: float = STARTUP_SECONDS,
        require_at_start: bool = True,
        backoff: Callable[[int], float] = backoff_delay,
    ) -> None:
        self._api = api
        self.namespace = namespace
        self.name = name
        self._on_change = on_change
        self._on_load = on_load
        self._require_at_start = require_at_start
        self._startup_timeout = startup_timeout
        self._lock = threading.Lock()
        self._current: CertificateAuthority | None = None
        self._previous: list[PreviousCA] = []  # newest first
        self._data: dict[str, str] | None = None
        self._deleted = False
        self.last_error: str | None = None
        # The list+watch of this one Secret: after a 410 (compaction) it lists again and
        # watches from the list's version, never from the Secret's own older one.
        self._informer = Informer(
            api,
            f"/api/v1/namespaces/{namespace}/secrets",
            field_selector=f"metadata.name={name}",
            what=f'list and watch secrets "{name}" in namespace "{namespace}"',
            on_change=self._on_snapshot,
            name=f"ca-secret-{namespace}-{name}",
            backoff=backoff,
        )

    @property
    def source(self) -> str:
        return f"Secret {self.namespace}/{self.name}"

    # ---- lifecycle

    def start(self) -> None:
        """Load the CA, then watch it.

        A missing or unusable Secret raises a clear ``FailedPrecondition`` when
        ``require_at_start``; otherwise it is logged, ``current()`` reports it until the Secret
        is fixed, and the watch loads it the moment it appears (so the agent can serve
        cert-manager volumes and report NotReady instead of crash-looping).
        """
        try:
            secret = self._read(time.monotonic() + self._startup_timeout)
            self._apply(secret, initial=True)
        except FailedPrecondition as exc:
            if self._require_at_start:
                raise
            self.last_error = exc.message
            log.error("local CA not available yet", extra={"error": exc.message})
        self._informer.start()

    def stop(self) -> None:
        self._informer.stop()

    # ---- CAProvider

    def current(self) -> CertificateAuthority:
        with self._lock:
            if self._current is None:
                raise FailedPrecondition(
                    self.last_error or f"the CA from {self.source} is not loaded yet"
                )
            return self._current

    def trust_bundle_pem(self) -> bytes:
        """The current CA's trust anchor, then those of CAs it replaced and not yet retired."""
        with self._lock:
            if self._current is None:
                raise FailedPrecondition(f"the CA from {self.source} is not loaded yet")
            parts: list[bytes] = [self._current.trust_pem]
            for previous in self._previous:
                if previous.trust_pem not in parts:
                    parts.append(previous.trust_pem)
        return b"".join(parts)

    def previous(self) -> list[PreviousCA]:
        """The CAs this one replaced that are still in the trust bundle, newest first."""
        with self._lock:
            return list(self._previous)

    def retire(self, trust_pems: Collection[bytes]) -> int:
        """Drop these previous CAs from the trust bundle; returns how many were there."""
        with self._lock:
            before = len(self._previous)
            self._previous = [p for p in self._previous if p.trust_pem not in trust_pems]
            retired = before - len(self._previous)
        if retired:
            log.info("retired previous CA(s) from the trust bundle", extra={"count": retired})
        return retired

    def retire_previous(self) -> None:
        """Drop every previous CA from the trust bundle."""
        self.retire({p.trust_pem for p in self.previous()})

    def restore_previous(self, cas: Iterable[PreviousCA]) -> None:
        """Trust CAs replaced before a restart again (oldest last), unless one is current."""
        with self._lock:
            current = self._current.trust_pem if self._current is not None else None
            known = {p.trust_pem for p in self._previous}
            for ca in cas:
                if ca.trust_pem != current and ca.trust_pem not in known:
                    self._previous.append(ca)
                    known.add(ca.trust_pem)

    @property
    def rotating(self) -> bool:
        """Whether old CAs are still in the trust bundle."""
        with self._lock:
            return bool(self._previous)

    # ---- loading

    def _read(self, deadline: float) -> Obj:
        try:
            secret = with_retries(
                lambda: cast(
                    Obj, self._api.get(f"/api/v1/namespaces/{self.namespace}/secrets/{self.name}")
                ),
                what=f'get secrets "{self.name}" in namespace "{self.namespace}"',
                deadline=deadline,
            )
        except NotFound as exc:
            raise FailedPrecondition(
                f"the CA {self.source} does not exist: create it with keys {CERT_KEY} and "
                f"{KEY_KEY} (kubectl -n {self.namespace} create secret generic {self.name} "
                f"--from-file={CERT_KEY}=ca.pem --from-file={KEY_KEY}=ca-key.pem)"
            ) from exc
        return secret

    def _decode(self, secret: Obj) -> tuple[bytes, bytes]:
        data: dict[str, str] = secret.get("data") or {}
        missing = [k for k in (CERT_KEY, KEY_KEY) if not data.get(k)]
        if missing:
            have = ", ".join(sorted(data)) or "none"
            raise FailedPrecondition(
                f"the CA {self.source} lacks key(s) {', '.join(missing)} (it has: {have}); it "
                f"must hold {CERT_KEY} (the CA certificate, PEM) and {KEY_KEY} (its private key)"
            )
        try:
            return base64.b64decode(data[CERT_KEY]), base64.b64decode(data[KEY_KEY])
        except (binascii.Error, ValueError) as exc:
            raise FailedPrecondition(f"the CA {self.source} holds invalid base64: {exc}") from exc

    def _apply(self, secret: Obj, *, initial: bool = False) -> None:
        """Load the Secret's CA; on a later change keep the old CA in the bundle."""
        data = dict(secret.get("data") or {})
        if not initial and data == self._data:
            return  # metadata-only change
        try:
            cert_pem, key_pem = self._decode(secret)
            ca = load_ca_pem(cert_pem, key_pem, self.source)
        except (CAError, FailedPrecondition) as exc:
            if initial:
                raise
            self.last_error = exc.message
            self._data = data
            still = (
                "still signing with the previous CA" if self._current else "nothing to sign with"
            )
            log.error(
                f"CA Secret changed but cannot be used; {still}",
                extra={"secret": self.source, "error": exc.message},
            )
            return
        with self._lock:
            old = self._current
            self._data = data
            self.last_error = None
            if old is not None and old.cert_pem == ca.cert_pem:
                self._current = ca
                return
            if old is not None:
                replaced = PreviousCA(old.trust_pem, old.not_after.timestamp())
                self._previous = [
                    p for p in self._previous if p.trust_pem not in (ca.trust_pem, old.trust_pem)
                ]
                if old.trust_pem != ca.trust_pem:
                    self._previous.insert(0, replaced)
            self._current = ca
        log.info(
            "loaded CA from Secret",
            extra={"secret": self.source, "subject": ca.certificate.subject.rfc4514_string()},
        )
        if self._on_load is not None:
            self._on_load(ca)
        # A change replaces a CA certificates were issued from; a first load replaces nothing.
        if old is not None and self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("CA change callback failed")

    # ---- watching

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        """The informer's view of the one Secret: load a change, report a deletion once."""
        secret = snapshot.get(f"{self.namespace}/{self.name}")
        if secret is not None:
            self._deleted = False
            self._apply(secret)
        elif self._data is not None and not self._deleted:
            self._deleted = True
            self.last_error = f"the CA {self.source} was deleted"
            log.error(
                "CA Secret deleted; still signing with the last CA loaded from it",
                extra={"secret": self.source},
            )
