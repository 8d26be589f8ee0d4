"""NodeUnpublishVolume: unmount the volume's own bind, remove its target, forget it."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

from agent.errors import (
    InvalidArgument,
)
from agent.volumes.manager_core import (
    ManagerCore,
    canonical_or_raw,
    kubelet_call,
)
from agent.volumes.paths import PathMissing
from agent.volumes.store import (
    validate_volume_id,
)

# The manager's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.volumes.manager")


class Unpublishing(ManagerCore):
    """kubelet's unpublish."""

    @kubelet_call
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
                # kubelet's unpublish after a publish cut off by a kill (see remove_unrecorded).
                self.store.remove_unrecorded(volume_id)
                return
            published_at = canonical_or_raw(meta.target_path)
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
