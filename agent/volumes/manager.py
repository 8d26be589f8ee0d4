"""The volume manager: publish, unpublish, renew and recover, one volume at a time.

Every change to a volume happens under that volume's lock. Issuance for a renewal runs outside
the lock (a slow cert-manager issuer must not block an unpublish) and is committed under it only
if the volume still exists. A volume that has served a certificate is never torn down by a
failure: the old files stay until new ones are complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ParamSpec, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent.errors import (
    Aborted,
    AgentError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    IssuanceFailed,
    PermissionDenied,
    ResourceExhausted,
    shorten,
)
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.issuers.local import format_duration
from agent.issuers.router import IssuerRouter
from agent.observe.metrics import CERT_MANAGER_ISSUER, LOCAL_ISSUER, AgentMetrics
from agent.pki.csr import build_csr
from agent.pki.keys import (
    PrivateKey,
    encode_private_key,
    generate_private_key,
    key_matches_spec,
    load_private_key,
)
from agent.pki.pkcs12 import build_keystore
from agent.pki.policy import PolicyChecker
from agent.spec.attributes import COMPAT_PREFIX, OWN_PREFIX, parse_volume_context
from agent.spec.model import CertificateSpec, KeyEncoding, PodInfo
from agent.volumes.events import NoEvents, VolumeEvents
from agent.volumes.locks import ConcurrencyLimit, KeyedLocks
from agent.volumes.mounter import Mounter
from agent.volumes.paths import PathMissing, TargetPolicy, canonical_path
from agent.volumes.pod_ips import PodIPTracker
from agent.volumes.policy_gate import apply_policy
from agent.volumes.priority import KubeletFirst
from agent.volumes.recovery import RecoveryQueue
from agent.volumes.scheduler import plan_renewal
from agent.volumes.status import snapshot as status_snapshot
from agent.volumes.store import (
    VolumeMeta,
    VolumeState,
    VolumeStore,
    payload_files_present,
    read_payload_file,
    validate_volume_id,
    write_payload,
)
from agent.volumes.trust import TrustBundles, compose_ca

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# kubelet passes service-account tokens here when the CSIDriver asks for tokenRequests. They are
# credentials: kept in memory for the issuer, never written to the metadata.
TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"


@dataclass
class RenewalFailures:
    """Consecutive failed renewals of one volume (memory only; a restart starts afresh)."""

    count: int
    last_error: str
    last_failure_at: float


@dataclass(frozen=True)
class PublishRequest:
    volume_id: str
    target_path: str
    volume_context: Mapping[str, str]
    readonly: bool
    volume_mount_group: str | None = None


class Scheduler(Protocol):
    def schedule(self, volume_id: str, due: float) -> None: ...

    def cancel(self, volume_id: str) -> None: ...


class _NoScheduler:
    def schedule(self, volume_id: str, due: float) -> None:
        pass

    def cancel(self, volume_id: str) -> None:
        pass


# Failure reasons of steps on the node (the issuer's own failures carry AgentError.reason).
STORAGE = "storage"  # the key, payload or metadata could not be read or written (tmpfs full, ...)
MOUNT = "mount"  # the payload could not be bind-mounted onto the target


class _Attempt:
    """What ``VolumeManager._attempt`` needs to count one attempt: labels, step, issuer time."""

    def __init__(self, operation: str, metrics: AgentMetrics) -> None:
        self.operation = operation
        self._metrics = metrics
        self.issuer: str | None = None  # set by start(); an attempt never started is not counted
        self.step: str | None = None  # a node-side step in progress: its name is the reason
        self.issuer_seconds = 0.0

    def start(self, issuer: str) -> None:
        self.issuer = issuer
        self._metrics.issue_started(issuer, self.operation)

    def reason_for(self, error_reason: str) -> str:
        return self.step or error_reason


def _kubelet_call(method: Callable[P, R]) -> Callable[P, R]:
    """Mark a kubelet call in flight for its duration (renewals give way: volumes/priority.py)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        manager = args[0]
        assert isinstance(manager, VolumeManager)
        with manager.priority.kubelet_call():
            return method(*args, **kwargs)

    return wrapper


class VolumeManager:
    def __init__(
        self,
        *,
        store: VolumeStore,
        mounter: Mounter,
        issuers: IssuerRouter,
        metrics: AgentMetrics,
        node_id: str,
        issue_timeout_seconds: float = 60.0,
        lock_timeout_seconds: float = 0.5,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        keygen_workers: int = 2,
        min_duration_seconds: int = 0,
        min_renewal_interval_seconds: float = 0.0,
        tmpfs_reserve_bytes: int = 0,
        target_policy: TargetPolicy | None = None,
        policy: PolicyChecker | None = None,
        policy_for_cert_manager: bool = False,
    ) -> None:
        self.store = store
        self.mounter = mounter
        self.issuers = issuers
        self.metrics = metrics
        self.node_id = node_id
        self.issue_timeout_seconds = issue_timeout_seconds
        self.lock_timeout_seconds = lock_timeout_seconds
        self.clock = clock
        self.rng = rng or random.Random()
        # Every target_path from a request passes this before any filesystem call.
        self.paths = target_policy or TargetPolicy(Path("/var/lib/kubelet"), store.data_root)
        self.scheduler: Scheduler = _NoScheduler()
        # Called after every commit (the CA rotation uses it to learn when it is complete).
        self.on_commit: Callable[[], None] | None = None
        # The local CA's trust bundle now (the CA rotation retires CAs from it); see _commit.
        self.local_trust_bundle: Callable[[], bytes] | None = None
        self._locks = KeyedLocks()
        # Volumes found on start and not recovered yet (see volumes/recovery.py).
        self.recovery = RecoveryQueue(self._recover_one)
        self.priority = KubeletFirst()
        # Latest service-account token per volume (memory only; see TOKENS_KEY).
        self._tokens: dict[str, str] = {}
        # What the pod's owner hears about (Kubernetes Events in cluster mode).
        self.events: VolumeEvents = NoEvents()
        self._failures: dict[str, RenewalFailures] = {}
        # ${POD_IP} SANs (the server attaches the pod watch) and trust bundles in ca.crt.
        self.pod_ips = PodIPTracker(metrics)
        self.pod_ips.reissue = lambda volume_id: self.scheduler.schedule(volume_id, 0.0)
        self.trust = TrustBundles(metrics)
        self.trust.rewrite = self._rewrite_trust_ca
        self.keygen = ConcurrencyLimit(keygen_workers)
        self.min_duration_seconds = min_duration_seconds
        self.min_renewal_interval_seconds = min_renewal_interval_seconds
        self.tmpfs_reserve_bytes = tmpfs_reserve_bytes
        # Volumes whose renew-before did not fit the granted lifetime, already reported once.
        self._renew_before_reported: set[str] = set()

        # The issuance policy: always for the agent's own CA, for cert-manager when asked to.
        self.policy = policy
        self.policy_for_cert_manager = policy_for_cert_manager

    def _parse(self, context: Mapping[str, str]) -> tuple[CertificateSpec, PodInfo]:
        return parse_volume_context(context, self.node_id)

    def attach_scheduler(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def attach_events(self, events: VolumeEvents) -> None:
        self.events = events

    def status(self) -> dict[str, Any]:
        """Every volume's state for `cert-agent status` (no key material, no passwords)."""
        due_time = getattr(self.scheduler, "due_time", None)
        return status_snapshot(
            self.store.metas(),
            self.renewal_failures(),
            due_time if due_time is not None else lambda _volume_id: None,
            self.clock(),
            self.node_id,
        )

    def renewal_failures(self) -> dict[str, RenewalFailures]:
        """A copy of the consecutive renewal failures per volume (for `cert-agent status`)."""
        return {
            k: RenewalFailures(v.count, v.last_error, v.last_failure_at)
            for k, v in list(self._failures.items())
        }

    # ----------------------------------------------------------------------------- publish

    @_kubelet_call
    def publish(self, request: PublishRequest) -> None:
        """Issue (or find) the volume's certificate and make it visible at target_path."""
        try:
            self._publish(request)
        except (Aborted, AlreadyExists):
            raise  # a retry in flight or a changed pod spec: kubelet's own event says enough
        except AgentError as exc:
            if isinstance(exc, DeadlineExceeded):
                # The volume stays (issuing) for kubelet's retry: `cert-agent status` shows why.
                self._count_failure(request.volume_id, exc.message)
            pod = _pod_of(request.volume_context)
            if pod is not None:
                self._notify_issue_failed(pod, exc)
            raise

    def _count_failure(self, volume_id: str, message: str) -> int:
        previous = self._failures.get(volume_id)
        count = 1 if previous is None else previous.count + 1
        self._failures[volume_id] = RenewalFailures(count, message, self.clock())
        return count

    def _notify_issue_failed(self, pod: PodInfo, exc: AgentError) -> None:
        if isinstance(exc, PermissionDenied):
            self.events.policy_denied(pod, exc.message)
        else:
            self.events.issue_failed(pod, exc.code, exc.message)

    def _publish(self, request: PublishRequest) -> None:
        validate_volume_id(request.volume_id)
        target = self.paths.check(request.target_path)
        self.recovery.settle(request.volume_id)
        if not request.readonly:
            raise InvalidArgument(
                "this driver only serves read-only volumes: set readOnly: true on the csi volume"
            )
        context = {k: v for k, v in request.volume_context.items() if k != TOKENS_KEY}
        token = _pick_token(request.volume_context.get(TOKENS_KEY))
        spec, pod = self._parse(context)
        # The whole walk before anything is written: a symlink or a missing parent fails here.
        with self.paths.open_target(target, create=False) as handle:
            handle.check()

        with self._locks.hold(request.volume_id, self.lock_timeout_seconds):
            if token:
                self._tokens[request.volume_id] = token
            meta = self.store.load(request.volume_id)
            if meta is not None:
                self._check_same_arguments(meta, request, str(target), context)
                if meta.state == VolumeState.READY and self._payload_complete(meta, spec):
                    if meta.mode == "mount":
                        self._ensure_mounted(meta)
                    return
            else:
                self._check_min_duration(spec, context)
                self._check_room_for_new_volume()
                now = self.clock()
                meta = VolumeMeta(
                    volume_id=request.volume_id,
                    target_path=str(target),
                    volume_context=context,
                    readonly=request.readonly,
                    volume_mount_group=request.volume_mount_group,
                    node_id=self.node_id,
                    state=VolumeState.ISSUING,
                    issuer=spec.issuer.describe(),
                    mode="mount" if self.mounter.can_mount else "direct",
                    created_at=now,
                    updated_at=now,
                )
                self._first_issue(meta, spec, pod, new=True)
                return
            self._first_issue(meta, spec, pod)

    def _first_issue(
        self, meta: VolumeMeta, spec: CertificateSpec, pod: PodInfo, *, new: bool = False
    ) -> None:
        """Issue and publish a volume that has never served a certificate (lock held).

        A ``new`` volume's metadata is saved first, in state ``issuing``, so a crash mid-issue is
        finished on start.
        """
        try:
            # A missing bundle or a pod watch we may not run fails before anything is issued.
            bundle = self.trust.bundle_for(meta.volume_id, spec, pod)
            issue_spec, ips = self.pod_ips.spec_for_issue(spec, pod, _ip_sans_key(meta))
            with self._attempt("issue") as attempt:
                attempt.start(self._issuer_label(spec))
                # Decided before anything of the volume exists: a denial leaves nothing behind.
                checked = self._apply_policy(spec, pod, "issue")
                if checked.duration_seconds != spec.duration_seconds:  # the rule's lifetime cap
                    issue_spec = dataclasses.replace(
                        issue_spec, duration_seconds=checked.duration_seconds
                    )
                spec = checked
                if new:
                    attempt.step = STORAGE
                    self.store.save(meta)
                    attempt.step = None
                    self.metrics.set_managed_volumes(self.store.count())
                key = self._select_key(meta, spec, "issue", attempt)
                issued = self._issue(meta, issue_spec, pod, key, attempt)
                self._commit(meta, spec, pod, key, issued, attempt, bundle, ips)
        except DeadlineExceeded:
            # The pending request and its key stay, so kubelet's retry picks them up.
            raise
        except AgentError:
            self._discard_unserved(meta)
            raise
        except Exception:
            log.exception("publishing failed", extra=_log_fields(meta, pod))
            self._discard_unserved(meta)
            raise
        self._failures.pop(meta.volume_id, None)  # a pending first issue finished
        log.info(
            "published volume",
            extra={**_log_fields(meta, pod), "serial": meta.serial, "not_after": meta.not_after},
        )

    def _discard_unserved(self, meta: VolumeMeta) -> None:
        """Forget a volume whose first issue failed: nothing of it stays on disk."""
        try:
            self._clear_target(meta, self.paths.check(meta.target_path))
        except AgentError as exc:
            log.warning(
                "could not clear the target of a failed publish",
                extra={"volume_id": meta.volume_id, "error": exc.message},
            )
        self.store.remove(meta.volume_id)
        self._tokens.pop(meta.volume_id, None)
        self._failures.pop(meta.volume_id, None)
        self.issuers.forget(meta.volume_id)
        self.trust.release(meta.volume_id)
        self.pod_ips.forget(meta.volume_id)
        self.metrics.set_managed_volumes(self.store.count())

    def _check_min_duration(self, spec: CertificateSpec, context: Mapping[str, str]) -> None:
        """New volumes only: one published before the minimum was raised keeps renewing."""
        requested = spec.duration_seconds
        if requested is None or requested >= self.min_duration_seconds:
            return
        key = next(
            (p + "duration" for p in (OWN_PREFIX, COMPAT_PREFIX) if p + "duration" in context),
            OWN_PREFIX + "duration",
        )
        raise InvalidArgument(
            f"{key}: {format_duration(requested)} is shorter than this agent's minimum "
            f"certificate lifetime of {format_duration(self.min_duration_seconds)} "
            "(--min-duration); ask for a longer duration",
            key,
        )

    def _check_room_for_new_volume(self) -> None:
        """Keep the last ``tmpfs_reserve_bytes`` for renewals: existing volumes must always be
        able to write their next certificate, so new ones are refused first."""
        if self.tmpfs_reserve_bytes <= 0:
            return
        free, size = self.store.free_space()
        if free < self.tmpfs_reserve_bytes:
            raise ResourceExhausted(
                f"no room for a new volume on this node: the agent's tmpfs has {free} of "
                f"{size} bytes free, below the {self.tmpfs_reserve_bytes} bytes kept for "
                "renewals of existing volumes (--tmpfs-reserve); the cluster admin can raise "
                "--tmpfs-size (see docs/install.md#sizing-the-tmpfs)"
            )

    def _check_same_arguments(
        self, meta: VolumeMeta, request: PublishRequest, target: str, context: Mapping[str, str]
    ) -> None:
        differences = []
        if _canonical_or_raw(meta.target_path) != target:
            differences.append(f"target_path (published at {meta.target_path})")
        if meta.volume_context != dict(context):
            differences.append("volume attributes")
        if meta.readonly != request.readonly:
            differences.append("readonly")
        if meta.volume_mount_group != request.volume_mount_group:
            differences.append("volume_mount_group")
        if differences:
            raise AlreadyExists(
                f"volume {meta.volume_id} is already published with different "
                f"{', '.join(differences)}"
            )

    # --------------------------------------------------------------------------- unpublish

    @_kubelet_call
    def unpublish(self, volume_id: str, target_path: str) -> None:
        """Unmount this volume's bind, remove its target directory and forget it. Idempotent.

        Only the volume's own bind (by device and inode) is unmounted. A target named with
        another volume's id is refused; for an unknown volume, at most an empty directory at a
        valid target is removed.
        """
        validate_volume_id(volume_id)
        target = self.paths.check(target_path)
        self.recovery.settle(volume_id)
        with self._locks.hold(volume_id, self.lock_timeout_seconds):
            meta = self.store.load(volume_id)
            if meta is None:
                self._remove_empty_target(volume_id, target)
                return
            published_at = _canonical_or_raw(meta.target_path)
            if published_at != str(target):
                raise InvalidArgument(
                    f"volume {volume_id} is published at {published_at}, not at {target}: "
                    "the volume_id and target_path do not belong together "
                    "[rule volume-target-pair]",
                    "target_path",
                )
            self.scheduler.cancel(volume_id)
            self._clear_target(meta, target)
            self.store.remove(volume_id)
            self._tokens.pop(volume_id, None)
            self._renew_before_reported.discard(volume_id)
            self._failures.pop(volume_id, None)
            self.issuers.forget(volume_id)
            self.trust.release(volume_id)
            self.pod_ips.forget(volume_id)
            self.metrics.remove_volume(volume_id)
            self.metrics.set_managed_volumes(self.store.count())
        log.info("unpublished volume", extra={"volume_id": volume_id})

    def _remove_empty_target(self, volume_id: str, target: PurePosixPath) -> None:
        """An unknown volume: nothing of ours can be there, so touch nothing but an empty dir."""
        try:
            with self.paths.open_target(target, create=False) as handle:
                if handle.check() and not handle.remove_if_empty():
                    log.warning(
                        "unpublish of an unknown volume left its target in place: it is not an "
                        "empty directory",
                        extra={"volume_id": volume_id, "target_path": str(target)},
                    )
        except PathMissing:
            pass

    def _clear_target(self, meta: VolumeMeta, target: PurePosixPath) -> None:
        """Unmount the volume's own bind at the target and remove the target directory."""
        try:
            with self.paths.open_target(target, create=False) as handle:
                exists = handle.check()
                if meta.mode == "direct":
                    if exists:
                        _remove_tree(Path(str(target)))
                    return
                self.mounter.unmount_bind(handle, self.store.payload_dir(meta.volume_id))
                if self.mounter.is_mountpoint(handle):
                    raise FailedPrecondition(
                        f"target_path {target} still has a mount the agent did not make; "
                        "it was left in place"
                    )
                if not handle.remove_if_empty():
                    raise FailedPrecondition(
                        f"target_path {target} is not empty after unmounting: it holds files "
                        "the agent did not write, so it was left in place"
                    )
        except PathMissing:
            pass

    # ----------------------------------------------------------------------------- renewal

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
            pod = _pod_of(meta.volume_context)
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
            pod = None if meta is None else _pod_of(meta.volume_context)
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
            extra={**_log_fields(current, pod), "serial": current.serial},
        )
        return current.next_renewal

    def _renewal_spec(
        self, meta: VolumeMeta, spec: CertificateSpec, pod: PodInfo
    ) -> tuple[CertificateSpec, tuple[str, ...]]:
        """The spec with the pod's IPs from the watch, or (no watch now) those it gave before:
        a certificate is never left to expire because the pod watch cannot run."""
        try:
            return self.pod_ips.spec_for_issue(spec, pod, _ip_sans_key(meta))
        except AgentError as exc:
            ips = tuple(meta.pod_ips)
            log.warning(
                "renewing with the pod IPs known so far",
                extra={**_log_fields(meta, pod), "error": exc.message},
            )
            return spec.with_pod_ips(ips), ips

    # ---------------------------------------------------------------------------- recovery

    def recover(self) -> int:
        """On start: heal mounts, resume renewals, finish unfinished issues; returns the count.

        All at once, in this thread. The server queues them with ``begin_recovery`` instead and
        serves while a background thread runs ``recovery.run()``."""
        count = self.begin_recovery()
        self.recovery.run()
        self.recovery.wait()
        self.metrics.set_managed_volumes(self.store.count())
        return count

    def begin_recovery(self) -> int:
        """Queue every volume found on disk for recovery; publish, unpublish and renew of a
        queued volume recover it first (``recovery.settle``). Returns how many were queued."""
        try:
            names = sorted(os.listdir(self.store.volumes_dir))
        except FileNotFoundError:
            names = []
        return self.recovery.load(names)

    def _recover_one(self, volume_id: str) -> None:
        try:
            validate_volume_id(volume_id)
        except InvalidArgument:
            log.warning("ignoring unexpected entry %r among the volumes", volume_id)
            return
        with self._locks.hold(volume_id):
            meta = self.store.load(volume_id)
            if meta is None:
                return
            try:
                target = self.paths.check(meta.target_path)
                with self.paths.open_target(target, create=False):
                    pass
            except PathMissing:
                # The pod's volume directory is gone: the pod was deleted while we were down
                # (a directory with a mount in it cannot be removed, so nothing is mounted).
                log.info("forgetting volume of a deleted pod", extra={"volume_id": volume_id})
                self.store.remove(volume_id)
                return
            except InvalidArgument as exc:
                log.error(
                    "not mounting a volume whose target breaks the path policy",
                    extra={"volume_id": volume_id, "error": exc.message},
                )
                return
            spec, pod = self._parse(meta.volume_context)
            if meta.issuer != spec.issuer.describe():
                # Written by an older agent that spelled issuer references differently.
                meta.issuer = spec.issuer.describe()
                self.store.save(meta)
            if meta.state == VolumeState.READY and self._payload_complete(meta, spec):
                if meta.mode == "mount":
                    try:
                        self._ensure_mounted(meta)
                    except AgentError as exc:
                        # Renewals go on; kubelet's next publish retries the mount.
                        log.error(
                            "could not mount a recovered volume",
                            extra={"volume_id": volume_id, "error": exc.message},
                        )
                self._publish_metrics(meta, pod)
                self.trust.attach(volume_id, spec, pod)
                self.pod_ips.recovered(volume_id, spec, pod, tuple(meta.pod_ips))
                due = meta.next_renewal if meta.next_renewal is not None else self.clock()
                self.scheduler.schedule(volume_id, due)
                # Debug: a node with thousands of volumes would log thousands of lines at each
                # start; "volumes recovered" gives the count.
                log.debug(
                    "resumed volume",
                    extra={**_log_fields(meta, pod), "next_renewal": meta.next_renewal},
                )
            else:
                self.scheduler.schedule(volume_id, self.clock())

    # ----------------------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _attempt(self, operation: str) -> Iterator[_Attempt]:
        """Count one issue or renewal attempt, once, from ``start()`` to the end of the block.

        Every started attempt is finished (``cert_agent_issue_duration_seconds_count``) and every
        failure counted with a reason, wherever it happens: in the issuer, or on the node after
        the issuer answered (the tmpfs full, a mount refused). The "renewals failing" alert
        relies on that: finished attempts minus failures are the successes.
        """
        attempt = _Attempt(operation, self.metrics)
        failure: str | None = None
        try:
            yield attempt
        except AgentError as exc:
            failure = attempt.reason_for(exc.reason)
            raise
        except Exception:
            failure = attempt.reason_for("error")
            raise
        finally:
            if attempt.issuer is not None:
                self.metrics.issue_finished(
                    attempt.issuer, operation, attempt.issuer_seconds, failure
                )

    def _apply_policy(self, spec: CertificateSpec, pod: PodInfo, operation: str) -> CertificateSpec:
        """The policy gate (volumes/policy_gate.py): raises PERMISSION_DENIED before any key."""
        if self.policy is None or not (spec.issuer.is_local or self.policy_for_cert_manager):
            return spec
        return apply_policy(self.policy, spec, pod, operation)

    def _issuer_label(self, spec: CertificateSpec) -> str:
        try:
            return self.issuers.for_ref(spec.issuer).name
        except AgentError:
            return CERT_MANAGER_ISSUER  # not configured here; _issue reports it

    def _select_key(
        self, meta: VolumeMeta, spec: CertificateSpec, operation: str, attempt: _Attempt
    ) -> PrivateKey:
        """A pending key (a retry of an unfinished request), the current key, or a new one."""
        attempt.step = STORAGE
        pending = self.store.load_pending_key(meta.volume_id)
        if pending is not None:
            key = load_private_key(pending)
            if key_matches_spec(key, spec.key):
                return key
        if operation == "renew" and spec.key.reuse:
            current = read_payload_file(self._payload_dir(meta), spec.files.private_key)
            if current is not None:
                key = load_private_key(current)
                if key_matches_spec(key, spec.key):
                    return key
        attempt.step = None
        with self.keygen.hold():
            key = generate_private_key(spec.key)
        attempt.step = STORAGE
        self.store.save_pending_key(meta.volume_id, encode_private_key(key, spec.key.encoding))
        attempt.step = None
        return key

    def _issue(
        self,
        meta: VolumeMeta,
        spec: CertificateSpec,
        pod: PodInfo,
        key: PrivateKey,
        attempt: _Attempt,
    ) -> IssuedCertificate:
        operation = attempt.operation
        issuer = self.issuers.for_ref(spec.issuer)
        request = IssueRequest(
            volume_id=meta.volume_id,
            node_id=self.node_id,
            pod=pod,
            spec=spec,
            csr_pem=build_csr(key, spec),
            service_account_token=self._tokens.get(meta.volume_id),
        )
        log.debug(
            "requesting certificate",
            extra={
                **_log_fields(meta, pod),
                "operation": operation,
                "issuer": spec.issuer.describe(),
                "key": f"{spec.key.algorithm} {spec.key.size or ''}".strip(),
                "dns_names": list(spec.dns_names),
                "ip_addresses": list(spec.ip_addresses),
                "uris": list(spec.uris),
                "duration_seconds": spec.duration_seconds,
            },
        )
        started = time.monotonic()
        try:
            issued = issuer.issue(request, self.issue_timeout_seconds)
            _check_issued_for_key(issued, key)
            return issued
        except AgentError as exc:
            log.warning(
                "%s failed: %s",
                operation,
                exc.message,
                extra={**_log_fields(meta, pod), "issuer": issuer.name, "reason": exc.reason},
            )
            raise
        finally:
            attempt.issuer_seconds = time.monotonic() - started

    def _commit(
        self,
        meta: VolumeMeta,
        spec: CertificateSpec,
        pod: PodInfo,
        key: PrivateKey,
        issued: IssuedCertificate,
        attempt: _Attempt,
        bundle: bytes | None = None,
        pod_ips: tuple[str, ...] = (),
    ) -> None:
        """Swap the new files in, mount, record, schedule (lock held)."""
        if spec.issuer.is_local and self.local_trust_bundle is not None:
            # The bundle as of now, not as of signing: a CA retired while this renewal ran
            # (its volume's ca.crt already rewritten) must not come back with it.
            issued = dataclasses.replace(issued, ca_pem=self.local_trust_bundle())
        include_issuer = spec.trust_bundle is not None and spec.trust_bundle.include_issuer
        ca_pem = issued.ca_pem
        if bundle is not None and spec.trust_bundle is not None:
            ca_pem = compose_ca(bundle, issued.ca_pem, include_issuer)
        files = _payload_files(spec, key, issued, ca_pem)
        attempt.step = STORAGE
        if meta.mode == "direct":
            self._ensure_target_dir(meta)
        write_payload(self._payload_dir(meta), files, _gid(spec, meta))
        attempt.step = None
        log.debug(
            "payload swapped in",
            extra={
                "volume_id": meta.volume_id,
                "files": sorted(files),
                "serial": issued.serial_hex,
                "not_after": issued.not_after.isoformat(),
            },
        )
        if meta.mode == "mount":
            attempt.step = MOUNT
            self._ensure_mounted(meta)
            attempt.step = None
        not_before = issued.not_before.timestamp()
        not_after = issued.not_after.timestamp()
        meta.state = VolumeState.READY
        meta.serial = issued.serial_hex
        meta.not_before = not_before
        meta.not_after = not_after
        # From the certificate as issued: the issuer may have granted less than was asked for.
        plan = plan_renewal(
            not_before,
            not_after,
            spec.renew_before_seconds,
            self.rng,
            now=self.clock(),
            min_interval=self.min_renewal_interval_seconds,
        )
        if plan.renew_before_ignored:
            self._report_renew_before_ignored(meta, spec, pod, not_after - not_before)
        meta.next_renewal = plan.due
        meta.pending_request = None
        meta.issuer = spec.issuer.describe()
        meta.updated_at = self.clock()
        meta.pod_ips = list(pod_ips)
        meta.issuer_ca_pem = issued.ca_pem.decode() if include_issuer else ""
        attempt.step = STORAGE
        self.store.save(meta)
        self.store.clear_pending_key(meta.volume_id)
        attempt.step = None
        self._publish_metrics(meta, pod)
        self.scheduler.schedule(meta.volume_id, meta.next_renewal)
        self.pod_ips.committed(meta.volume_id, spec, pod, pod_ips)
        if self.on_commit is not None:
            self.on_commit()

    def _report_renew_before_ignored(
        self, meta: VolumeMeta, spec: CertificateSpec, pod: PodInfo, lifetime: float
    ) -> None:
        """Say once per volume (per agent run) that renew-before gave way to the lifetime."""
        if meta.volume_id in self._renew_before_reported:
            return
        self._renew_before_reported.add(meta.volume_id)
        self.metrics.note_renew_before_ignored(meta.issuer)
        log.warning(
            "renew-before is not shorter than the certificate's lifetime: renewing at 2/3 of "
            "the lifetime instead",
            extra={
                **_log_fields(meta, pod),
                "renew_before_seconds": spec.renew_before_seconds,
                "lifetime_seconds": round(lifetime),
                "issuer": meta.issuer,
            },
        )

    def _publish_metrics(self, meta: VolumeMeta, pod: PodInfo) -> None:
        if meta.not_after is None or meta.next_renewal is None:
            return
        self.metrics.set_volume(
            meta.volume_id, pod.namespace, pod.name, meta.issuer, meta.not_after, meta.next_renewal
        )

    def _payload_dir(self, meta: VolumeMeta) -> Path:
        if meta.mode == "direct":
            return Path(meta.target_path)
        return self.store.payload_dir(meta.volume_id)

    def _payload_complete(self, meta: VolumeMeta, spec: CertificateSpec) -> bool:
        directory = self._payload_dir(meta)
        names = [spec.files.certificate, spec.files.ca, spec.files.private_key]
        if spec.files.credential_bundle:
            names.append(spec.files.credential_bundle)
        return payload_files_present(directory, names)

    def _ensure_mounted(self, meta: VolumeMeta) -> None:
        payload = self.store.payload_dir(meta.volume_id)
        target = self.paths.check(meta.target_path)
        with self.paths.open_target(target, create=True) as handle:
            if self.mounter.is_bind_of(handle, payload):
                log.debug("target already tracks its payload", extra={"volume_id": meta.volume_id})
                return
            log.debug(
                "bind-mounting payload read-only",
                extra={"volume_id": meta.volume_id, "target_path": str(target)},
            )
            # A mount there that is not this payload's is refused, never replaced: the agent
            # unmounts nothing it cannot prove is its own.
            self.mounter.bind_readonly(payload, handle)

    def _ensure_target_dir(self, meta: VolumeMeta) -> None:
        """Direct mode: the target directory, made the same safe way as for a bind."""
        with self.paths.open_target(self.paths.check(meta.target_path), create=True):
            pass

    def local_ca_volumes(self) -> list[VolumeMeta]:
        """Metadata of the volumes the local CA signs (what a CA rotation must reissue)."""
        return [meta for meta in self.store.metas() if meta.issuer == LOCAL_ISSUER]

    def volumes_not_signed_by(self, ca: x509.Certificate) -> list[tuple[str, float]]:
        """Ready local-CA volumes whose certificate ``ca`` did not sign, with their notAfter
        (after a node CA renewal: what must move to the new one)."""
        found = []
        for meta in self.local_ca_volumes():
            if meta.state != VolumeState.READY or meta.not_after is None:
                continue
            spec, _pod = self._parse(meta.volume_context)
            pem = read_payload_file(self._payload_dir(meta), spec.files.certificate)
            if pem is None:
                continue
            try:
                x509.load_pem_x509_certificates(pem)[0].verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                found.append((meta.volume_id, meta.not_after))
        return found

    def local_certificate_start_times(self) -> list[float | None]:
        """notBefore of each local-CA certificate (None while its first issue is pending)."""
        return [meta.not_before for meta in self.local_ca_volumes()]

    def rewrite_ca_bundles(self, ca_pem: bytes) -> int:
        """Swap a new CA bundle into every local-CA volume without reissuing; returns the count.

        After a CA rotation completes, this drops the retired CA from the pods' ca.crt at once
        instead of waiting for each certificate's next renewal. A volume whose ca.crt is a trust
        bundle keeps it (with the new CA added when it includes the issuer).
        """
        rewritten = 0
        for volume_id in self.store.volume_ids():
            with self._locks.hold(volume_id):
                meta = self.store.load(volume_id)
                if meta is None or meta.state != VolumeState.READY:
                    continue
                spec, pod = self._parse(meta.volume_context)
                if meta.issuer != LOCAL_ISSUER:
                    continue
                new_ca = ca_pem
                if spec.trust_bundle is not None:
                    if not spec.trust_bundle.include_issuer:
                        continue
                    bundle = self.trust.current(spec, pod)
                    if bundle is None:
                        continue
                    meta.issuer_ca_pem = ca_pem.decode()
                    self.store.save(meta)
                    new_ca = compose_ca(bundle, ca_pem, include_issuer=True)
                if self._swap_ca_file(meta, spec, new_ca):
                    rewritten += 1
        return rewritten

    def _rewrite_trust_ca(self, volume_id: str) -> bool:
        """The volume's trust bundle changed: a new ca.crt, same certificate and key."""
        with self._locks.hold(volume_id):
            meta = self.store.load(volume_id)
            if meta is None or meta.state != VolumeState.READY:
                return False
            spec, pod = self._parse(meta.volume_context)
            bundle = self.trust.current(spec, pod)
            if spec.trust_bundle is None or bundle is None:
                return False
            issuer_ca = meta.issuer_ca_pem.encode()
            ca_pem = compose_ca(bundle, issuer_ca, spec.trust_bundle.include_issuer)
            if not self._swap_ca_file(meta, spec, ca_pem):
                return False
        log.info("trust bundle rewritten into ca.crt", extra=_log_fields(meta, pod))
        return True

    def _swap_ca_file(self, meta: VolumeMeta, spec: CertificateSpec, ca_pem: bytes) -> bool:
        """Write the current files again with a new ca.crt, atomically (lock held)."""
        directory = self._payload_dir(meta)
        names = [spec.files.certificate, spec.files.private_key, spec.files.ca]
        if spec.files.credential_bundle:
            names.append(spec.files.credential_bundle)
        files = {name: read_payload_file(directory, name) for name in names}
        current = {name: content for name, content in files.items() if content is not None}
        if len(current) != len(files) or current[spec.files.ca] == ca_pem:
            return False
        current[spec.files.ca] = ca_pem
        if spec.pkcs12 is not None:  # its trust store follows ca.crt
            current[spec.pkcs12.filename] = build_keystore(
                load_private_key(current[spec.files.private_key]),
                x509.load_pem_x509_certificates(current[spec.files.certificate]),
                x509.load_pem_x509_certificates(ca_pem) if ca_pem.strip() else [],
                spec.pkcs12.password,
            )
        write_payload(directory, current, _gid(spec, meta))
        return True


# ----------------------------------------------------------------------------- functions


def _canonical_or_raw(path: str) -> str:
    """A stored target in canonical form (older agents stored it as given)."""
    try:
        return str(canonical_path(path))
    except InvalidArgument:
        return path


def _pick_token(tokens_json: str | None) -> str | None:
    """The first service-account token kubelet passed (CSIDriver tokenRequests), if any."""
    if not tokens_json:
        return None
    try:
        tokens = json.loads(tokens_json)
    except ValueError:
        raise InvalidArgument(f"{TOKENS_KEY} is not valid JSON") from None
    if not isinstance(tokens, dict):
        return None
    for entry in tokens.values():
        if isinstance(entry, dict) and isinstance(entry.get("token"), str):
            return str(entry["token"])
    return None


def _pod_of(volume_context: Mapping[str, str]) -> PodInfo | None:
    """The pod kubelet named in the volume context, even when other attributes are invalid."""
    name = volume_context.get("csi.storage.k8s.io/pod.name")
    namespace = volume_context.get("csi.storage.k8s.io/pod.namespace")
    if not name or not namespace:
        return None
    return PodInfo(
        name=name,
        namespace=namespace,
        uid=volume_context.get("csi.storage.k8s.io/pod.uid", ""),
        service_account=volume_context.get("csi.storage.k8s.io/serviceAccount.name", ""),
    )


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


def _gid(spec: CertificateSpec, meta: VolumeMeta) -> int | None:
    if spec.fs_group is not None:
        return spec.fs_group
    if meta.volume_mount_group:
        try:
            return int(meta.volume_mount_group)
        except ValueError:
            raise InvalidArgument(
                f"volume_mount_group {shorten(meta.volume_mount_group)!r} is not a numeric group id"
            ) from None
    return None


def _ip_sans_key(meta: VolumeMeta) -> str:
    """The ip-sans key as the volume spells it, for messages."""
    return next((k for k in meta.volume_context if k.endswith("/ip-sans")), "ip-sans")


def _payload_files(
    spec: CertificateSpec, key: PrivateKey, issued: IssuedCertificate, ca_pem: bytes
) -> dict[str, bytes]:
    files = {
        spec.files.private_key: encode_private_key(key, spec.key.encoding),
        spec.files.certificate: issued.chain_pem,
        spec.files.ca: ca_pem,
    }
    if spec.files.credential_bundle:
        # podCertificate's credentialBundlePath layout: a PKCS#8 PRIVATE KEY block, then the
        # chain (leaf first); one file, so key and certificate always come from one generation.
        files[spec.files.credential_bundle] = (
            encode_private_key(key, KeyEncoding.PKCS8) + issued.chain_pem
        )
    if spec.pkcs12 is not None:
        files[spec.pkcs12.filename] = build_keystore(
            key,
            x509.load_pem_x509_certificates(issued.chain_pem),
            x509.load_pem_x509_certificates(ca_pem) if ca_pem.strip() else [],
            spec.pkcs12.password,
        )
    return files


def _check_issued_for_key(issued: IssuedCertificate, key: PrivateKey) -> None:
    """Never publish a certificate that does not belong to the key we hold."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if issued.leaf.public_key().public_bytes(enc, fmt) != key.public_key().public_bytes(enc, fmt):
        raise IssuanceFailed(
            "the issuer returned a certificate for a different key", reason="key_mismatch"
        )


def _log_fields(meta: VolumeMeta, pod: PodInfo) -> dict[str, object]:
    return {"volume_id": meta.volume_id, "pod": pod.name, "namespace": pod.namespace}


def _remove_tree(path: Path) -> None:
    """Remove a payload written straight into target_path (read-only dirs included)."""
    if not path.exists():
        return
    for root, dirs, _files in os.walk(path):
        os.chmod(root, 0o700)
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                os.chmod(child, 0o700)
    shutil.rmtree(path)
