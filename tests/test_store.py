"""The volume store and atomic payload writes, against real files."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from functools import partial
from pathlib import Path

import pytest

from agent.errors import Internal, InvalidArgument
from agent.volumes.store import (
    VolumeMeta,
    VolumeState,
    VolumeStore,
    payload_files_present,
    read_payload_file,
    validate_volume_id,
    write_payload,
)

VOLUME_ID = "csi-" + "ab" * 32
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to chown files")
HIDDEN_RE = re.compile(r"\.\.\d{4}(_\d{2}){5}_[0-9a-f]{16}")


def make_meta(volume_id: str = VOLUME_ID, **changes: object) -> VolumeMeta:
    meta = VolumeMeta(
        volume_id=volume_id,
        target_path=f"/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/{volume_id}/mount",
        volume_context={
            "csi.cert-manager.io/dns-names": "${POD_NAME}.svc",
            "csi.cert-manager.io/pkcs12-password": "s3cret",
        },
        readonly=True,
        volume_mount_group="2000",
        node_id="node-1",
        state=VolumeState.ISSUING,
    )
    for key, value in changes.items():
        setattr(meta, key, value)
    return meta


def current_generation(directory: Path) -> str:
    return os.readlink(directory / "..data")


def hidden_dirs(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if HIDDEN_RE.fullmatch(n))


# --- VolumeMeta ----------------------------------------------------------------------------


def test_meta_json_round_trip_keeps_every_field() -> None:
    meta = make_meta(
        state=VolumeState.READY,
        issuer="ClusterIssuer ca (cert-manager.io)",
        serial="0a1b",
        not_before=1700000000.0,
        not_after=1707776000.5,
        next_renewal=1705184000.0,
        pending_request="cr-abc",
        mode="direct",
        created_at=1.5,
        updated_at=2.5,
    )
    back = VolumeMeta.from_json(meta.to_json())
    assert back == meta
    assert back.state is VolumeState.READY
    assert json.loads(meta.to_json())["state"] == "ready"


def test_meta_repr_hides_volume_context() -> None:
    assert "s3cret" not in repr(make_meta())


def test_meta_from_json_ignores_unknown_keys() -> None:
    data = json.loads(make_meta().to_json())
    data["added_by_a_newer_agent"] = 1
    assert VolumeMeta.from_json(json.dumps(data)) == make_meta()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("volume_id"),
        lambda d: d.update(state="exploded"),
        lambda d: d.update(readonly="yes"),
        lambda d: d.update(not_after="soon"),
        lambda d: d.update(volume_context={"a": 1}),
        lambda d: d.update(volume_context=["a"]),
        lambda d: d.update(serial=7),
    ],
)
def test_meta_from_json_rejects_bad_documents(mutate: object) -> None:
    data = json.loads(make_meta().to_json())
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ValueError):
        VolumeMeta.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "[]", "{", "null"])
def test_meta_from_json_rejects_non_objects(text: str) -> None:
    with pytest.raises(ValueError):
        VolumeMeta.from_json(text)


# --- validate_volume_id --------------------------------------------------------------------


@pytest.mark.parametrize("volume_id", [VOLUME_ID, "a", "A.b_c-9", "x" * 128])
def test_valid_volume_ids(volume_id: str) -> None:
    validate_volume_id(volume_id)


@pytest.mark.parametrize(
    "volume_id", ["", ".", "..", "a/b", "../etc", "a b", "x" * 129, "a\0b", "é", "a\nb"]
)
def test_invalid_volume_ids(volume_id: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_volume_id(volume_id)
    assert "volume_id" in info.value.message


# --- VolumeStore ---------------------------------------------------------------------------


def test_save_load_round_trip_with_private_modes(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    meta = make_meta()
    store.save(meta)
    assert meta.created_at > 0 and meta.updated_at >= meta.created_at
    assert store.load(VOLUME_ID) == meta
    meta_file = tmp_path / "volumes" / VOLUME_ID / "meta.json"
    assert stat.S_IMODE(meta_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(meta_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "volumes").stat().st_mode) == 0o700
    assert store.volume_ids() == [VOLUME_ID]


def test_save_keeps_created_at_and_replaces_the_file(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    meta = make_meta()
    store.save(meta)
    created = meta.created_at
    meta_file = tmp_path / "volumes" / VOLUME_ID / "meta.json"
    inode = meta_file.stat().st_ino
    meta.state = VolumeState.READY
    meta.serial = "ff"
    store.save(meta)
    assert meta.created_at == created
    loaded = store.load(VOLUME_ID)
    assert loaded is not None and loaded.state is VolumeState.READY and loaded.serial == "ff"
    # A rename, not an in-place rewrite: a crash can never leave a half-written file.
    assert meta_file.stat().st_ino != inode
    assert os.listdir(meta_file.parent) == ["meta.json"]


def test_failed_save_leaves_previous_metadata_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = VolumeStore(tmp_path)
    store.save(make_meta())
    before = (tmp_path / "volumes" / VOLUME_ID / "meta.json").read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(Internal, match=r"meta\.json"):
        store.save(make_meta(state=VolumeState.READY))
    monkeypatch.undo()
    assert (tmp_path / "volumes" / VOLUME_ID / "meta.json").read_bytes() == before
    assert os.listdir(tmp_path / "volumes" / VOLUME_ID) == ["meta.json"]


def test_load_missing_volume_is_none(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    assert store.load(VOLUME_ID) is None
    assert store.volume_ids() == []


def test_store_refuses_invalid_volume_ids(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    for call in (store.load, store.remove, store.payload_dir, store.load_pending_key):
        with pytest.raises(InvalidArgument):
            call("../escape")
    with pytest.raises(InvalidArgument):
        store.save(make_meta(volume_id=".."))
    assert not (tmp_path / "volumes").exists() or os.listdir(tmp_path / "volumes") == []


def test_corrupt_metadata_is_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = VolumeStore(tmp_path)
    for vid in ("good-1", "good-2", "garbage", "wrong-id", "bad-state", "empty"):
        store.save(make_meta(volume_id=vid))
    volumes = tmp_path / "volumes"
    (volumes / "garbage" / "meta.json").write_text('{"volume_id": "garb')
    (volumes / "wrong-id" / "meta.json").write_text(make_meta(volume_id="good-1").to_json())
    data = json.loads((volumes / "bad-state" / "meta.json").read_text())
    data["state"] = "???"
    (volumes / "bad-state" / "meta.json").write_text(json.dumps(data))
    (volumes / "empty" / "meta.json").unlink()
    (volumes / "no meta here").mkdir()
    (volumes / "stray-file").write_text("x")

    with caplog.at_level(logging.WARNING, logger="agent.volumes.store"):
        assert store.volume_ids() == ["good-1", "good-2"]
    logged = caplog.text
    assert "garbage" in logged and "wrong-id" in logged and "bad-state" in logged
    assert "s3cret" not in logged
    assert store.load("garbage") is None


def test_pending_key_round_trip(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    assert store.load_pending_key(VOLUME_ID) is None
    store.save_pending_key(VOLUME_ID, b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    key_file = tmp_path / "volumes" / VOLUME_ID / "pending.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert store.load_pending_key(VOLUME_ID) == b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
    store.save_pending_key(VOLUME_ID, b"second")
    assert store.load_pending_key(VOLUME_ID) == b"second"
    store.clear_pending_key(VOLUME_ID)
    store.clear_pending_key(VOLUME_ID)
    assert store.load_pending_key(VOLUME_ID) is None
    assert not key_file.exists()


def test_pending_key_is_not_read_through_a_planted_symlink(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.save(make_meta())
    outside = tmp_path / "outside.key"
    outside.write_bytes(b"not ours")
    (tmp_path / "volumes" / VOLUME_ID / "pending.key").symlink_to(outside)
    with pytest.raises(Internal):
        store.load_pending_key(VOLUME_ID)


def test_remove_deletes_everything_and_is_idempotent(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.save(make_meta())
    store.save(make_meta(volume_id="other"))
    store.save_pending_key(VOLUME_ID, b"key")
    write_payload(store.payload_dir(VOLUME_ID), {"tls.crt": b"c", "tls.key": b"k"}, 2000)
    write_payload(store.payload_dir(VOLUME_ID), {"tls.crt": b"c2", "tls.key": b"k2"}, 2000)
    store.remove(VOLUME_ID)
    assert not (tmp_path / "volumes" / VOLUME_ID).exists()
    assert store.load(VOLUME_ID) is None
    assert store.volume_ids() == ["other"]
    store.remove(VOLUME_ID)
    store.remove("never-existed")
    assert store.volume_ids() == ["other"]


def test_payload_dir_is_inside_the_volume(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    assert store.payload_dir(VOLUME_ID) == tmp_path / "volumes" / VOLUME_ID / "data"


# --- write_payload -------------------------------------------------------------------------

FILES = {"tls.crt": b"CERT-1", "tls.key": b"KEY-1", "ca.crt": b"CA-1"}


@needs_root
def test_payload_modes_owner_and_group(tmp_path: Path) -> None:
    directory = tmp_path / "vol" / "data"
    write_payload(directory, FILES, 2000)

    st = directory.stat()
    assert stat.S_IMODE(st.st_mode) == 0o550
    assert (st.st_uid, st.st_gid) == (0, 2000)
    (hidden,) = hidden_dirs(directory)
    st = (directory / hidden).stat()
    assert stat.S_IMODE(st.st_mode) == 0o550
    assert (st.st_uid, st.st_gid) == (0, 2000)
    for name, content in FILES.items():
        path = directory / hidden / name
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o440
        assert (st.st_uid, st.st_gid) == (0, 2000)
        assert path.read_bytes() == content
    # Nothing anywhere in the tree is accessible to "other".
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(root, name))
            if not stat.S_ISLNK(st.st_mode):
                assert st.st_mode & 0o007 == 0, os.path.join(root, name)


@needs_root
def test_payload_without_gid_is_root_group(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    write_payload(directory, FILES, None)
    (hidden,) = hidden_dirs(directory)
    st = (directory / hidden / "tls.key").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o440)
    assert directory.stat().st_gid == 0


@needs_root
def test_payload_group_follows_a_changed_gid(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    write_payload(directory, FILES, 2000)
    write_payload(directory, FILES, 3000)
    hidden = current_generation(directory)
    assert directory.stat().st_gid == 3000
    assert (directory / hidden / "tls.crt").stat().st_gid == 3000


def test_payload_layout_is_relative_symlinks_through_data(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    write_payload(directory, FILES, None)
    (hidden,) = hidden_dirs(directory)
    assert os.readlink(directory / "..data") == hidden
    for name, content in FILES.items():
        assert os.readlink(directory / name) == f"..data/{name}"
        assert (directory / name).read_bytes() == content
        assert read_payload_file(directory, name) == content
    assert sorted(os.listdir(directory)) == sorted([*FILES, "..data", hidden])


def test_rewrite_swaps_generation_removes_stale_names_and_old_dirs(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    write_payload(directory, {**FILES, "keystore.p12": b"P12"}, None)
    (first,) = hidden_dirs(directory)
    new = {"tls.crt": b"CERT-2", "tls.key": b"KEY-2", "ca-bundle.crt": b"CA-2"}
    write_payload(directory, new, None)
    second = current_generation(directory)
    assert second != first
    # The previous generation stays one more round for readers that resolved ..data before
    # the swap; the one before it is removed.
    assert sorted(os.listdir(directory)) == sorted([*new, "..data", first, second])
    write_payload(directory, new, None)
    third = current_generation(directory)
    assert sorted(os.listdir(directory)) == sorted([*new, "..data", second, third])
    for name, content in new.items():
        assert (directory / name).read_bytes() == content
    assert read_payload_file(directory, "keystore.p12") is None
    assert read_payload_file(directory, "ca.crt") is None


def test_leftovers_of_an_interrupted_write_are_cleaned(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    write_payload(directory, FILES, None)
    stale_dir = directory / "..2020_01_02_03_04_05_0123456789abcdef"
    stale_dir.mkdir()
    (stale_dir / "tls.key").write_bytes(b"old key")
    (directory / "..data_tmp").symlink_to(stale_dir.name)
    (directory / "..tmp_fedcba9876543210").symlink_to("..data/tls.crt")
    previous = current_generation(directory)
    write_payload(directory, FILES, None)
    hidden = current_generation(directory)
    assert sorted(os.listdir(directory)) == sorted([*FILES, "..data", previous, hidden])


def test_existing_regular_file_is_replaced_by_a_link(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "tls.crt").write_bytes(b"written directly")
    (directory / "unrelated.txt").write_bytes(b"not a payload link")
    write_payload(directory, FILES, None)
    assert os.readlink(directory / "tls.crt") == "..data/tls.crt"
    assert (directory / "tls.crt").read_bytes() == b"CERT-1"
    # Only links into ..data are ours to remove.
    assert (directory / "unrelated.txt").read_bytes() == b"not a payload link"


@pytest.mark.parametrize(
    "name", ["", "a/b", "../x", "/etc/passwd", ".hidden", "..data", "..", "x" * 256, "a\0b"]
)
def test_invalid_file_names_are_rejected_before_anything_is_written(
    tmp_path: Path, name: str
) -> None:
    directory = tmp_path / "data"
    with pytest.raises(InvalidArgument):
        write_payload(directory, {"tls.crt": b"c", name: b"x"}, None)
    assert not directory.exists()
    assert os.listdir(tmp_path) == []


def test_invalid_gid_and_content_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="fs-group"):
        write_payload(tmp_path / "d", FILES, -5)
    with pytest.raises(InvalidArgument, match="fs-group"):
        write_payload(tmp_path / "d", FILES, 2**32 - 1)
    with pytest.raises(InvalidArgument):
        write_payload(tmp_path / "d", {"tls.crt": "text"}, None)  # type: ignore[dict-item]
    assert not (tmp_path / "d").exists()


def test_planted_symlinks_are_never_followed_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tls.crt").write_bytes(b"outside cert")
    (outside / "victim").write_bytes(b"victim")
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "tls.crt").symlink_to(outside / "victim")
    (directory / "..data").symlink_to(outside)

    # read_payload_file refuses a ..data that is not one of our generation directories.
    assert read_payload_file(directory, "tls.crt") is None

    write_payload(directory, FILES, None)
    assert (outside / "victim").read_bytes() == b"victim"
    assert (outside / "tls.crt").read_bytes() == b"outside cert"
    assert sorted(os.listdir(outside)) == ["tls.crt", "victim"]
    assert (directory / "tls.crt").read_bytes() == b"CERT-1"


def test_payload_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data").symlink_to(outside)
    with pytest.raises(Internal, match="not a directory"):
        write_payload(tmp_path / "data", FILES, None)
    assert os.listdir(outside) == []
    with pytest.raises(Internal, match="Not a directory"):
        read_payload_file(tmp_path / "data", "tls.crt")


def test_read_payload_file_missing_cases(tmp_path: Path) -> None:
    assert read_payload_file(tmp_path / "nothing", "tls.crt") is None
    (tmp_path / "empty").mkdir()
    assert read_payload_file(tmp_path / "empty", "tls.crt") is None
    write_payload(tmp_path / "data", FILES, None)
    assert read_payload_file(tmp_path / "data", "other.crt") is None
    with pytest.raises(InvalidArgument):
        read_payload_file(tmp_path / "data", "../data/tls.crt")


# --- readers racing a writer ---------------------------------------------------------------


def _generation(n: int) -> dict[str, bytes]:
    # Big enough to need more than one write; every byte says which generation it belongs to.
    body = f"{n:06d}".encode()
    return {
        "tls.crt": b"CRT " + body * 800 + b" END",
        "tls.key": b"KEY " + body * 700 + b" END",
        "ca.crt": b"CA " + body * 10 + b" END",
    }


def _generation_of(name: str, content: bytes) -> int:
    n = int(content[4:10]) if name != "ca.crt" else int(content[3:9])
    assert content == _generation(n)[name], f"{name} is not a complete generation {n}"
    return n


def test_concurrent_reader_never_sees_a_mixed_pair_or_a_missing_file(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    write_payload(directory, _generation(0), None)
    swaps = 200
    stop = threading.Event()
    progress = threading.Condition()
    state = {"reads": 0, "superseded": 0}
    seen: set[int] = set()
    errors: list[str] = []

    def current() -> str:
        return os.readlink(directory / "..data")

    def reader() -> None:
        last = 0
        try:
            while not stop.is_set():
                # Visible names are never missing and always go through ..data.
                for name in ("tls.crt", "tls.key", "ca.crt"):
                    link = os.readlink(directory / name)
                    if link != f"..data/{name}":
                        errors.append(f"{name} -> {link}")
                # A consumer resolves ..data once and opens the pair from that directory.
                before = current()
                try:
                    dfd = os.open(directory / "..data", os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        fds = [os.open(n, os.O_RDONLY, dir_fd=dfd) for n in ("tls.crt", "tls.key")]
                    finally:
                        os.close(dfd)
                except FileNotFoundError:
                    # Allowed only when that generation had already been replaced.
                    if current() == before:
                        errors.append(f"file missing from the current generation {before}")
                    state["superseded"] += 1
                    continue
                try:
                    crt, key = (os.read(fd, 1 << 20) for fd in fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                n_crt = _generation_of("tls.crt", crt)
                n_key = _generation_of("tls.key", key)
                if n_crt != n_key:
                    errors.append(f"mixed pair: cert {n_crt}, key {n_key}")
                if n_crt < last:
                    errors.append(f"went back from generation {last} to {n_crt}")
                last = n_crt
                seen.add(n_crt)
                # A single file read through the visible name is always complete.
                _generation_of("ca.crt", (directory / "ca.crt").read_bytes())
                with progress:
                    state["reads"] += 1
                    progress.notify_all()
        except BaseException as exc:
            errors.append(f"reader crashed: {exc!r}")
            with progress:
                progress.notify_all()

    def reader_reached(goal: int) -> bool:
        return state["reads"] >= goal or bool(errors)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for n in range(1, swaps + 1):
            write_payload(directory, _generation(n), None)
            if n % 10 == 0:
                # Let the reader finish two reads, so it provably reads during the run.
                with progress:
                    goal = state["reads"] + 2
                    ok = progress.wait_for(partial(reader_reached, goal), 60)
                assert ok, "the reader thread made no progress"
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[:5]
    # Every tenth swap was followed by a read that began after it.
    assert len(seen) >= swaps // 10
    assert max(seen) <= swaps
    assert len(hidden_dirs(directory)) == 2  # the current generation and the one before
    assert read_payload_file(directory, "tls.key") == _generation(swaps)["tls.key"]


def test_count_lists_the_volumes_once_then_follows_saves_and_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The managed-volumes gauge is set on every publish and unpublish: counting must not list
    the volumes directory (and stat every volume) each time, or both grow with the volume count."""
    earlier = VolumeStore(tmp_path)
    for i in range(3):
        earlier.save(make_meta(f"vol-{i}"))
    earlier.save_pending_key("vol-pending", b"key")  # a directory without metadata
    store = VolumeStore(tmp_path)  # a restarted agent
    assert store.count() == 3

    def no_listing(path: object) -> list[str]:
        raise AssertionError(f"count() listed {path} again")

    monkeypatch.setattr(os, "listdir", no_listing)
    store.save(make_meta("vol-3"))
    store.save(make_meta("vol-3"))  # saved again: still one volume
    assert store.count() == 4
    store.remove("vol-0")
    store.remove("vol-0")  # idempotent
    store.remove("vol-never")
    assert store.count() == 3
    monkeypatch.undo()
    assert store.count() == VolumeStore(tmp_path).count() == 3


def test_payload_files_present_checks_the_current_generation_without_reading(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "data"
    names = ["tls.crt", "tls.key", "ca.crt"]
    assert not payload_files_present(directory, names)  # no payload at all
    write_payload(directory, {"tls.crt": b"c", "tls.key": b"k"}, None)
    assert payload_files_present(directory, ["tls.crt", "tls.key"])
    assert not payload_files_present(directory, names)  # ca.crt missing
    write_payload(directory, {"tls.crt": b"c", "tls.key": b"k", "ca.crt": b"a"}, None)
    assert payload_files_present(directory, names)
    hidden = directory / os.readlink(directory / "..data")
    os.chmod(hidden, 0o700)
    (hidden / "ca.crt").unlink()
    (hidden / "ca.crt").symlink_to("/etc/hostname")  # never followed out of the payload
    assert not payload_files_present(directory, names)
    with pytest.raises(InvalidArgument):
        payload_files_present(directory, ["../escape"])


def test_volume_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """The umask is process-wide, and another thread may narrow or widen it for a moment (the
    status socket binds under 0177): the directories the store makes end up 0700 regardless."""
    old = os.umask(0o177)
    try:
        store = VolumeStore(tmp_path)
        store.save(make_meta())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "volumes").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "volumes" / VOLUME_ID).stat().st_mode) == 0o700


def test_a_payload_written_first_makes_private_volume_directories_whatever_the_umask(
    tmp_path: Path,
) -> None:
    """A local-CA volume's first write is its payload, before any metadata (see
    Issuing._first_issue): the directories it makes are 0700 as the store's are."""
    store = VolumeStore(tmp_path)
    old = os.umask(0o177)
    try:
        write_payload(store.payload_dir(VOLUME_ID), FILES, None)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "volumes").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "volumes" / VOLUME_ID).stat().st_mode) == 0o700
    assert read_payload_file(store.payload_dir(VOLUME_ID), "tls.key") == FILES["tls.key"]


def test_first_write_into_a_new_directory_makes_the_layout_a_rewrite_makes(
    tmp_path: Path,
) -> None:
    """A payload directory created by this write takes a shorter way (its links made in place,
    nothing older to clean up); the result must be the same as the careful swap's."""

    def layout(directory: Path) -> list[tuple[str, str | None, int, int, int]]:
        hidden = current_generation(directory)
        entries = []
        for root, dirs, files in os.walk(directory):
            for name in sorted([*dirs, *files]):
                path = Path(root) / name
                st = path.lstat()
                link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
                shown = str(path.relative_to(directory)).replace(hidden, "<gen>")
                shown_link = link.replace(hidden, "<gen>") if link else None
                mode = 0 if link else stat.S_IMODE(st.st_mode)
                entries.append((shown, shown_link, mode, st.st_uid, st.st_gid))
        top = directory.stat()
        return [*sorted(entries), ("", None, stat.S_IMODE(top.st_mode), top.st_uid, top.st_gid)]

    new = tmp_path / "new"
    write_payload(new, FILES, 2000)
    existing = tmp_path / "existing"
    existing.mkdir()
    write_payload(existing, FILES, 2000)
    assert layout(new) == layout(existing)
    assert read_payload_file(new, "tls.key") == FILES["tls.key"]
