"""Floors under a publish, measured in Python in the same run as the profile (section 9).

- gRPC: an empty unary RPC over a UNIX socket between two processes, the server as the agent
  runs it (sync ``grpc.server`` on a thread pool) and as a ``grpc.aio`` server answering inline,
  alternated; and, for the sync server, the CPU each side spends per call (how much of the
  floor is the Python client, which kubelet is not).
- Crypto: what the local CA must do for an ECDSA P-256 volume: a key, a certificate signed by
  the CA for its public key, both encoded to PEM (no CSR: the agent no longer builds one).
- Files: the payload and the metadata written with bare ``os`` calls and no checks: the volume
  and payload directories, a generation directory, three files written and fsynced, the
  ``..data`` link and three visible links, one metadata file written, fsynced and renamed.
- Mount: one read-only bind made the agent's way (open_tree, mount_setattr, move_mount), and
  its umount2, on the agent's tmpfs.

Run as a script, this module is the empty-RPC server: ``python -m tests.bench_floors KIND SOCK``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.pki.ca import CertificateAuthority
from agent.volumes.mount_syscalls import (
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE,
    SAFE_FLAGS,
    UMOUNT_NOFOLLOW,
    Libc,
)

_METHOD = "/bench.Floor/Empty"


@dataclass
class GrpcFloor:
    sync_ms: float  # median empty-RPC round trip, sync server on a thread pool (the agent's)
    aio_ms: float  # the same against a grpc.aio server answering inline
    client_cpu_ms: float  # CPU per call in the (Python) client process, sync server
    server_cpu_ms: float  # CPU per call in the server process, sync server
    calls: int


@dataclass
class Floors:
    crypto_ms: float
    files_ms: float
    bind_ms: float
    unmount_ms: float
    samples: int


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


# ---------------------------------------------------------------------------- gRPC floor


def _serve(kind: str, socket_path: str) -> None:
    """An empty unary method (bytes in, bytes out) on ``socket_path``; prints "ready"."""

    def empty(request: bytes, context: object) -> bytes:
        return b""

    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
        handler = grpc.unary_unary_rpc_method_handler(empty)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Floor", {"Empty": handler}),)
        )
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()
        return

    async def empty_async(request: bytes, context: object) -> bytes:
        return b""

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(empty_async)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Floor", {"Empty": handler}),)
        )
        server.add_insecure_port(f"unix://{socket_path}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def grpc_floor(tmp: Path, calls: int, warmup: int = 100) -> GrpcFloor:
    servers: dict[str, subprocess.Popen[bytes]] = {}
    stubs: dict[str, Callable[..., bytes]] = {}
    channels = []
    try:
        for kind in ("sync", "aio"):
            path = tmp / f"floor-{kind}.sock"
            servers[kind] = subprocess.Popen(
                [sys.executable, "-m", "tests.bench_floors", kind, str(path)],
                stdout=subprocess.PIPE,
            )
            assert servers[kind].stdout is not None
            servers[kind].stdout.readline()
            channel = grpc.insecure_channel(f"unix://{path}")
            channels.append(channel)
            stubs[kind] = channel.unary_unary(_METHOD)
        times: dict[str, list[float]] = {"sync": [], "aio": []}
        for i in range(warmup + calls):
            for kind in ("sync", "aio") if i % 2 == 0 else ("aio", "sync"):
                started = time.perf_counter()
                stubs[kind](b"", timeout=10)
                if i >= warmup:
                    times[kind].append(time.perf_counter() - started)
        # CPU on each side of the sync server, over calls made back to back.
        client_cpu, server_cpu = time.process_time(), _cpu_seconds(servers["sync"].pid)
        for _ in range(calls):
            stubs["sync"](b"", timeout=10)
        client_cpu = time.process_time() - client_cpu
        server_cpu = _cpu_seconds(servers["sync"].pid) - server_cpu
    finally:
        for channel in channels:
            channel.close()
        for server in servers.values():
            server.kill()
            server.wait()
    return GrpcFloor(
        sync_ms=_median_ms(times["sync"]),
        aio_ms=_median_ms(times["aio"]),
        client_cpu_ms=client_cpu / calls * 1000,
        server_cpu_ms=server_cpu / calls * 1000,
        calls=calls,
    )


# ------------------------------------------------------------- crypto, files and mounts


def _crypto_once(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.DNSName("bench.default.svc.cluster.local")
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([name]), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca.private_key, hashes.SHA256())
    )
    certificate.public_bytes(serialization.Encoding.PEM)
    key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_FILES = {"tls.key": b"k" * 241, "tls.crt": b"c" * 700, "ca.crt": b"a" * 600}
_META = b"m" * 900
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write_file(path: str, content: bytes, mode: int) -> None:
    fd = os.open(path, _CREATE, mode)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_once(volume: str) -> None:
    os.mkdir(volume, 0o700)
    data = f"{volume}/data"
    os.mkdir(data, 0o750)
    generation = f"{data}/..gen"
    os.mkdir(generation, 0o750)
    for name, content in _FILES.items():
        _write_file(f"{generation}/{name}", content, 0o440)
    os.symlink("..gen", f"{data}/..data")
    for name in _FILES:
        os.symlink(f"..data/{name}", f"{data}/{name}")
    _write_file(f"{volume}/.meta.tmp", _META, 0o600)
    os.rename(f"{volume}/.meta.tmp", f"{volume}/meta.json")


def _bind_once(libc: Libc, source: str, target: str) -> float:
    """Seconds for one read-only bind the agent's way; unmounted again before returning."""
    started = time.perf_counter()
    tree = libc.open_tree(source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    try:
        libc.mount_setattr(
            tree, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        )
        target_fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            libc.move_mount(tree, target_fd)
        finally:
            os.close(target_fd)
    finally:
        os.close(tree)
    return time.perf_counter() - started


def floors(ca: CertificateAuthority, tmp: Path, samples: int, mount: bool) -> Floors:
    """Each floor ``samples`` times, interleaved. With ``mount`` (root, in the bench's private
    mount namespace) the files go to a tmpfs of their own, as the agent's payloads do."""
    crypto, files, binds, unmounts = [], [], [], []
    libc = Libc() if mount else None
    scratch = tmp / "floor-tmpfs"
    target_dir = tmp / "floor-targets"
    scratch.mkdir()
    target_dir.mkdir()
    if libc is not None:
        libc.mount("tmpfs", str(scratch), "tmpfs", SAFE_FLAGS, "size=64m,mode=0700")
    try:
        for i in range(samples):
            started = time.perf_counter()
            _crypto_once(ca)
            crypto.append(time.perf_counter() - started)
            volume = f"{scratch}/v{i}"
            started = time.perf_counter()
            _files_once(volume)
            files.append(time.perf_counter() - started)
            if libc is not None:
                target = target_dir / f"t{i}"
                target.mkdir()
                binds.append(_bind_once(libc, f"{volume}/data", str(target)))
                started = time.perf_counter()
                libc.umount2(str(target), UMOUNT_NOFOLLOW)
                unmounts.append(time.perf_counter() - started)
                target.rmdir()
    finally:
        if libc is not None:
            libc.umount2(str(scratch), UMOUNT_NOFOLLOW)
        shutil.rmtree(scratch, ignore_errors=True)
    return Floors(
        crypto_ms=_median_ms(crypto),
        files_ms=_median_ms(files),
        bind_ms=_median_ms(binds) if binds else 0.0,
        unmount_ms=_median_ms(unmounts) if unmounts else 0.0,
        samples=samples,
    )


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
