"""Recovery on start: re-read every volume's metadata, heal its bind, resume its schedule."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from agent.errors import (
    AgentError,
    InvalidArgument,
)
from agent.spec.model import CertificateSpec
from agent.volumes.manager_core import (
    ManagerCore,
    log_fields,
    pod_of,
)
from agent.volumes.paths import PathMissing, TargetDir
from agent.volumes.recovery_hint import names_from_hint, payload_names
from agent.volumes.store import (
    VolumeMeta,
    VolumeState,
    payload_files_present,
    validate_volume_id,
)

# The manager's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.volumes.manager")


class Recovering(ManagerCore):
    """Picking up the volumes a previous run left."""

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
        return self.recovery.load(self.volumes_on_disk())

    def volumes_on_disk(self) -> list[str]:
        """The entries of the volumes directory, in id order (what recovery goes through)."""
        try:
            return sorted(os.listdir(self.store.volumes_dir))
        except FileNotFoundError:
            return []

    def _recover_one(self, volume_id: str) -> None:
        try:
            validate_volume_id(volume_id)
        except InvalidArgument:
            log.warning("ignoring unexpected entry %r among the volumes", volume_id)
            return
        with self._locks.hold(volume_id), contextlib.ExitStack() as walk:
            meta = self.store.load(volume_id)
            if meta is None:
                self.store.remove_unrecorded(volume_id)  # a kill during a local-CA first issue
                return
            try:
                # One check and one walk per volume: the bind below reuses the held parent.
                target = self.paths.check(meta.target_path)
                handle = walk.enter_context(self.paths.open_target(target, create=False))
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
            self._resume(meta, handle)

    def _resume(self, meta: VolumeMeta, handle: TargetDir) -> None:
        volume_id = meta.volume_id
        spec: CertificateSpec | None = None
        names = names_from_hint(meta.recovery_hint)
        pod = pod_of(meta.volume_context) if names is not None else None
        if names is None or pod is None:
            # Older metadata, or a volume that follows a trust bundle or its pod's IPs.
            spec, pod = self._parse(meta.volume_context)
            if meta.issuer != spec.issuer.describe():
                # Written by an older agent that spelled issuer references differently.
                meta.issuer = spec.issuer.describe()
                self.store.save(meta)
            names = payload_names(spec)
        payload = self._payload_dir(meta)
        if meta.state != VolumeState.READY or not payload_files_present(payload, names):
            self.scheduler.schedule(volume_id, self.clock())
            return
        if meta.mode == "mount":
            try:
                self._rebind(payload, handle)
            except AgentError as exc:
                # Renewals go on; kubelet's next publish retries the mount.
                log.error(
                    "could not mount a recovered volume",
                    extra={"volume_id": volume_id, "error": exc.message},
                )
        self._publish_metrics(meta, pod)
        if spec is not None:
            self.trust.attach(volume_id, spec, pod)
            self.pod_ips.recovered(volume_id, spec, pod, tuple(meta.pod_ips))
        due = meta.next_renewal if meta.next_renewal is not None else self.clock()
        self.scheduler.schedule(volume_id, due)
        if log.isEnabledFor(logging.DEBUG):
            # Debug: a node with thousands of volumes would log thousands of lines at each
            # start; "volumes recovered" gives the count.
            log.debug("resumed volume", extra={**log_fields(meta, pod), "next_renewal": due})

    def _rebind(self, payload: Path, handle: TargetDir) -> None:
        """``_ensure_mounted`` through the walk recovery already holds (one walk per volume)."""
        handle.create()
        if self.mounter.is_bind_of(handle, payload):
            return
        # A mount there that is not this payload's is refused, never replaced.
        self.mounter.bind_readonly(payload, handle)
