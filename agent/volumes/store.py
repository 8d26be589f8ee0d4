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
import dataclasses
import enum
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

META_FILE = "meta.json"
PENDING_KEY_FILE = "pending.key"
PAYLOAD_DIR = "data"
DATA_LINK = "..data"
DATA_TMP_LINK = "..data_tmp"

FILE_MODE = 0o440
DIR_MODE = 0o550
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700

_VOLUME_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_VOLUME_ID = 128
_MAX_NAME_BYTES = 255
# Hidden generation directories: ..<UTC timestamp>_<random>.
_HIDDEN_DIR_RE = re.compile(r"\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}_[0-9a-f]{16}")
_TMP_LINK_RE = re.compile(r"\.\.tmp_[0-9a-f]{16}")
_MAX_GID = 2**32 - 2  # (gid_t)-1 means "unchanged" to chown


class VolumeState(enum.StrEnum):
    ISSUING = "issuing"
    READY = "ready"


@dataclass
class VolumeMeta:
    """What the agent remembers about a published volume across restarts."""

    volume_id: str
    target_path: str
    # The request's attributes, re-parsed on restart; may contain a pkcs12 password.
    volume_context: dict[str, str] = field(repr=False)
    readonly: bool
    volume_mount_group: str | None
    node_id: str
    state: VolumeState
    issuer: str = "local"
    serial: str | None = None
    not_before: float | None = None  # unix seconds
    not_after: float | None = None
    next_renewal: float | None = None
    pending_request: str | None = None  # a cert-manager CertificateRequest still in flight
    mode: str = "mount"  # "mount" (payload bind-mounted) or "direct" (written into target_path)
    created_at: float = 0.0
    updated_at: float = 0.0
    # The pod IPs (from the pod watch) the current certificate carries for ${POD_IP}/${POD_IPS}.
    pod_ips: list[str] = field(default_factory=list)
    # The issuing CA (PEM), kept when ca.crt is a trust bundle with trust-bundle-include-issuer,
    # so a bundle change can rebuild ca.crt without reissuing.
    issuer_ca_pem: str = ""

    def to_json(self) -> str:
        # Not dataclasses.asdict (a deep copy, field by field) and no indent (which makes json
        # fall back to its pure-Python encoder): saved twice per publish, this was a tenth of
        # the agent's own time. Every field is a str, number, bool, None or a str->str dict.
        data = {name: getattr(self, name) for name in _META_FIELDS}
        data["state"] = str(self.state)
        return json.dumps(data, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> VolumeMeta:
        """Parse metadata; raises ValueError when it is not a valid VolumeMeta document."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("metadata is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys are ignored so an older agent can read a newer agent's metadata.
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        try:
            meta = cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"metadata has missing fields: {exc}") from None
        meta.state = VolumeState(meta.state)
        _check_types(meta)
        return meta


_META_FIELDS = tuple(f.name for f in dataclasses.fields(VolumeMeta))


def _check_types(meta: VolumeMeta) -> None:
    def want(name: str, ok: bool) -> None:
        if not ok:
            raise ValueError(f"metadata field {name!r} has the wrong type")

    for name in ("volume_id", "target_path", "node_id", "issuer", "mode"):
        want(name, isinstance(getattr(meta, name), str))
    for name in ("volume_mount_group", "serial", "pending_request"):
        value = getattr(meta, name)
        want(name, value is None or isinstance(value, str))
    for name in ("not_before", "not_after", "next_renewal"):
        value = getattr(meta, name)
        want(name, value is None or _is_number(value))
    for name in ("created_at", "updated_at"):
        want(name, _is_number(getattr(meta, name)))
    want("readonly", isinstance(meta.readonly, bool))
    ctx = meta.volume_context
    want(
        "volume_context",
        isinstance(ctx, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()),
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_volume_id(volume_id: str) -> None:
    """Refuse ids that could not safely be a directory name."""
    if not isinstance(volume_id, str) or not volume_id:
        raise InvalidArgument("volume_id is required", "volume_id")
    shown = repr(volume_id[:_MAX_VOLUME_ID]) + ("..." if len(volume_id) > _MAX_VOLUME_ID else "")
    if len(volume_id) > _MAX_VOLUME_ID:
        raise InvalidArgument(
            f"volume_id {shown} is longer than {_MAX_VOLUME_ID} characters", "volume_id"
        )
    if not _VOLUME_ID_RE.fullmatch(volume_id) or volume_id in (".", ".."):
        raise InvalidArgument(
            f"volume_id {shown} may only contain letters, digits, '.', '_' and '-' "
            "and must not be '.' or '..'",
            "volume_id",
        )


class VolumeStore:
    """Per-volume metadata and pending keys under ``data_root/volumes/<volume_id>/``."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = Path(data_root)
        self._volumes = self.data_root / "volumes"
        # Ids of volumes with metadata, counted once from disk and then kept up to date by save
        # and remove: the gauge is set on every publish and unpublish, and listing the directory
        # each time made both grow with the number of volumes.
        self._with_meta: set[str] | None = None
        self._with_meta_lock = threading.Lock()

    @property
    def volumes_dir(self) -> Path:
        return self._volumes

    def _volume_dir(self, volume_id: str) -> Path:
        validate_volume_id(volume_id)
        return self._volumes / volume_id

    def _ensure_volume_dir(self, volume_id: str) -> Path:
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
        path = self._volume_dir(volume_id) / META_FILE
        try:
            text = _read_nofollow(path).decode("utf-8")
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
        _atomic_write(directory, META_FILE, meta.to_json().encode("utf-8"))
        with self._with_meta_lock:
            self._volumes_with_meta().add(meta.volume_id)

    def payload_dir(self, volume_id: str) -> Path:
        return self._volume_dir(volume_id) / PAYLOAD_DIR

    def remove(self, volume_id: str) -> None:
        """Delete everything the store holds for the volume; idempotent.

        The caller unmounts the payload from the pod's target first.
        """
        path = self._volume_dir(volume_id)
        try:
            _rmtree(path)
        except OSError as exc:
            raise Internal(f"cannot remove volume directory {path}: {exc.strerror}") from exc
        finally:
            with self._with_meta_lock:
                if self._with_meta is not None and not os.path.lexists(path / META_FILE):
                    self._with_meta.discard(volume_id)

    def save_pending_key(self, volume_id: str, pem: bytes) -> None:
        _atomic_write(self._ensure_volume_dir(volume_id), PENDING_KEY_FILE, pem)

    def load_pending_key(self, volume_id: str) -> bytes | None:
        path = self._volume_dir(volume_id) / PENDING_KEY_FILE
        try:
            return _read_nofollow(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Internal(f"cannot read pending key {path}: {exc.strerror}") from exc

    def clear_pending_key(self, volume_id: str) -> None:
        path = self._volume_dir(volume_id) / PENDING_KEY_FILE
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise Internal(f"cannot remove pending key {path}: {exc.strerror}") from exc


# --- small file helpers --------------------------------------------------------------------


@contextlib.contextmanager
def _fd(
    path: str | Path, flags: int, mode: int = 0o777, dir_fd: int | None = None
) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_nofollow(path: Path) -> bytes:
    with _fd(path, os.O_RDONLY | os.O_NOFOLLOW) as fd:
        return _read_all(fd)


def _atomic_write(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` (0600) via a temporary file in the same directory and rename."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    try:
        with _fd(directory, os.O_RDONLY | os.O_DIRECTORY) as dfd:
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with _fd(tmp, flags, PRIVATE_FILE_MODE, dir_fd=dfd) as fd:
                    os.fchmod(fd, PRIVATE_FILE_MODE)  # umask-proof
                    _write_all(fd, data)
                    os.fsync(fd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)
    except OSError as exc:
        raise Internal(f"cannot write {directory / name}: {exc.strerror}") from exc


def _rmtree(path: Path) -> None:
    """Remove a tree that may contain 0550 directories, without following symlinks."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if os.geteuid() != 0:
        # Root ignores the 0550 modes; anyone else must make the directories writable first.
        for _root, _dirs, _files, dfd in os.fwalk(path, follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.fchmod(dfd, PRIVATE_DIR_MODE)
    shutil.rmtree(path)


# --- payload -------------------------------------------------------------------------------


def _validate_file_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"payload file name {name!r} must be a non-empty string")
    if "/" in name or "\0" in name:
        raise InvalidArgument(f"payload file name {name!r} must be a plain name without '/'")
    if name.startswith("."):
        raise InvalidArgument(f"payload file name {name!r} must not start with '.'")
    if len(os.fsencode(name)) > _MAX_NAME_BYTES:
        raise InvalidArgument(f"payload file name {name[:32]!r}... is longer than 255 bytes")
    return name


def _ownership(gid: int | None) -> tuple[int, int]:
    """(uid, gid) for fchown; -1 leaves a value unchanged when not running as root."""
    if gid is not None and not (isinstance(gid, int) and 0 <= gid <= _MAX_GID):
        raise InvalidArgument(f"fs-group {gid!r} must be an integer between 0 and {_MAX_GID}")
    root = os.geteuid() == 0
    uid = 0 if root else -1
    if gid is None:
        gid = 0 if root else -1
    return uid, gid


def _open_payload_root(directory: Path, uid: int, gid: int) -> int:
    """Create ``directory`` if missing and open it without following a symlink at its place."""
    os.makedirs(directory.parent, mode=PRIVATE_DIR_MODE, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, DIR_MODE)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Internal(f"payload directory {directory} is not a directory") from exc
        raise
    try:
        try:
            os.fchown(dfd, uid, gid)
        except PermissionError as exc:
            raise Internal(
                f"cannot give payload directory {directory} group {gid}: the agent runs "
                "without root and is not a member of that group"
            ) from exc
        # Owner write only while we work, so a non-root agent can update its own directory.
        os.fchmod(dfd, DIR_MODE | stat.S_IWUSR)
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def _lstat_at(dfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _readlink_at(dfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:  # missing, or not a symlink
        return None


def _remove_at(dfd: int, name: str) -> None:
    """Remove an entry of the payload root: a symlink or file, or a whole directory."""
    st = _lstat_at(dfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    with _fd(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd) as sub:
        os.fchmod(sub, PRIVATE_DIR_MODE)  # our own generation dir; lets a non-root agent empty it
    shutil.rmtree(name, dir_fd=dfd)


def _write_generation(dfd: int, files: Mapping[str, bytes], uid: int, gid: int) -> str:
    """Write the files into a fresh hidden directory and return its name."""
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    hidden = f"..{stamp}_{secrets.token_hex(8)}"
    os.mkdir(hidden, PRIVATE_DIR_MODE, dir_fd=dfd)
    try:
        with _fd(hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd) as hfd:
            for name, content in files.items():
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with _fd(name, flags, PRIVATE_FILE_MODE, dir_fd=hfd) as fd:
                    _write_all(fd, content)
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, FILE_MODE)
                    os.fsync(fd)
            os.fchown(hfd, uid, gid)
            os.fchmod(hfd, DIR_MODE)
            os.fsync(hfd)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_at(dfd, hidden)
        raise
    return hidden


def _replace_symlink(dfd: int, name: str, target: str) -> None:
    """Point ``name`` at ``target`` atomically (a temporary link renamed over it)."""
    if _readlink_at(dfd, name) == target:
        return
    tmp = f"..tmp_{secrets.token_hex(8)}"
    os.symlink(target, tmp, dir_fd=dfd)
    try:
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def write_payload(directory: Path, files: Mapping[str, bytes], gid: int | None) -> None:
    """Atomically replace the payload in ``directory`` with ``files`` (Kubernetes AtomicWriter).

    Files are 0440 root:gid inside a 0550 hidden directory; ``..data`` points at it and each
    visible name is a relative symlink ``name -> ..data/name``.
    """
    for name, content in files.items():
        _validate_file_name(name)
        if not isinstance(content, bytes):
            raise InvalidArgument(f"payload file {name!r} content must be bytes")
    uid, group = _ownership(gid)
    try:
        dfd = _open_payload_root(Path(directory), uid, group)
    except OSError as exc:
        raise Internal(f"cannot prepare payload directory {directory}: {exc.strerror}") from exc
    try:
        hidden = _write_generation(dfd, files, uid, group)
        # Kept one more round: a reader that resolved ..data just before the swap still finds
        # every file of the generation it started on.
        previous = _readlink_at(dfd, DATA_LINK)
        # The one atomic step readers depend on: ..data switches from the old set to the new.
        _remove_at(dfd, DATA_TMP_LINK)
        os.symlink(hidden, DATA_TMP_LINK, dir_fd=dfd)
        os.rename(DATA_TMP_LINK, DATA_LINK, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
        for name in files:
            _replace_symlink(dfd, name, f"{DATA_LINK}/{name}")
        for entry in os.listdir(dfd):
            if entry.startswith("."):
                # Older generations, or leftovers of an interrupted write. Only our own name
                # shapes: a planted ``..data -> /elsewhere`` target is never touched.
                ours = _HIDDEN_DIR_RE.fullmatch(entry) or _TMP_LINK_RE.fullmatch(entry)
                if ours and entry not in (hidden, previous):
                    _remove_at(dfd, entry)
            elif entry not in files:
                link = _readlink_at(dfd, entry)
                if link is not None and link.startswith(f"{DATA_LINK}/"):
                    os.unlink(entry, dir_fd=dfd)
        os.fchmod(dfd, DIR_MODE)
        os.fsync(dfd)
    except OSError as exc:
        raise Internal(f"cannot write payload into {directory}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.fchmod(dfd, DIR_MODE)
        os.close(dfd)


def read_payload_file(directory: Path, name: str) -> bytes | None:
    """Read one payload file through ``..data`` without following anything out of ``directory``.

    None when the directory, the ``..data`` link or the file does not exist.
    """
    _validate_file_name(name)
    try:
        with _fd(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) as dfd:
            hidden = _readlink_at(dfd, DATA_LINK)
            if hidden is None or not _HIDDEN_DIR_RE.fullmatch(hidden):
                return None
            with (
                _fd(hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd) as hfd,
                _fd(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=hfd) as fd,
            ):
                return _read_all(fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Internal(f"cannot read {name} from payload {directory}: {exc.strerror}") from exc


def payload_files_present(directory: Path, names: list[str]) -> bool:
    """Whether every one of ``names`` is a regular file in the payload's current generation.

    What recovery asks of each volume on start: one stat per file instead of reading them
    (``read_payload_file``), through ``..data`` without following anything out of ``directory``.
    """
    for name in names:
        _validate_file_name(name)
    try:
        with _fd(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) as dfd:
            hidden = _readlink_at(dfd, DATA_LINK)
            if hidden is None or not _HIDDEN_DIR_RE.fullmatch(hidden):
                return False
            with _fd(hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd) as hfd:
                for name in names:
                    st = _lstat_at(hfd, name)
                    if st is None or not stat.S_ISREG(st.st_mode):
                        return False
                return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise Internal(f"cannot look into payload {directory}: {exc.strerror}") from exc
