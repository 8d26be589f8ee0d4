"""The on-disk volume store: per-volume metadata, pending keys and atomic payload writes.

Layout under the data root (which the agent puts on a tmpfs so keys never touch a disk)::

    volumes/<volume_id>/meta.json     VolumeMeta, 0600 (may hold a pkcs12 password)
    volumes/<volume_id>/pending.key   key of an issuance still in flight, 0600
    volumes/<volume_id>/data/         the payload, written by write_payload

write_payload uses Kubernetes' AtomicWriter scheme so a reader resolving ``..data`` once never
sees a new certificate with an old key. Callers serialise writes per directory (the volume
manager holds a per-volume lock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from agent.errors import Internal, InvalidArgument
from agent.volumes.payload import (
    DATA_LINK,
    DIR_MODE,
    FILE_MODE,
    payload_files_present,
    read_payload_file,
    write_payload,
)
from agent.volumes.safe_files import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    atomic_write,
    read_nofollow,
    rmtree,
)
from agent.volumes.volume_meta import (
    VolumeMeta,
    VolumeState,
    validate_volume_id,
)

__all__ = [
    "DATA_LINK",
    "DIR_MODE",
    "FILE_MODE",
    "META_FILE",
    "PAYLOAD_DIR",
    "PENDING_KEY_FILE",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "VolumeMeta",
    "VolumeState",
    "VolumeStore",
    "payload_files_present",
    "read_payload_file",
    "validate_volume_id",
    "write_payload",
]


log = logging.getLogger(__name__)


META_FILE = "meta.json"


PENDING_KEY_FILE = "pending.key"


PAYLOAD_DIR = "data"


_PAYLOAD_DIRS_MAX = 1024


class VolumeStore:
    """Per-volume metadata and pending keys under ``data_root/volumes/<volume_id>/``."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = Path(data_root)
        self._volumes = self.data_root / "volumes"
        # Paths below it are plain strings: built several times per publish, pathlib's parsing
        # showed in its profile.
        self._volumes_str = str(self._volumes)
        # payload_dir() answers, by volume id: a publish asks twice (payload write, bind) and
        # each Path costs a pathlib parse. A bound, not an LRU: cleared when full.
        self._payload_dirs: dict[str, Path] = {}
        # Ids of volumes with metadata, counted once from disk and then kept up to date by save
        # and remove: the gauge is set on every publish and unpublish, and listing the directory
        # each time made both grow with the number of volumes.
        self._with_meta: set[str] | None = None
        self._with_meta_lock = threading.Lock()

    @property
    def volumes_dir(self) -> Path:
        return self._volumes

    def _volume_dir(self, volume_id: str) -> str:
        validate_volume_id(volume_id)
        return f"{self._volumes_str}/{volume_id}"

    def _ensure_volume_dir(self, volume_id: str) -> str:
        path = self._volume_dir(volume_id)
        try:
            try:
                os.mkdir(path, PRIVATE_DIR_MODE)
            except FileExistsError:
                return path
            except FileNotFoundError:  # the volumes directory itself is missing: once
                os.makedirs(self._volumes, mode=PRIVATE_DIR_MODE, exist_ok=True)
                os.chmod(self._volumes, PRIVATE_DIR_MODE)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, PRIVATE_DIR_MODE)
            # The umask is process-wide: another thread may have narrowed it for a moment.
            os.chmod(path, PRIVATE_DIR_MODE)
        except OSError as exc:
            raise Internal(f"cannot create volume directory {path}: {exc.strerror}") from exc
        return path

    def volume_ids(self) -> list[str]:
        """Ids of volumes with readable metadata; corrupt ones are logged and skipped."""
        return [meta.volume_id for meta in self.metas()]

    def metas(self) -> list[VolumeMeta]:
        """Every volume's readable metadata, read once each, in volume-id order."""
        try:
            names = sorted(os.listdir(self._volumes))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise Internal(f"cannot list volumes in {self._volumes}: {exc.strerror}") from exc
        metas = []
        for name in names:
            try:
                validate_volume_id(name)
            except InvalidArgument:
                log.warning("ignoring unexpected entry %r in %s", name, self._volumes)
                continue
            meta = self.load(name)
            if meta is not None:
                metas.append(meta)
        return metas

    def free_space(self) -> tuple[int, int]:
        """(bytes free, bytes in all) of the filesystem holding the volumes (the tmpfs)."""
        try:
            st = os.statvfs(self._volumes)
        except OSError as exc:
            raise Internal(f"cannot read free space of {self._volumes}: {exc.strerror}") from exc
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def count(self) -> int:
        """How many volumes have metadata (for the gauge): O(1) after the first call, which
        stats each volume's metadata file once."""
        with self._with_meta_lock:
            return len(self._volumes_with_meta())

    def _volumes_with_meta(self) -> set[str]:
        if self._with_meta is None:
            try:
                names = os.listdir(self._volumes)
            except FileNotFoundError:
                names = []
            self._with_meta = {
                name for name in names if os.path.isfile(self._volumes / name / META_FILE)
            }
        return self._with_meta

    def load(self, volume_id: str) -> VolumeMeta | None:
        """The volume's metadata, or None when it has none or it is unreadable (logged)."""
        path = f"{self._volume_dir(volume_id)}/{META_FILE}"
        try:
            text = read_nofollow(path).decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("volume %s: cannot read %s: %s", volume_id, path, exc)
            return None
        try:
            meta = VolumeMeta.from_json(text)
        except ValueError as exc:
            # The message never quotes the content: it may hold a pkcs12 password.
            log.warning("volume %s: ignoring corrupt metadata %s: %s", volume_id, path, exc)
            return None
        if meta.volume_id != volume_id:
            log.warning("volume %s: metadata in %s names another volume", volume_id, path)
            return None
        return meta

    def save(self, meta: VolumeMeta) -> None:
        """Write the metadata atomically (0600); stamps updated_at (and created_at if unset)."""
        directory = self._ensure_volume_dir(meta.volume_id)
        now = time.time()
        if not meta.created_at:
            meta.created_at = now
        meta.updated_at = now
        atomic_write(directory, META_FILE, meta.to_json().encode("utf-8"))
        with self._with_meta_lock:
            self._volumes_with_meta().add(meta.volume_id)

    def payload_dir(self, volume_id: str) -> Path:
        known = self._payload_dirs.get(volume_id)
        if known is not None:
            return known  # the id was validated when it was added
        path = Path(f"{self._volume_dir(volume_id)}/{PAYLOAD_DIR}")
        if len(self._payload_dirs) >= _PAYLOAD_DIRS_MAX:
            self._payload_dirs.clear()
        self._payload_dirs[volume_id] = path
        return path

    def remove(self, volume_id: str) -> None:
        """Delete everything the store holds for the volume; idempotent.

        The caller unmounts the payload from the pod's target first.
        """
        path = self._volume_dir(volume_id)
        try:
            rmtree(path)
        except OSError as exc:
            raise Internal(f"cannot remove volume directory {path}: {exc.strerror}") from exc
        finally:
            with self._with_meta_lock:
                if self._with_meta is not None and not os.path.lexists(f"{path}/{META_FILE}"):
                    self._with_meta.discard(volume_id)

    def remove_unrecorded(self, volume_id: str) -> bool:
        """Remove a volume directory that has no metadata file; True when one was removed.

        What a kill during a local-CA first issue leaves (a payload, its key, no record): a
        first issue records the volume before it binds it, so nothing can be mounted from such
        a directory. Unreadable metadata is not "none": that volume is left alone.
        """
        path = self._volume_dir(volume_id)
        if os.path.lexists(f"{path}/{META_FILE}") or not os.path.lexists(path):
            return False
        log.info(
            "removing the files of a volume that was never recorded (an interrupted issue)",
            extra={"volume_id": volume_id},
        )
        self.remove(volume_id)
        return True

    def save_pending_key(self, volume_id: str, pem: bytes) -> None:
        atomic_write(self._ensure_volume_dir(volume_id), PENDING_KEY_FILE, pem)

    def load_pending_key(self, volume_id: str) -> bytes | None:
        path = f"{self._volume_dir(volume_id)}/{PENDING_KEY_FILE}"
        try:
            return read_nofollow(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Internal(f"cannot read pending key {path}: {exc.strerror}") from exc

    def clear_pending_key(self, volume_id: str) -> None:
        path = f"{self._volume_dir(volume_id)}/{PENDING_KEY_FILE}"
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise Internal(f"cannot remove pending key {path}: {exc.strerror}") from exc
