"""Scale: publish and unpublish latency as volumes pile up, restart, idle and memory at N volumes.

A section of `make bench`. The agent runs as its own `cert-agent serve` process; this process is
the kubelet-like client (real gRPC over the UNIX socket). One agent is filled up to each
checkpoint (0, 500, 2,000, 5,000 existing volumes) by a few concurrent client threads; at each
checkpoint `samples` new pods are published one after another, then unpublished one after
another, so the agent holds the checkpoint's count (plus at most `samples`) while timed.

The bench tree is made a shared mount with one peer (the way kubelet's directory is shared
between the host and the agent's container under Bidirectional propagation), so every mount the
agent makes propagates once, as on a node: the kernel's own cost of mounts under shared
propagation is part of what is measured.
"""

from __future__ import annotations

import compileall
import contextlib
import ctypes
import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from agent.client import CSIClient
from agent.csi import csi_pb2
from tests.conftest import IS_ROOT, REPO, AgentProcess, Pod

ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}
# Enough room on the payload tmpfs for 5,000 volumes (a few 4 KiB pages each).
TMPFS_MIB = 1024


@dataclass
class Checkpoint:
    volumes: int
    publish: list[float]
    unpublish: list[float]
    publish_cpu: float = 0.0  # agent process on-CPU seconds over the publishes (all threads)


@dataclass
class StartTimes:
    """One start of `cert-agent serve`, timed from exec."""

    probe: float  # seconds from exec until Probe answers ready
    recovered: float  # seconds from exec until the agent logs every volume recovered
    recovered_count: int
    # The agent's own timeline ("agent serving" log line: startup_ms), plus what came before its
    # first import (exec and interpreter start), in ms.
    steps: dict[str, float] = field(default_factory=dict)
    # Probe latencies (s) while the recovery ran, back to back with 5 ms pauses, and after it.
    probe_recovering: list[float] = field(default_factory=list)
    probe_after: list[float] = field(default_factory=list)


@dataclass
class RestartSample:
    binds_removed: bool  # every bind was unmounted before the start: all must be re-bound
    probe: float  # seconds from exec until Probe answers ready
    recovered: float  # seconds from exec until the agent logs every volume recovered
    recovered_count: int
    mounts_after: int
    times: StartTimes | None = None


@dataclass
class ScaleResults:
    checkpoints: list[Checkpoint]
    volumes: int
    fill_seconds: float
    restarts: list[RestartSample] = field(default_factory=list)
    idle: list[object] = field(default_factory=list)  # IdleSample: agent N, agent 0
    idle_seconds: int = 0
    shared_propagation: bool = False


def detach(root: Path) -> None:
    """umount2(root, MNT_DETACH): the kernel detaches the mount and everything below it in one
    call (`umount -R -l` unmounts them one by one: 24 s for 5,000 binds, 11 ms this way)."""
    ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(root), 2)


@contextlib.contextmanager
def own_mount(root: Path) -> Iterator[None]:
    """``root`` bound onto itself, so one detach takes every mount below it away (one umount
    process per mount took minutes with thousands of volumes)."""
    if not IS_ROOT:
        yield
        return
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    try:
        yield
    finally:
        detach(root)


@contextlib.contextmanager
def shared_with_peer(root: Path) -> Iterator[bool]:
    """Make ``root`` a shared mount with one peer at ``root``.peer, as kubelet's directory is
    (host and agent container); undone on exit. Root only, inside the bench's own namespace."""
    if not IS_ROOT:
        yield False
        return
    peer = root.with_name(root.name + ".peer")
    peer.mkdir()
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    subprocess.run(["mount", "--make-shared", str(root)], check=True)
    subprocess.run(["mount", "--bind", str(root), str(peer)], check=True)
    try:
        yield True
    finally:
        detach(peer)
        detach(root)
        with contextlib.suppress(OSError):
            peer.rmdir()


def probe_ready(client: CSIClient) -> bool:
    try:
        response = client.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return bool(response.ready.value)


def _recovery_line(process: AgentProcess) -> dict[str, object] | None:
    """The log line that says every volume is recovered ('agent serving' in agents that
    recover before serving, 'volumes recovered' in agents that serve while recovering)."""
    with contextlib.suppress(FileNotFoundError):
        for line in process.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    continue
                message = entry.get("msg")
                if message == "volumes recovered" or (
                    message == "agent serving" and "volumes_recovered" in entry
                ):
                    return entry
    return None


def _log_time(entry: dict[str, object]) -> float:
    return dt.datetime.fromisoformat(str(entry["ts"]).replace("Z", "+00:00")).timestamp()


def _serving_line(process: AgentProcess) -> dict[str, object] | None:
    with contextlib.suppress(FileNotFoundError):
        for line in process.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("msg") == "agent serving":
                    return entry
    return None


def _probe_seconds(client: CSIClient) -> float:
    started = time.perf_counter()
    client.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
    return time.perf_counter() - started


def start_and_time(process: AgentProcess, timeout: float = 300) -> tuple[float, float, int]:
    """Start ``process``: (seconds until Probe answers ready, seconds until the agent logs all
    volumes recovered, how many it recovered), both from exec."""
    times = start_and_time_steps(process, timeout)
    return times.probe, times.recovered, times.recovered_count


def start_and_time_steps(process: AgentProcess, timeout: float = 300) -> StartTimes:
    """``start_and_time`` with the agent's start-up steps and Probe latencies while it
    recovers (a Probe every 5 ms until it logs every volume recovered) and after (20)."""
    socket_path = Path(process.endpoint.removeprefix("unix://"))
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    log = open(process.log_path, "wb")  # noqa: SIM115 - the process owns it until it exits
    wall_start = time.time()
    started = time.perf_counter()
    process.process = subprocess.Popen(process.args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()
    probe = None
    deadline = started + timeout
    during: list[float] = []
    with CSIClient(process.endpoint, timeout=2) as client:
        while probe is None:
            if time.perf_counter() > deadline or process.process.poll() is not None:
                raise RuntimeError(f"agent did not serve: {process.log_path.read_text()[-2000:]}")
            if socket_path.exists() and probe_ready(client):
                probe = time.perf_counter() - started
            else:
                time.sleep(0.002)
        while (entry := _recovery_line(process)) is None:
            if time.perf_counter() > deadline:
                raise RuntimeError("the agent never logged its volumes recovered")
            during.append(_probe_seconds(client))
            time.sleep(0.005)
        after = [_probe_seconds(client) for _ in range(20)]
    times = StartTimes(probe, _log_time(entry) - wall_start, int(str(entry["volumes_recovered"])))
    times.probe_recovering, times.probe_after = during, after
    serving = _serving_line(process)
    steps = serving.get("startup_ms") if serving is not None else None
    if isinstance(steps, dict):
        total = float(steps.get("total", 0.0))
        # The log's timestamp has millisecond precision: so has this step.
        before = max(0.0, (_log_time(serving) - wall_start) * 1000 - total)  # type: ignore[arg-type]
        times.steps = {"exec, interpreter start": round(before, 1), **steps}
    return times


def compile_agent() -> None:
    """Byte-compile the agent's modules, as the image does (Dockerfile: compileall): where the
    environment sets PYTHONDONTWRITEBYTECODE, every agent process measured here would otherwise
    compile all of them from source at start, ~100 ms that no deployed agent spends."""
    compileall.compile_dir(str(REPO / "agent"), quiet=1)


def mounts_below(root: Path) -> int:
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        return sum(1 for line in mountinfo if line.split()[4].startswith(prefix))


class ScaleFleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dir = tmp / "scale"
        self.dir.mkdir()
        self.kubelet = self.dir / "kubelet"
        # Settings from a --config file, as the DaemonSet gives them (deploy/base/config.yaml),
        # so a start here parses YAML as a deployed agent's does.
        config = self.dir / "config.yaml"
        config.write_text(f"tmpfs-size: {TMPFS_MIB}\ngrpc-workers: 8\n")
        self.args = ("--config", str(config))
        self.agent = AgentProcess(self.dir, *self.args)
        self.pods: list[Pod] = []

    def new_pod(self, name: str) -> Pod:
        return Pod(self.kubelet, name)

    def fill_to(self, client: CSIClient, count: int, threads: int = 4) -> None:
        start = len(self.pods)
        new = [self.new_pod(f"fill-{i}") for i in range(start, count)]
        requests = [pod.request(ATTRIBUTES) for pod in new]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(client.publish, requests))
        self.pods.extend(new)

    def measure(self, client: CSIClient, samples: int) -> Checkpoint:
        from tests.bench_agent import oncpu_seconds

        assert self.agent.process is not None
        pid = self.agent.process.pid
        count = len(self.pods)
        pods = [self.new_pod(f"sample-{count}-{i}") for i in range(samples)]
        requests = [pod.request(ATTRIBUTES) for pod in pods]
        publish, unpublish = [], []
        cpu = oncpu_seconds(pid)
        for request in requests:
            started = time.perf_counter()
            client.publish(request)
            publish.append(time.perf_counter() - started)
        cpu = oncpu_seconds(pid) - cpu
        for pod in pods:
            started = time.perf_counter()
            client.unpublish(pod.volume_id, str(pod.target))
            unpublish.append(time.perf_counter() - started)
        return Checkpoint(count, publish, unpublish, cpu)

    def unmount_all_binds(self) -> None:
        # umount2(2) directly: a umount process per target took minutes for thousands.
        libc = ctypes.CDLL(None, use_errno=True)
        for pod in self.pods:
            libc.umount2(os.fsencode(pod.target), 0)

    def restart(self, binds_removed: bool) -> RestartSample:
        self.agent.stop()
        if binds_removed:
            self.unmount_all_binds()
            # The kernel finishes releasing thousands of propagated mounts in the background;
            # without a pause the next exec pays for it (up to 100 ms more before its first
            # import), a cost of this bench's unmounts, not of the agent's start.
            time.sleep(1)
        self.agent = AgentProcess(self.dir, *self.args, metrics_port=self.agent.metrics_port)
        times = start_and_time_steps(self.agent)
        return RestartSample(
            binds_removed,
            times.probe,
            times.recovered,
            times.recovered_count,
            mounts_below(self.kubelet),
            times,
        )


def bench_scale(
    tmp: Path,
    checkpoints: list[int],
    samples: int,
    restarts: int,
    idle_seconds: int,
    measure_idle: Callable[[list[tuple[str, int, int]], int], list[object]] | None = None,
    log: Callable[[str], None] = print,
) -> ScaleResults:
    compile_agent()
    root = tmp / "propagated"
    root.mkdir()
    with shared_with_peer(root) as shared:
        fleet = ScaleFleet(root)
        empty = AgentProcess(root / "empty-agent")
        (root / "empty-agent").mkdir()
        results = ScaleResults([], checkpoints[-1], 0.0, shared_propagation=shared)
        try:
            start_and_time(fleet.agent)
            start_and_time(empty)
            fill_seconds = 0.0
            with CSIClient(fleet.agent.endpoint, timeout=120) as client:
                for count in checkpoints:
                    started = time.perf_counter()
                    fleet.fill_to(client, count)
                    fill_seconds += time.perf_counter() - started
                    results.checkpoints.append(fleet.measure(client, samples))
                    point = results.checkpoints[-1]
                    log(
                        f"  {count} volumes: publish median "
                        f"{sorted(point.publish)[len(point.publish) // 2] * 1000:.2f} ms, "
                        f"unpublish median "
                        f"{sorted(point.unpublish)[len(point.unpublish) // 2] * 1000:.2f} ms"
                    )
            results.fill_seconds = fill_seconds
            if measure_idle is not None and fleet.agent.process and empty.process:
                subjects = [
                    ("agent, N volumes", len(fleet.pods), fleet.agent.process.pid),
                    ("agent, no volumes", 0, empty.process.pid),
                ]
                results.idle = measure_idle(subjects, idle_seconds)
                results.idle_seconds = idle_seconds
                log(f"  idle window of {idle_seconds}s measured")
            for i in range(restarts):
                results.restarts.append(fleet.restart(binds_removed=i % 2 == 1))
                sample = results.restarts[-1]
                log(
                    f"  restart ({'binds removed' if sample.binds_removed else 'binds in place'}):"
                    f" Probe {sample.probe * 1000:.0f} ms, all recovered "
                    f"{sample.recovered * 1000:.0f} ms, {sample.mounts_after} mounts"
                )
        finally:
            fleet.agent.stop()
            empty.stop()
            # shared_with_peer detaches the whole tree in one umount2 call on the way out.
    return results
