"""NodePublishVolume: check the request, then issue (or find) the certificate and mount it.

The same arguments again are idempotent, different ones ``ALREADY_EXISTS``; a new volume must
fit the minimum lifetime and the tmpfs reserve before anything is written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from agent.errors import (
    Aborted,
    AgentError,
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
)
from agent.issuers.local import format_duration
from agent.spec.attributes import COMPAT_PREFIX, OWN_PREFIX
from agent.spec.model import CertificateSpec
from agent.volumes.issue import Issuing
from agent.volumes.manager_core import (
    TOKENS_KEY,
    PublishRequest,
    canonical_or_raw,
    kubelet_call,
    pod_of,
)
from agent.volumes.store import (
    VolumeMeta,
    VolumeState,
    validate_volume_id,
)

# The manager's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.volumes.manager")


class Publishing(Issuing):
    """kubelet's publish."""

    @kubelet_call
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
            pod = pod_of(request.volume_context)
            if pod is not None:
                self._notify_issue_failed(pod, exc)
            raise

    def _publish(self, request: PublishRequest) -> None:
        validate_volume_id(request.volume_id)
        target = self.paths.check(request.target_path)
        self.recovery.settle(request.volume_id)
        if not request.readonly:
            raise InvalidArgument(
                "this driver only serves read-only volumes: set readOnly: true on the csi volume"
            )
        context = {k: v for k, v in request.volume_context.items() if k != TOKENS_KEY}
        token = pick_token(request.volume_context.get(TOKENS_KEY))
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
        if canonical_or_raw(meta.target_path) != target:
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


def pick_token(tokens_json: str | None) -> str | None:
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
