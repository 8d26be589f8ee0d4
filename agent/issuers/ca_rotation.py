"""CA rotation from a watched Secret: reissue every volume, keep the old CA trusted for an overlap.

When the Secret's CA changes, every local-CA volume on this node is reissued from the new CA at
once, and from then on every volume's ca.crt carries the new CA and the one it replaced. The
replaced CA stays there for the overlap (``--ca-overlap``; by default ``--max-duration``, the
longest lifetime a certificate from it can have): pods on other nodes, and applications that
reload their trust late, still present or expect certificates from it. It leaves once the overlap
has passed and every volume here holds a certificate from the new CA, or once it has expired
itself, whichever comes first (nothing it issued is valid after its notAfter). Then every
volume's ca.crt is rewritten through the atomic swap.

The replaced CAs and when they leave are kept in a small state file under the data root, so an
agent restarted during the overlap keeps trusting them.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.issuers.secret_ca import PreviousCA, SecretCAProvider
from agent.pki.ca import CertificateAuthority, write_atomic

log = logging.getLogger(__name__)

# The thread looks again at least this often: the overlap is wall-clock time, and a clock jump or
# a suspended node must not keep a retired CA in place for long.
MAX_SLEEP_SECONDS = 600.0
# Certificates start "now" at whole-second precision; allow that much slack.
NOT_BEFORE_SLACK_SECONDS = 1.0


@dataclass(frozen=True)
class Retiring:
    """A replaced CA still in the trust bundle, and when it may leave."""

    ca: PreviousCA
    replaced_at: float
    leaves_at: float  # replaced_at + overlap, but never after the CA's own notAfter

    def to_json(self) -> dict[str, Any]:
        return {
            "trust_pem": self.ca.trust_pem.decode(),
            "not_after": self.ca.not_after,
            "replaced_at": self.replaced_at,
            "leaves_at": self.leaves_at,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Retiring:
        return Retiring(
            PreviousCA(str(data["trust_pem"]).encode(), float(data["not_after"])),
            float(data["replaced_at"]),
            float(data["leaves_at"]),
        )


class SecretCARotation:
    def __init__(
        self,
        api: Any,
        namespace: str,
        name: str,
        *,
        reissue_all: Callable[[], None],
        overlap_seconds: float,
        state_file: Path | None = None,
        clock: Callable[[], float] = time.time,
        on_load: Callable[[CertificateAuthority], None] | None = None,
    ) -> None:
        if overlap_seconds < 0:
            raise ValueError(f"the CA overlap must not be negative, got {overlap_seconds}")
        self._reissue_all = reissue_all
        self.overlap_seconds = overlap_seconds
        self._state_file = state_file
        self._clock = clock
        self._lock = threading.Lock()
        # When the newest change happened; None once this node's volumes were all reissued.
        self.changed_at: float | None = None
        self._retiring: list[Retiring] = []
        self._load_state()
        self._start_times: Callable[[], Iterable[float | None]] | None = None
        self._rewrite_bundles: Callable[[bytes], int] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # A missing Secret at start is not fatal: the agent reports NotReady until it appears.
        self.provider = SecretCAProvider(
            api,
            namespace,
            name,
            on_change=self._on_change,
            on_load=on_load,
            require_at_start=False,
        )

    # ---- lifecycle

    def start(self) -> None:
        self.provider.start()
        # Replaced before a restart and not gone yet: trusted again (the Secret no longer has them).
        self.provider.restore_previous(r.ca for r in self._retiring)
        self._thread = threading.Thread(target=self._run, name="ca-overlap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.provider.stop()
        if self._thread is not None:
            self._thread.join(1)  # it wakes at once, unless rewriting ca.crt files right now

    def attach(
        self,
        start_times: Callable[[], Iterable[float | None]],
        rewrite_bundles: Callable[[bytes], int],
    ) -> None:
        """The manager's view: notBefore of each local-CA volume, and the ca.crt rewrite."""
        self._start_times = start_times
        self._rewrite_bundles = rewrite_bundles
        self._wake.set()

    def note_issued(self) -> None:
        """After each commit: look whether this node's reissue is complete (on our thread)."""
        if self.changed_at is not None:
            self._wake.set()

    def wake(self) -> None:
        """Look at the clock now (tests move a fake clock; a real one only needs the timeout)."""
        self._wake.set()

    def retiring(self) -> list[Retiring]:
        with self._lock:
            return list(self._retiring)

    # ---- the change

    def _on_change(self) -> None:
        now = self._clock()
        with self._lock:
            known = {r.ca.trust_pem for r in self._retiring}
            for ca in self.provider.previous():
                if ca.trust_pem not in known:
                    leaves_at = min(now + self.overlap_seconds, ca.not_after)
                    self._retiring.append(Retiring(ca, now, leaves_at))
            self.changed_at = now
            self._save_locked()
        log.info(
            "CA secret changed: reissuing every volume's certificate; the replaced CA stays in "
            "ca.crt for the overlap",
            extra={"ca_overlap_seconds": self.overlap_seconds},
        )
        self._reissue_all()
        self._wake.set()

    # ---- the overlap

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self._check()
            except Exception:
                log.exception("could not drop a retired CA from the volumes' ca.crt")
                delay = 60.0
            self._wake.wait(min(delay, MAX_SLEEP_SECONDS))
            self._wake.clear()

    def _check(self) -> float:
        """Drop every CA whose time has come; returns the seconds until the next one may go."""
        if self._start_times is None or self._rewrite_bundles is None:
            return math.inf  # the manager is not attached yet; attach() wakes us
        now = self._clock()
        self._check_reissued()
        with self._lock:
            reissued = self.changed_at is None
            leaving = [
                r
                for r in self._retiring
                if now >= r.ca.not_after or (reissued and now >= r.leaves_at)
            ]
        if leaving:
            self.provider.retire({r.ca.trust_pem for r in leaving})
            count = self._rewrite_bundles(self.provider.trust_bundle_pem())
            with self._lock:
                self._retiring = [r for r in self._retiring if r not in leaving]
                self._save_locked()
            log.info(
                "overlap over: retired CA dropped from every volume's ca.crt",
                extra={"retired": len(leaving), "volumes_rewritten": count},
            )
        with self._lock:
            reissued = self.changed_at is None
            times = [r.leaves_at if reissued else r.ca.not_after for r in self._retiring]
        return max(0.0, min(times, default=math.inf) - now)

    def _check_reissued(self) -> None:
        changed_at = self.changed_at
        if changed_at is None or self._start_times is None:
            return
        starts = list(self._start_times())
        if all(s is not None and s >= changed_at - NOT_BEFORE_SLACK_SECONDS for s in starts):
            with self._lock:
                if self.changed_at == changed_at:  # no newer change meanwhile
                    self.changed_at = None
                    self._save_locked()
            log.info(
                "every volume holds a certificate from the new CA", extra={"volumes": len(starts)}
            )

    # ---- state across restarts

    def _load_state(self) -> None:
        if self._state_file is None:
            return
        try:
            data = json.loads(self._state_file.read_text())
            retiring = [Retiring.from_json(item) for item in data["retiring"]]
            for r in retiring:
                x509.load_pem_x509_certificate(r.ca.trust_pem)
            changed_at = None if data["changed_at"] is None else float(data["changed_at"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "ignoring unreadable CA overlap state",
                extra={"path": str(self._state_file), "error": str(exc)},
            )
            return
        self._retiring, self.changed_at = retiring, changed_at

    def _save_locked(self) -> None:
        if self._state_file is None:
            return
        data = {
            "retiring": [r.to_json() for r in self._retiring],
            "changed_at": self.changed_at,
        }
        try:
            write_atomic(self._state_file, json.dumps(data, indent=1).encode(), 0o600)
        except OSError as exc:
            log.error(
                "cannot save the CA overlap state; a restart would forget the retired CA",
                extra={"path": str(self._state_file), "error": exc.strerror},
            )
