"""Where an ECDSA P-256 publish spends its time: cProfile of the agent's side of NodePublishVolume.

A section of `make bench`. The agent runs in this process (so cProfile can see its gRPC handler
thread) and logs JSON lines to a file as deployed; a real gRPC client calls it over the UNIX
socket, one new pod at a time. The profiler is switched on around each call of the CSI servicer's
method only (the admission slot, the field checks, the volume manager, the metrics and the error
mapping), so what it reports is the agent's own work; the gap between the client-side wall time
and the servicer's is gRPC and the socket.
"""

from __future__ import annotations

import cProfile
import functools
import io
import pstats
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.csi import csi_pb2
from agent.csi.service import NodeServicer
from agent.observe.logs import configure_logging
from tests.bench_floors import Floors, GrpcFloor, floors, grpc_floor
from tests.conftest import IS_ROOT, RunningAgent, unmount_below

ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}


@dataclass
class ProfileResults:
    publishes: int
    client_ms: float  # median wall time seen by the client
    handler_ms: float  # median time inside the handler (profiler off)
    rows: list[tuple[str, int, float, float]]  # function, calls per publish, tottime ms, cumtime ms
    total_profiled_ms: float  # per publish, with the profiler's own overhead
    empty_rpc_ms: float = 0.0  # median Probe round trip: gRPC and the socket, no work
    floors: Floors | None = None  # crypto, files and mount syscalls alone (bench_floors)
    grpc: GrpcFloor | None = None  # an empty RPC between two processes, and its CPU split
    servicer_ms: float = 0.0  # median time inside the CSI servicer's method (profiler off)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name  # a builtin, e.g. <built-in method posix.fsync>
    path = Path(filename)
    parts = path.parts
    for anchor in ("agent", "grpc", "cryptography", "json", "logging"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{'/'.join(parts[index:])}:{line}({name})"
    return f"{path.name}:{line}({name})"


def bench_profile(tmp: Path, publishes: int, warmup: int = 20, top: int = 25) -> ProfileResults:
    profiler = cProfile.Profile()
    handler_times: list[float] = []
    servicer_times: list[float] = []
    profiling = {"on": False}
    servicer_method: Callable[..., Any] = NodeServicer.NodePublishVolume

    # The servicer's method as gRPC calls it (the class attribute, looked up when the agent
    # registers its servicers): the whole CSI layer, profiled when asked.
    @functools.wraps(servicer_method)
    def node_publish(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        if profiling["on"]:
            profiler.enable()
        try:
            return servicer_method(*args, **kwargs)
        finally:
            if profiling["on"]:
                profiler.disable()
            else:
                servicer_times.append(time.perf_counter() - started)

    log_file = open(tmp / "agent.log", "w")  # noqa: SIM115 - closed in finally
    configure_logging("info", "json", stream=log_file)  # one JSON line per publish, as deployed
    NodeServicer.NodePublishVolume = node_publish  # type: ignore[method-assign]
    try:
        running = RunningAgent(tmp)
    finally:
        NodeServicer.NodePublishVolume = servicer_method  # type: ignore[method-assign]
    manager = running.agent.manager
    original: Callable[..., Any] = manager.publish

    @functools.wraps(original)
    def publish(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if not profiling["on"]:
                handler_times.append(time.perf_counter() - started)

    manager.publish = publish  # type: ignore[method-assign]
    client_times: list[float] = []
    try:
        # Unprofiled first: the client-side, servicer and handler medians without the profiler.
        for i in range(warmup + publishes):
            pod = running.pod(f"plain-{i}")
            request = pod.request(ATTRIBUTES)
            started = time.perf_counter()
            running.client.publish(request)
            if i >= warmup:
                client_times.append(time.perf_counter() - started)
            running.client.unpublish(pod.volume_id, str(pod.target))
        handler = handler_times[warmup:]
        servicer = servicer_times[warmup:]
        probes = []
        for _ in range(publishes):
            started = time.perf_counter()
            running.client.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
            probes.append(time.perf_counter() - started)
        ca = running.agent.ca_provider.current()
        floor = floors(ca, tmp, publishes, mount=IS_ROOT)
        rpc_floor = grpc_floor(tmp, max(publishes, 500))
        profiling["on"] = True
        for i in range(publishes):
            pod = running.pod(f"profiled-{i}")
            running.client.publish(pod.request(ATTRIBUTES))
            running.client.unpublish(pod.volume_id, str(pod.target))
    finally:
        running.stop()
        unmount_below(tmp)
        configure_logging("warning", "json")  # off the file before closing it
        log_file.close()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for func, (_cc, calls, tottime, cumtime, _callers) in entries.items():
        rows.append((_label(func), calls, tottime, cumtime))
    total = sum(row[2] for row in rows)
    rows.sort(key=lambda row: row[2], reverse=True)
    return ProfileResults(
        publishes=publishes,
        client_ms=_median(client_times) * 1000,
        handler_ms=_median(handler) * 1000,
        servicer_ms=_median(servicer) * 1000,
        rows=[
            (name, round(calls / publishes), tot * 1000 / publishes, cum * 1000 / publishes)
            for name, calls, tot, cum in rows[:top]
        ],
        total_profiled_ms=total * 1000 / publishes,
        empty_rpc_ms=_median(probes) * 1000,
        floors=floor,
        grpc=rpc_floor,
    )


def render_profile(add: Callable[[str], None], results: ProfileResults) -> None:
    add(
        f"{results.publishes} ECDSA P-256 publishes of new pods over the UNIX socket into an "
        "in-process agent"
    )
    add(
        "(local CA, bind mount, JSON log lines to a file as deployed), profiled with cProfile "
        "around the CSI servicer's"
    )
    add(
        "`NodePublishVolume` only (admission slot, field checks, the volume manager, metrics, "
        "error mapping). Without"
    )
    add(
        f"the profiler: client-side median {results.client_ms:.2f} ms, of which "
        f"{results.servicer_ms:.2f} ms inside the servicer's method and, in it,"
    )
    add(
        f"{results.handler_ms:.2f} ms inside `VolumeManager.publish` (the rest, "
        f"{results.client_ms - results.servicer_ms:.2f} ms, is gRPC and the socket). With the "
        "profiler"
    )
    add(
        f"on, the servicer's functions add up to {results.total_profiled_ms:.2f} ms per publish "
        "(the profiler's own cost included)."
    )
    add(f"An empty RPC (`Probe`) to the same in-process agent takes {results.empty_rpc_ms:.2f} ms.")
    add("")
    _render_floors(add, results)
    add("The top by own time (*tottime*), per publish:")
    add("")
    add("| function | calls per publish | own ms | cumulative ms |")
    add("|---|---|---|---|")
    for name, calls, tottime, cumtime in results.rows:
        add(f"| `{name}` | {calls} | {tottime:.3f} | {cumtime:.3f} |")
    add("")


def python_ms(results: ProfileResults) -> float | None:
    """The handler's time beyond its crypto, file and mount floors: the agent's own Python."""
    f = results.floors
    if f is None:
        return None
    return results.handler_ms - f.crypto_ms - f.files_ms - f.bind_ms


def _render_floors(add: Callable[[str], None], results: ProfileResults) -> None:
    f, g = results.floors, results.grpc
    if f is None or g is None:
        return
    rest = python_ms(results)
    add("Where a publish's time goes (medians of this run; the floors are measured in Python")
    add("alone, side by side with the publishes, by `tests/bench_floors.py`):")
    add("")
    add("| part | ms |")
    add("|---|---|")
    add(f"| publish, client side (in-process agent) | {results.client_ms:.2f} |")
    add(
        "| gRPC floor: an empty RPC between two processes, sync server on a thread pool "
        f"(as the agent serves) | {g.sync_ms:.2f} |"
    )
    add(f"| the same against a `grpc.aio` server answering inline | {g.aio_ms:.2f} |")
    add(
        f"| CPU per empty RPC: the Python client / the server process | {g.client_cpu_ms:.2f} / "
        f"{g.server_cpu_ms:.2f} |"
    )
    add(
        "| the CSI servicer's method: admission, field checks, the handler, metrics "
        f"| {results.servicer_ms:.2f} |"
    )
    add(
        "| in it, around the handler: the CSI layer (servicer - handler) "
        f"| {results.servicer_ms - results.handler_ms:.2f} |"
    )
    add(f"| the agent's handler, `VolumeManager.publish` | {results.handler_ms:.2f} |")
    add(
        "| in it, crypto floor: ECDSA key, certificate signed by the CA, both PEM "
        f"(no CSR, as the local CA now signs) | {f.crypto_ms:.2f} |"
    )
    add(
        "| in it, file floor: payload (3 files, fsync, 4 links) and metadata (write, fsync, "
        f"rename) with bare `os` calls | {f.files_ms:.2f} |"
    )
    mount = (
        f"{f.bind_ms:.2f} (its unmount {f.unmount_ms:.2f})" if f.bind_ms else "- (no mount here)"
    )
    add(
        "| in it, mount floor: one read-only bind (open_tree, mount_setattr, move_mount) "
        f"| {mount} |"
    )
    if rest is not None:
        add(
            f"| in it, the rest: the agent's own Python (handler - the three floors) | {rest:.2f} |"
        )
    add(
        "| beyond the servicer: gRPC, the socket, in one interpreter with the client "
        f"| {results.client_ms - results.servicer_ms:.2f} |"
    )
    add("")
