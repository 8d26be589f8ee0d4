"""Bursts and renewal storms (sections of `make bench`).

- Burst: 110 RSA-2048 publishes at once (kubelet's default max pods per node) against the same
  110 one after another, into one `cert-agent serve` process, rounds alternating; and 110 ECDSA
  publishes at once, whose per-call latencies give the burst p99.
- Storm: an agent (in this process, with an injected clock) holding N volumes; the clock jumps
  past every renewal point, so all N are due at once. A kubelet-like client in a separate
  process publishes new pods one after another during the storm and, for comparison, while the
  agent is idle; the time until every volume is renewed is measured from the jump.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from agent.client import CSIClient
from tests.conftest import REPO, AgentProcess, Pod, RunningAgent, unmount_below
from tests.fakekube import FakeClock

ECDSA = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}
RSA = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/key-algorithm": "RSA",
    "csi.cert-agent.io/key-size": "2048",
}
# Codes an agent answers when it sheds load; kubelet retries them, and so does this client.
RETRY_CODES = (
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
)


def publish_retrying(client: CSIClient, pod: Pod, attributes: dict[str, str]) -> int:
    """Publish like kubelet: retry what the agent sheds (after 50 ms here); returns retries."""
    request = pod.request(attributes)
    retries = 0
    while True:
        try:
            client.publish(request)
            return retries
        except grpc.RpcError as exc:
            if exc.code() not in RETRY_CODES or retries > 1000:
                raise
            retries += 1
            time.sleep(0.05)


@dataclass
class BurstResults:
    pods: int
    rounds: int
    sequential: list[float] = field(default_factory=list)  # wall seconds for all pods
    parallel: list[float] = field(default_factory=list)
    parallel_cpu: list[float] = field(default_factory=list)  # agent CPU seconds in the burst
    retries: int = 0
    ecdsa_burst: list[float] = field(default_factory=list)  # per-call latency, all at once
    ecdsa_wall: float = 0.0


def _agent_cpu(pid: int) -> float:
    from tests.bench_agent import cpu_seconds

    return cpu_seconds(pid)


def bench_burst(tmp: Path, pods: int, rounds: int) -> BurstResults:
    # Every call of the burst admitted (the default --grpc-workers 8 answers the rest
    # RESOURCE_EXHAUSTED, and kubelet's backoff would then set the pace, not the agent).
    agent = AgentProcess(tmp, "--tmpfs-size", "256", "--grpc-workers", str(pods))
    results = BurstResults(pods, rounds)
    agent.start()
    assert agent.process is not None
    pid = agent.process.pid
    try:
        with CSIClient(agent.endpoint, timeout=300) as client:
            for r in range(rounds):
                for kind in (
                    ("sequential", "parallel") if r % 2 == 0 else ("parallel", "sequential")
                ):
                    batch = [Pod(tmp / "kubelet", f"{kind}-{r}-{i}") for i in range(pods)]
                    cpu = _agent_cpu(pid)
                    started = time.perf_counter()
                    if kind == "sequential":
                        for pod in batch:
                            results.retries += publish_retrying(client, pod, RSA)
                        results.sequential.append(time.perf_counter() - started)
                    else:
                        retries = _all_at_once(client, batch, RSA, [])
                        results.parallel.append(time.perf_counter() - started)
                        results.parallel_cpu.append(_agent_cpu(pid) - cpu)
                        results.retries += retries
                    for pod in batch:
                        client.unpublish(pod.volume_id, str(pod.target))
            batch = [Pod(tmp / "kubelet", f"ecdsa-{i}") for i in range(pods)]
            started = time.perf_counter()
            results.retries += _all_at_once(client, batch, ECDSA, results.ecdsa_burst)
            results.ecdsa_wall = time.perf_counter() - started
            for pod in batch:
                client.unpublish(pod.volume_id, str(pod.target))
    finally:
        agent.stop()
        unmount_below(tmp)
    return results


def _all_at_once(
    client: CSIClient, pods: list[Pod], attributes: dict[str, str], latencies: list[float]
) -> int:
    """One thread per pod, released together by a barrier; per-call latencies appended."""
    barrier = threading.Barrier(len(pods))
    retries: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(pod: Pod) -> None:
        pod.request(attributes)  # kubelet's directories first, outside the timing
        barrier.wait()
        started = time.perf_counter()
        try:
            n = publish_retrying(client, pod, attributes)
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            latencies.append(time.perf_counter() - started)
            retries.append(n)

    threads = [threading.Thread(target=one, args=(pod,)) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(retries)


# ---------------------------------------------------------------------------------- storm

CLIENT = """
import json, sys, time
from pathlib import Path
from agent.client import CSIClient
from tests.bench_load import ECDSA
from tests.conftest import Pod
endpoint, root, prefix, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
out = []
with CSIClient(endpoint, timeout=120) as client:
    pods = [Pod(root, f"{prefix}-{i}") for i in range(count)]
    requests = [pod.request(ECDSA) for pod in pods]
    print("ready", flush=True)
    sys.stdin.readline()
    for pod, request in zip(pods, requests):
        started = time.perf_counter()
        client.publish(request)
        out.append(time.perf_counter() - started)
print(json.dumps(out), flush=True)
"""


def run_client(endpoint: str, root: Path, prefix: str, count: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", CLIENT, endpoint, str(root), prefix, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("the storm client did not start")
    return process


def client_latencies(process: subprocess.Popen[str]) -> list[float]:
    out, _ = process.communicate("go\n", timeout=600)
    latencies: list[float] = json.loads(out.strip().splitlines()[-1])
    return latencies


@dataclass
class StormResults:
    volumes: int
    publishes: int
    renew_all_seconds: float
    idle: list[float]
    storm: list[float]
    renewed: int
    publishes_during_storm: int  # of the storm run's publishes, how many ended before it did


def bench_storm(
    tmp: Path, volumes: int, publishes: int, log: Callable[[str], None]
) -> StormResults:
    from tests.bench_scale import own_mount

    with own_mount(tmp):  # one detach takes the thousands of binds away at the end
        return _storm(tmp, volumes, publishes, log)


def _storm(tmp: Path, volumes: int, publishes: int, log: Callable[[str], None]) -> StormResults:
    clock = FakeClock()
    running = RunningAgent(tmp, clock=clock, tmpfs_size_bytes=1024 * 1024 * 1024)
    # The self-signed CA was made just now on the real clock: start the fake one past it.
    clock.advance_to(int(time.time()) + 2)
    try:
        client = running.client
        for i in range(volumes):
            client.publish(running.pod(f"storm-{i}").request(ECDSA))
        log(f"  {volumes} volumes published for the storm")
        scheduler, store = running.agent.scheduler, running.agent.store
        endpoint = running.config.endpoint
        idle_client = run_client(endpoint, tmp / "kubelet", "idle", publishes)
        idle = client_latencies(idle_client)
        volume_ids = [v for v in store.volume_ids() if not v.startswith("idle")]
        dues = {v: scheduler.due_time(v) for v in volume_ids}
        storm_volumes = [v for v, due in dues.items() if due is not None]
        moment = max(due for due in dues.values() if due is not None) + 1
        storm_client = run_client(endpoint, tmp / "kubelet", "storm", publishes)
        clock.advance_to(moment)
        started = time.perf_counter()
        scheduler.wake()
        assert storm_client.stdin is not None
        storm_client.stdin.write("go\n")
        storm_client.stdin.flush()

        def renewed() -> int:
            return sum(
                1
                for v in storm_volumes
                if (due := scheduler.due_time(v)) is not None and due > moment
            )

        deadline = time.monotonic() + 900
        while renewed() < len(storm_volumes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"storm: {renewed()} of {len(storm_volumes)} renewed")
            time.sleep(0.01)
        renew_all = time.perf_counter() - started
        storm_done = time.perf_counter()
        out, _ = storm_client.communicate(timeout=600)
        storm = json.loads(out.strip().splitlines()[-1])
        # How many storm publishes ended while renewals were still running (from the start).
        elapsed, during = 0.0, 0
        for latency in storm:
            elapsed += latency
            if elapsed <= storm_done - started:
                during += 1
        return StormResults(volumes, publishes, renew_all, idle, storm, renewed(), during)
    finally:
        running.stop()
