"""What every part of the volume manager shares: its parts, locks, metrics and small steps.

``VolumeManager`` (``volumes/manager.py``) is this core plus one class per job: ``issue``
(key, issuer, commit), ``publish``, ``unpublish``, ``renew``, ``recover`` and ``ca_rewrites``.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ParamSpec, Protocol, TypeVar

from agent.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    shorten,
)
from agent.issuers.router import IssuerRouter
from agent.observe.metrics import CERT_MANAGER_ISSUER, AgentMetrics
from agent.pki.policy import PolicyChecker
from agent.spec.attributes import parse_volume_context
from agent.spec.model import CertificateSpec, PodInfo
from agent.volumes.events import NoEvents, VolumeEvents
from agent.volumes.locks import ConcurrencyLimit, KeyedLocks
from agent.volumes.mounter import Mounter
from agent.volumes.paths import PathMissing, TargetPolicy, canonical_path
from agent.volumes.pod_ips import PodIPTracker
from agent.volumes.policy_gate import apply_policy
from agent.volumes.priority import KubeletFirst
from agent.volumes.recovery import RecoveryQueue
from agent.volumes.status import snapshot as status_snapshot
from agent.volumes.store import (
    VolumeMeta,
    VolumeStore,
    payload_files_present,
)
from agent.volumes.trust import TrustBundles

log = logging.getLogger("agent.volumes.manager")


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


class Attempt:
    """What ``VolumeManager._attempt`` needs to count one attempt: labels, step, issuer time."""

    def __init__(self, operation: str, metrics: AgentMetrics) -> None:
        self.operation = operation
        self._metrics = metrics
        self.issuer: str | None = None  # set by start(); an attempt never started is not counted
        self.step: str | None = None  # a node-side step in progress: its name is the reason
        self.issuer_seconds = 0.0
        self.pending_key = False  # a pending.key was read or written: the commit removes it

    def start(self, issuer: str) -> None:
        self.issuer = issuer
        self._metrics.issue_started(issuer, self.operation)

    def reason_for(self, error_reason: str) -> str:
        return self.step or error_reason


def kubelet_call(method: Callable[P, R]) -> Callable[P, R]:
    """Mark a kubelet call in flight for its duration (renewals give way: volumes/priority.py)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        manager = args[0]
        assert isinstance(manager, ManagerCore)
        with manager.priority.kubelet_call():
            return method(*args, **kwargs)

    return wrapper


class ManagerCore(abc.ABC):
    """The state and steps the manager's jobs share; the jobs are its subclasses."""

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

    @contextlib.contextmanager
    def _attempt(self, operation: str) -> Iterator[Attempt]:
        """Count one issue or renewal attempt, once, from ``start()`` to the end of the block.

        Every started attempt is finished (``cert_agent_issue_duration_seconds_count``) and every
        failure counted with a reason, wherever it happens: in the issuer, or on the node after
        the issuer answered (the tmpfs full, a mount refused). The "renewals failing" alert
        relies on that: finished attempts minus failures are the successes.
        """
        attempt = Attempt(operation, self.metrics)
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
            # A target made just now (kubelet leaves it to the driver) cannot hold a bind yet.
            if not handle.created and self.mounter.is_bind_of(handle, payload):
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

    def _clear_target(self, meta: VolumeMeta, target: PurePosixPath) -> None:
        """Unmount the volume's own bind at the target and remove the target directory."""
        try:
            with self.paths.open_target(target, create=False) as handle:
                exists = handle.check()
                if meta.mode == "direct":
                    if exists:
                        remove_tree(Path(str(target)))
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

    # The jobs the core hands work to (volumes/recover.py, volumes/ca_rewrites.py).

    @abc.abstractmethod
    def _recover_one(self, volume_id: str) -> None: ...

    @abc.abstractmethod
    def _rewrite_trust_ca(self, volume_id: str) -> bool: ...


def canonical_or_raw(path: str) -> str:
    """A stored target in canonical form (older agents stored it as given)."""
    try:
        return str(canonical_path(path))
    except InvalidArgument:
        return path


def pod_of(volume_context: Mapping[str, str]) -> PodInfo | None:
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


def gid(spec: CertificateSpec, meta: VolumeMeta) -> int | None:
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


def ip_sans_key(meta: VolumeMeta) -> str:
    """The ip-sans key as the volume spells it, for messages."""
    return next((k for k in meta.volume_context if k.endswith("/ip-sans")), "ip-sans")


def log_fields(meta: VolumeMeta, pod: PodInfo) -> dict[str, object]:
    return {"volume_id": meta.volume_id, "pod": pod.name, "namespace": pod.namespace}


def remove_tree(path: Path) -> None:
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
