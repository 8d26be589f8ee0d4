"""Where an ECDSA P-256 publish spends its time: cProfile of the agent's side of NodePublishVolume.

A section of `make bench`. The agent runs in this process (so cProfile can see its gRPC handler
thread); a real gRPC client calls it over the UNIX socket, one new pod at a time. The profiler is
switched on around each handler call only, so what it reports is the agent's own work; the gap
between the client-side wall time and the handler time is gRPC and the socket.
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
from tests.conftest import RunningAgent, unmount_below

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
    running = RunningAgent(tmp)
    profiler = cProfile.Profile()
    handler_times: list[float] = []
    profiling = {"on": False}
    manager = running.agent.manager
    original: Callable[..., Any] = manager.publish

    @functools.wraps(original)
    def publish(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        if profiling["on"]:
            profiler.enable()
        try:
            return original(*args, **kwargs)
        finally:
            if profiling["on"]:
                profiler.disable()
            else:
                handler_times.append(time.perf_counter() - started)

    manager.publish = publish  # type: ignore[method-assign]
    client_times: list[float] = []
    try:
        # Unprofiled first: the client-side and handler medians without the profiler's cost.
        for i in range(warmup + publishes):
            pod = running.pod(f"plain-{i}")
            request = pod.request(ATTRIBUTES)
            started = time.perf_counter()
            running.client.publish(request)
            if i >= warmup:
                client_times.append(time.perf_counter() - started)
            running.client.unpublish(pod.volume_id, str(pod.target))
        handler = handler_times[warmup:]
        probes = []
        for _ in range(publishes):
            started = time.perf_counter()
            running.client.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
            probes.append(time.perf_counter() - started)
        profiling["on"] = True
        for i in range(publishes):
            pod = running.pod(f"profiled-{i}")
            running.client.publish(pod.request(ATTRIBUTES))
            running.client.unpublish(pod.volume_id, str(pod.target))
    finally:
        running.stop()
        unmount_below(tmp)
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
        rows=[
            (name, round(calls / publishes), tot * 1000 / publishes, cum * 1000 / publishes)
            for name, calls, tot, cum in rows[:top]
        ],
        total_profiled_ms=total * 1000 / publishes,
        empty_rpc_ms=_median(probes) * 1000,
    )


def render_profile(add: Callable[[str], None], results: ProfileResults) -> None:
    add(
        f"{results.publishes} ECDSA P-256 publishes of new pods over the UNIX socket into an "
        "in-process agent"
    )
    add("(local CA, bind mount), profiled with cProfile inside the agent's handler only. Without")
    add(
        f"the profiler: client-side median {results.client_ms:.2f} ms, of which "
        f"{results.handler_ms:.2f} ms inside `VolumeManager.publish`"
    )
    add(
        f"(the rest, {results.client_ms - results.handler_ms:.2f} ms, is gRPC, the socket and "
        "the CSI field checks). With the profiler"
    )
    add(
        f"on, the handler's functions add up to {results.total_profiled_ms:.2f} ms per publish "
        "(the profiler's own cost included);"
    )
    add(
        f"An empty RPC (`Probe`) over the same socket takes {results.empty_rpc_ms:.2f} ms: "
        "the gRPC floor under any publish."
    )
    add("The top by own time (*tottime*), per publish:")
    add("")
    add("| function | calls per publish | own ms | cumulative ms |")
    add("|---|---|---|---|")
    for name, calls, tottime, cumtime in results.rows:
        add(f"| `{name}` | {calls} | {tottime:.3f} | {cumtime:.3f} |")
    add("")
