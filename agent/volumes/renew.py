"""Renewal, called by the scheduler: issue without the volume's lock, commit under it.

A failure raises (the scheduler backs off and retries) and leaves the old certificate in place;
failures and recoveries are counted per volume and told to the pod's owner.
"""

from __future__ import annotations

import logging

from agent.errors import (
    AgentError,
    PermissionDenied,
)
from agent.spec.attributes import parse_volume_context
from agent.spec.model import CertificateSpec, PodInfo
from agent.volumes.issue import Issuing
from agent.volumes.manager_core import (
    ip_sans_key,
    log_fields,
    pod_of,
)
from agent.volumes.store import (
    VolumeMeta,
    VolumeState,
    read_payload_file,
)

# The manager's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.volumes.manager")


class Renewing(Issuing):
    """The scheduler's renewals."""

    def renew(self, volume_id: str) -> float | None:
        """Scheduler callback: renew (or finish) a volume; returns its next due time or None."""
        try:
            next_due = self._renew(volume_id)
        except Exception as exc:
            self._renewal_failed(volume_id, exc)
            raise
        failures = self._failures.pop(volume_id, None)
        if failures is not None and next_due is not None:
            self._renewal_recovered(volume_id, failures.count)
        return next_due

    def _renewal_failed(self, volume_id: str, exc: Exception) -> None:
        """Count the failure and tell the pod's owner (best effort: never raises)."""
        try:
            message = exc.message if isinstance(exc, AgentError) else f"internal error: {exc}"
            meta = self.store.load(volume_id)
            if meta is None:
                self._failures.pop(volume_id, None)
                return
            now = self.clock()
            count = self._count_failure(volume_id, message)
            pod = pod_of(meta.volume_context)
            if pod is None:
                return
            if meta.state != VolumeState.READY:
                if isinstance(exc, AgentError):
                    self._notify_issue_failed(pod, exc)
                return
            if isinstance(exc, PermissionDenied):
                self.events.policy_denied(pod, message)
            else:
                self.events.renewal_failed(pod, message, count)
            window = renew_before_window_start(meta)
            if window is not None and meta.not_after is not None and now >= window:
                self.events.expiring(pod, meta.not_after, window, message)
        except Exception:
            log.exception("could not record a renewal failure", extra={"volume_id": volume_id})

    def _renewal_recovered(self, volume_id: str, failures: int) -> None:
        try:
            meta = self.store.load(volume_id)
            pod = None if meta is None else pod_of(meta.volume_context)
            if meta is not None and pod is not None and meta.not_after is not None:
                self.events.renewal_recovered(pod, failures, meta.serial or "", meta.not_after)
        except Exception:
            log.exception("could not record a renewal recovery", extra={"volume_id": volume_id})

    def _renew(self, volume_id: str) -> float | None:
        self.priority.before_renewal()
        self.recovery.settle(volume_id)
        with self._attempt("renew") as attempt:
            with self._locks.hold(volume_id):
                meta = self.store.load(volume_id)
                if meta is None:
                    return None
                spec, pod = self._parse(meta.volume_context)
                if meta.state != VolumeState.READY:
                    # A first issue that never finished (the agent stopped during it): finish it.
                    self._first_issue(meta, spec, pod)
                    return meta.next_renewal
                attempt.start(self._issuer_label(spec))
                # A policy change can deny a renewal: the old certificate stays, the scheduler
                # retries with backoff, and the failure metric and log say why.
                spec = self._apply_policy(spec, pod, "renew")
                key = self._select_key(meta, spec, "renew", attempt)
                generation = meta.created_at
                # Without a loaded bundle (a restart, the source unreachable) ca.crt stays.
                bundle = self.trust.current(spec, pod)
                if bundle is None and spec.trust_bundle is not None:
                    bundle = read_payload_file(self._payload_dir(meta), spec.files.ca)
            # Issue without the lock, so unpublish and publish retries are never kept waiting.
            issue_spec, ips = self._renewal_spec(meta, spec, pod)
            issued = self._issue(meta, issue_spec, pod, key, attempt)
            with self._locks.hold(volume_id):
                current = self.store.load(volume_id)
                if current is None or current.created_at != generation:
                    log.info("volume went away during renewal", extra={"volume_id": volume_id})
                    return None
                self._commit(current, spec, pod, key, issued, attempt, bundle, ips)
        log.info(
            "renewed certificate",
            extra={**log_fields(current, pod), "serial": current.serial},
        )
        return current.next_renewal

    def _renewal_spec(
        self, meta: VolumeMeta, spec: CertificateSpec, pod: PodInfo
    ) -> tuple[CertificateSpec, tuple[str, ...]]:
        """The spec with the pod's IPs from the watch, or (no watch now) those it gave before:
        a certificate is never left to expire because the pod watch cannot run."""
        try:
            return self.pod_ips.spec_for_issue(spec, pod, ip_sans_key(meta))
        except AgentError as exc:
            ips = tuple(meta.pod_ips)
            log.warning(
                "renewing with the pod IPs known so far",
                extra={**log_fields(meta, pod), "error": exc.message},
            )
            return spec.with_pod_ips(ips), ips


def renew_before_window_start(meta: VolumeMeta) -> float | None:
    """When the volume's renew-before window opened (notAfter - renew-before), or None."""
    if meta.not_before is None or meta.not_after is None:
        return None
    try:
        spec, _pod = parse_volume_context(meta.volume_context, meta.node_id)
    except AgentError:
        return None
    lifetime = meta.not_after - meta.not_before
    asked = spec.renew_before_seconds
    # As plan_renewal: a third of the lifetime when unset or not shorter than the lifetime.
    before = lifetime / 3 if asked is None or asked >= lifetime else float(asked)
    return meta.not_after - before
