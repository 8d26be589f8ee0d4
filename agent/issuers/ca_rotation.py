"""CA rotation from a watched Secret: reissue every volume, then retire the old CA.

While a change is in flight every volume's ca.crt carries both the old and the new CA (the
provider's trust bundle), so pods holding old and new certificates keep trusting each other.
Once every volume holds a certificate issued after the change, the old CA is retired.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.issuers.secret_ca import SecretCAProvider
from agent.pki.ca import CertificateAuthority

log = logging.getLogger(__name__)


class SecretCARotation:
    def __init__(
        self,
        api: Any,
        namespace: str,
        name: str,
        *,
        reissue_all: Callable[[], None],
        on_load: Callable[[CertificateAuthority], None] | None = None,
    ) -> None:
        self._reissue_all = reissue_all
        self._lock = threading.Lock()
        self.changed_at: float | None = None
        # A missing Secret at start is not fatal: the agent reports NotReady until it appears.
        self.provider = SecretCAProvider(
            api,
            namespace,
            name,
            on_change=self._on_change,
            on_load=on_load,
            require_at_start=False,
        )

    def start(self) -> None:
        self.provider.start()

    def stop(self) -> None:
        self.provider.stop()

    def _on_change(self) -> None:
        with self._lock:
            self.changed_at = time.time()
        log.info("CA secret changed: reissuing every volume's certificate")
        self._reissue_all()

    def note_issued(
        self,
        not_befores: Callable[[], Iterable[float | None]],
        rewrite_bundles: Callable[[bytes], int],
    ) -> None:
        """After each commit: once every volume holds a certificate issued after the change,
        retire the old CA and drop it from every volume's ca.crt."""
        with self._lock:
            changed_at = self.changed_at
            if changed_at is None:
                return
            # Certificates start "now" at whole-second precision; allow that much slack.
            if not all(nb is not None and nb >= changed_at - 1 for nb in not_befores()):
                return
            self.changed_at = None
        # The caller holds one volume's lock; the rewrite takes each volume's lock in turn.
        threading.Thread(
            target=self._retire, args=(rewrite_bundles,), name="ca-retire", daemon=True
        ).start()

    def _retire(self, rewrite_bundles: Callable[[bytes], int]) -> None:
        self.provider.retire_previous()
        try:
            count = rewrite_bundles(self.provider.trust_bundle_pem())
        except Exception:
            log.exception("could not drop the retired CA from the volumes' ca.crt")
            return
        log.info(
            "every volume holds a certificate from the new CA; old CA retired",
            extra={"volumes_rewritten": count},
        )
