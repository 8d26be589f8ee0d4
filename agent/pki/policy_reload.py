"""The policy in force, reloaded when its file changes.

``PolicySource`` is what the agent hands to everything that checks requests: its ``check`` uses
whichever policy is current. ``poll()`` looks at the file and reloads it when it changed; the
agent calls it from a thread every few seconds, tests call it directly (no sleeps, no inotify).

Change detection is by ``stat``: the resolved path plus device, inode, size and mtime. A
ConfigMap volume updates by swapping its ``..data`` symlink to a new timestamped directory, so the
resolved path (and the inode) of ``policy.yaml`` changes even when the size and mtime would not;
an in-place edit changes the inode or the mtime. Same content (same SHA-256) is not a reload.

What is in force: the file's policy when it is valid; after a broken edit, the last good one
(the error is logged, counted as ``cert_agent_policy_reload_total{result="failure"}`` and added
to every denial message); the built-in default when no file is configured, when the file does
not exist (an optional ConfigMap not created yet), or when no version of it has loaded yet.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.pki.policy import Policy, PolicyDecision, PolicyRequest, PolicyViolation
from agent.pki.policy_loader import (
    DEFAULT_CLUSTER_DOMAIN,
    DEFAULT_SOURCE,
    DEFAULT_TRUST_DOMAIN,
    PolicyError,
    default_policy,
    load_policy_text,
)

log = logging.getLogger(__name__)

Signature = tuple[str, int, int, int, int] | None


class PolicyObserver(Protocol):
    """Where reload outcomes go (the agent's metrics)."""

    def policy_reloaded(self, result: str) -> None: ...

    def policy_loaded(self, sha256: str, source: str, timestamp: float) -> None: ...


class PolicySource:
    """The current policy, the last load problem, and the file watch. Thread-safe."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        observer: PolicyObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._cluster_domain = cluster_domain
        self._trust_domain = trust_domain
        self._observer = observer
        self._clock = clock
        self._lock = threading.Lock()
        self._policy = default_policy(cluster_domain, trust_domain)
        self._problem: str | None = None
        self._signature: Signature = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._announce(self._policy)
        if path is not None:
            self.poll(initial=True)

    @property
    def policy(self) -> Policy:
        with self._lock:
            return self._policy

    @property
    def problem(self) -> str | None:
        """Why the file's newest version is not in force, or None when it is."""
        with self._lock:
            return self._problem

    def check(self, request: PolicyRequest) -> PolicyDecision:
        with self._lock:
            policy, problem = self._policy, self._problem
        try:
            return policy.check(request)
        except PolicyViolation as exc:
            if problem is None:
                raise
            raise PolicyViolation(
                f"{exc.message} (the policy file's newest version is not in force: {problem})",
                exc.rule,
            ) from None

    # ----------------------------------------------------------------------------- reload

    def poll(self, *, initial: bool = False) -> bool:
        """Reload when the file changed; returns True when the policy in force changed."""
        if self.path is None:
            return False
        signature = _signature(self.path)
        with self._lock:
            if signature == self._signature and not initial:
                return False
            self._signature = signature
            current = self._policy
        if signature is None:
            self._clear_problem()
            if current.source == DEFAULT_SOURCE and not initial:
                return False
            log.warning(
                "the policy file does not exist; the built-in default policy applies",
                extra={"policy": str(self.path)},
            )
            if current.source == DEFAULT_SOURCE:
                return False
            return self._install(default_policy(self._cluster_domain, self._trust_domain))
        try:
            raw = Path(signature[0]).read_bytes()
            policy = load_policy_text(raw, str(self.path), self._cluster_domain, self._trust_domain)
        except (OSError, PolicyError) as exc:
            message = exc.strerror if isinstance(exc, OSError) else str(exc)
            with self._lock:
                self._problem = message
            log.error(
                "the policy file is not valid; keeping the policy in force (%s): %s",
                current.source,
                message,
                extra={"policy": str(self.path), "error": message, "in_force": current.source},
            )
            if self._observer is not None:
                self._observer.policy_reloaded("failure")
            return False
        if policy.sha256 == current.sha256 and policy.source == current.source:
            self._clear_problem()  # back to the content in force, after a broken edit
            return False
        return self._install(policy)

    def _clear_problem(self) -> None:
        with self._lock:
            had_problem, self._problem = self._problem is not None, None
        if had_problem and self._observer is not None:
            self._observer.policy_reloaded("success")

    def _install(self, policy: Policy) -> bool:
        with self._lock:
            self._policy = policy
            self._problem = None
        log.info(
            "issuance policy loaded",
            extra={
                "policy": policy.source,
                "sha256": policy.sha256,
                "rules": [rule.name for rule in policy.rules],
            },
        )
        if self._observer is not None:
            self._observer.policy_reloaded("success")
        self._announce(policy)
        return True

    def _announce(self, policy: Policy) -> None:
        if self._observer is not None:
            source = "default" if policy.source != str(self.path) else "file"
            self._observer.policy_loaded(policy.sha256, source, self._clock())

    def start(self, interval_seconds: float = 5.0) -> None:
        """Poll the file every ``interval_seconds`` on a thread of its own."""
        if self.path is None or self._thread is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval_seconds):
                try:
                    self.poll()
                except Exception:  # never let the watch die: the last good policy stays
                    log.exception("policy reload failed", extra={"policy": str(self.path)})

        self._thread = threading.Thread(target=run, name="policy-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def _signature(path: Path) -> Signature:
    """Identity of the file's current content, following symlinks (None: missing)."""
    try:
        resolved = os.path.realpath(path)
        st = os.stat(resolved)
    except OSError:
        return None
    return (resolved, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
