"""Benchmarks: the agent measured side by side with the raw cryptography it cannot avoid.

Run with `make bench` (or `python -m tests.bench_agent --output docs/benchmarks.md`). Every
number is a ratio taken within one run, so a slow or busy machine shifts both sides alike:

1. NodePublishVolume / NodeUnpublishVolume through the real gRPC socket of an in-process agent,
   interleaved with the raw `cryptography` cost of the same work (key, CSR, CA signature).
2. One renewal through VolumeManager.renew, interleaved with the same raw baseline.
3. Idle cost: CPU, wakeups and RSS of `cert-agent serve` processes holding N volumes and none,
   against a simulated one-ticker-per-volume design, all measured over the same window.
4. Restart recovery: time until a restarted agent serves with N volumes recovered, against an
   agent with none.
6. Pod IP SANs: from the pod watch delivering a pod's IP to the certificate carrying it
   (tests/bench_pod_ips.py, against the fake API server).
7. PodCertificateRequests: from the signer's watch delivering a request to its Issued status
   written (tests/bench_pcr.py, against the fake API server with the real status rules).
8. /metrics under a burst: many concurrent scrapes of the metrics endpoint (in process, holding
   the series of N volumes), with the kernel's listen-overflow counter read before and after.

Loopback and local files only; every loop is bounded; mounts are removed even on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cryptography
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.client import CSIClient
from agent.observe.httpserver import LISTEN_BACKLOG, WORKERS, HealthServer
from agent.observe.logs import configure_logging
from agent.observe.metrics import AgentMetrics
from agent.pki.ca import CertificateAuthority
from agent.volumes.mounter import read_mountinfo
from tests.bench_node_ca import NodeCAResults, bench_node_ca, render_node_ca
from tests.bench_pcr import PcrResults, bench_pcr, render_pcr
from tests.bench_pod_ips import PodIPResults, bench_pod_ips, render_pod_ips
from tests.conftest import (
    IS_ROOT,
    REPO,
    AgentProcess,
    Pod,
    RunningAgent,
    enter_private_mount_namespace,
    unmount_below,
)

ECDSA_ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}
RSA_ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/key-algorithm": "RSA",
    "csi.cert-agent.io/key-size": "2048",
}
ALGORITHMS: dict[str, dict[str, str]] = {
    "ECDSA P-256": ECDSA_ATTRIBUTES,
    "RSA 2048": RSA_ATTRIBUTES,
}

CLK_TCK = os.sysconf("SC_CLK_TCK")

# One thread per volume waking every second for a trivial due check: the per-volume ticker design
# (cert-manager's csi-driver runs a 1 s ticker per volume), simulated in Python like the agent.
TICKER_PROGRAM = """
import sys, threading, time
n = int(sys.argv[1])
stop = threading.Event()
due = [time.time() + 60 * 86400] * n
def tick(i):
    while not stop.wait(1.0):
        if time.time() >= due[i]:
            due[i] = time.time() + 60 * 86400
for i in range(n):
    threading.Thread(target=tick, args=(i,), daemon=True).start()
    time.sleep(1.0 / n)  # tickers start as volumes are published: spread over a second
print("ready", flush=True)
sys.stdin.read()
stop.set()
"""


# ------------------------------------------------------------------------------------ stats


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Stats:
    n: int
    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        return cls(
            len(values), percentile(values, 50), percentile(values, 10), percentile(values, 90)
        )


@dataclass
class Paired:
    """Agent and raw timings (seconds) taken alternately, one pair per iteration."""

    agent: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)

    def ratio_of_medians(self) -> float:
        return Stats.of(self.agent).median / Stats.of(self.raw).median

    def paired_ratios(self) -> Stats:
        return Stats.of([a / r for a, r in zip(self.agent, self.raw, strict=True)])

    def overhead(self) -> Stats:
        return Stats.of([a - r for a, r in zip(self.agent, self.raw, strict=True)])


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def interleave(
    iterations: int, warmup: int, agent: Callable[[], float], raw: Callable[[], float]
) -> Paired:
    """Alternate the order (raw first on even iterations) so drift and caches hit both alike."""
    result = Paired()
    for i in range(warmup + iterations):
        if i % 2 == 0:
            raw_seconds = raw()
            agent_seconds = agent()
        else:
            agent_seconds = agent()
            raw_seconds = raw()
        if i >= warmup:
            result.agent.append(agent_seconds)
            result.raw.append(raw_seconds)
    return result


# ------------------------------------------------------------------------------ raw crypto


class RawCrypto:
    """What issuing costs with no agent around it: key, CSR, certificate signed by the same CA."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    def issue(self, algorithm: str) -> float:
        started = time.perf_counter()
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if algorithm.startswith("RSA"):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        name = x509.DNSName("bench.default.svc.cluster.local")
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([name]), critical=True)
            .sign(key, hashes.SHA256())
        )
        public_key = csr.public_key()
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.ca.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([name]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self.ca.private_key, hashes.SHA256())
        )
        certificate.public_bytes(serialization.Encoding.PEM)
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return time.perf_counter() - started


# ------------------------------------------------------------------- 1 and 2: publish, renew


@dataclass
class LatencyResults:
    mode: str
    publish: dict[str, Paired]
    unpublish: dict[str, Stats]
    renew: dict[str, Paired]


def bench_latency(tmp: Path, iterations: dict[str, int], warmup: int) -> LatencyResults:
    running = RunningAgent(tmp)
    try:
        ca = running.agent.ca_provider.current()
        raw = RawCrypto(ca)
        mode = "mount" if running.agent.mounter.can_mount else "direct"
        publish: dict[str, Paired] = {}
        unpublish: dict[str, Stats] = {}
        renew: dict[str, Paired] = {}
        for algorithm, attributes in ALGORITHMS.items():
            unpublish_times: list[float] = []

            def publish_once(
                attributes: dict[str, str] = attributes,
                times: list[float] = unpublish_times,
            ) -> float:
                # A fresh pod each time; unpublished right away so the mount table stays small.
                pod = running.pod(f"bench-{len(times)}")
                request = pod.request(attributes)
                seconds = timed(lambda: running.client.publish(request))
                times.append(
                    timed(lambda: running.client.unpublish(pod.volume_id, str(pod.target)))
                )
                return seconds

            def raw_once(algorithm: str = algorithm) -> float:
                return raw.issue(algorithm)

            n = iterations[algorithm]
            publish[algorithm] = interleave(n, warmup, publish_once, raw_once)
            unpublish[algorithm] = Stats.of(unpublish_times[-n:])

            pod = running.pod(f"renew-{algorithm.split()[0].lower()}")
            running.publish(pod, attributes)

            def renew_once(volume_id: str = pod.volume_id) -> float:
                started = time.perf_counter()
                if running.agent.manager.renew(volume_id) is None:
                    raise RuntimeError(f"renewal of {volume_id} found no volume")
                return time.perf_counter() - started

            renew[algorithm] = interleave(n, warmup, renew_once, raw_once)
            running.client.unpublish(pod.volume_id, str(pod.target))
            print(f"  {algorithm}: publish/unpublish/renew x{n} done", flush=True)
        return LatencyResults(mode, publish, unpublish, renew)
    finally:
        running.stop()


# ------------------------------------------------------------------ 3 and 4: idle, restart


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def oncpu_seconds(pid: int) -> float:
    """Time on CPU summed over live threads (/proc/PID/task/*/schedstat, nanoseconds): the
    precise counterpart of utime + stime, whose clock-tick resolution hides idle costs."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def context_switches(pid: int) -> int:
    """Voluntary + involuntary switches summed over threads: how often anything woke up."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


@dataclass
class IdleSample:
    label: str
    volumes: int
    cpu_total: float  # utime + stime over the window
    oncpu_per_second: list[float]  # schedstat seconds on CPU in each 1 s slice
    switches_per_second: list[float]
    oncpu_total: float
    rss_kib: int
    threads: int


def wait_serving(process: AgentProcess, timeout: float = 120) -> float:
    """Start the process; seconds until its socket answers GetPluginInfo (polled every 5 ms)."""
    socket_path = Path(process.endpoint.removeprefix("unix://"))
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    log = open(process.log_path, "wb")  # noqa: SIM115 - the process owns it until it exits
    started = time.perf_counter()
    process.process = subprocess.Popen(process.args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if process.process.poll() is not None:
            raise RuntimeError(f"agent exited: {process.log_path.read_text()}")
        if socket_path.exists():
            try:
                with CSIClient(process.endpoint, timeout=2) as client:
                    client.plugin_info()
                return time.perf_counter() - started
            except grpc.RpcError:
                pass
        time.sleep(0.005)
    raise RuntimeError(f"agent did not start within {timeout}s: {process.log_path.read_text()}")


def stop_timed(process: AgentProcess) -> float:
    started = time.perf_counter()
    process.stop()
    return time.perf_counter() - started


def serving_line(
    process: AgentProcess, timeout: float = 30, message: str = "agent serving"
) -> dict[str, object]:
    # The socket answers before the metrics endpoint is up and the line is written: poll for it.
    deadline = time.monotonic() + timeout
    while True:
        for line in process.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("msg") == message:
                    return entry
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {message!r} line in {process.log_path}")
        time.sleep(0.002)


def mounts_below(root: Path) -> int:
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        return sum(1 for line in mountinfo if line.split()[4].startswith(prefix))


@dataclass
class FleetResults:
    volumes: int
    fill_latency: list[float]
    idle: list[IdleSample]
    idle_seconds: int
    restart_full: list[float]
    restart_empty: list[float]
    stop_full: list[float]
    recovered: int
    mounts_after_restart: int
    mountinfo_entries: int
    mountinfo_read: Stats  # one read_mountinfo() while the N volumes are mounted


class Fleet:
    """Two agent processes (N volumes and none) and a ticker process; all stopped by close()."""

    def __init__(self, tmp: Path, volumes: int) -> None:
        self.tmp = tmp
        self.volumes = volumes
        self.full_dir = tmp / "full"
        self.empty_dir = tmp / "empty"
        self.full_dir.mkdir()
        self.empty_dir.mkdir()
        self.full = AgentProcess(self.full_dir)
        self.empty = AgentProcess(self.empty_dir)
        self.ticker: subprocess.Popen[str] | None = None
        self.pods: list[Pod] = []

    def close(self) -> None:
        for process in (self.full, self.empty):
            process.stop()
        if self.ticker is not None and self.ticker.poll() is None:
            self.ticker.kill()
            self.ticker.wait()

    def fill(self) -> list[float]:
        latencies = []
        with CSIClient(self.full.endpoint, timeout=30) as client:
            for i in range(self.volumes):
                pod = Pod(self.full_dir / "kubelet", f"idle-{i}")
                request = pod.request(ECDSA_ATTRIBUTES)
                started = time.perf_counter()
                client.publish(request)
                latencies.append(time.perf_counter() - started)
                self.pods.append(pod)
        return latencies

    def start_ticker(self) -> None:
        self.ticker = subprocess.Popen(
            [sys.executable, "-c", TICKER_PROGRAM, str(self.volumes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.ticker.stdout is not None
        if self.ticker.stdout.readline().strip() != "ready":
            raise RuntimeError("the ticker simulation did not start")

    def measure_idle(self, seconds: int, settle: float) -> list[IdleSample]:
        assert self.full.process and self.empty.process and self.ticker
        subjects = [
            ("agent, N volumes", self.volumes, self.full.process.pid),
            ("agent, no volumes", 0, self.empty.process.pid),
            ("1 s ticker per volume (simulated)", self.volumes, self.ticker.pid),
        ]
        time.sleep(settle)
        cpu = {pid: cpu_seconds(pid) for _, _, pid in subjects}
        oncpu = {pid: [oncpu_seconds(pid)] for _, _, pid in subjects}
        switches = {pid: [context_switches(pid)] for _, _, pid in subjects}
        started = time.perf_counter()
        for second in range(1, seconds + 1):
            time.sleep(max(0.0, started + second - time.perf_counter()))
            for _, _, pid in subjects:
                oncpu[pid].append(oncpu_seconds(pid))
                switches[pid].append(context_switches(pid))
        samples = []
        for label, volumes, pid in subjects:
            o, s = oncpu[pid], switches[pid]
            samples.append(
                IdleSample(
                    label=label,
                    volumes=volumes,
                    cpu_total=cpu_seconds(pid) - cpu[pid],
                    oncpu_per_second=[b - a for a, b in itertools.pairwise(o)],
                    switches_per_second=[float(b - a) for a, b in itertools.pairwise(s)],
                    oncpu_total=o[-1] - o[0],
                    rss_kib=status_field(pid, "VmRSS"),
                    threads=status_field(pid, "Threads"),
                )
            )
        return samples

    def restart(self, rounds: int) -> tuple[list[float], list[float], list[float], int]:
        full_times: list[float] = []
        empty_times: list[float] = []
        stop_times: list[float] = []
        recovered = -1
        for _ in range(rounds):
            stop_times.append(stop_timed(self.full))
            self.full = AgentProcess(self.full_dir, metrics_port=self.full.metrics_port)
            started = time.perf_counter()
            wait_serving(self.full)
            line = serving_line(self.full, message="volumes recovered")
            full_times.append(time.perf_counter() - started)
            recovered = int(str(line.get("volumes_recovered", -1)))
            if recovered != self.volumes:
                raise RuntimeError(f"restart recovered {recovered} of {self.volumes} volumes")
            self.empty.stop()
            self.empty = AgentProcess(self.empty_dir, metrics_port=self.empty.metrics_port)
            started = time.perf_counter()
            wait_serving(self.empty)
            serving_line(self.empty, message="volumes recovered")
            empty_times.append(time.perf_counter() - started)
        return full_times, empty_times, stop_times, recovered


def bench_fleet(tmp: Path, volumes: int, idle_seconds: int, restarts: int) -> FleetResults:
    fleet = Fleet(tmp, volumes)
    try:
        wait_serving(fleet.full)
        wait_serving(fleet.empty)
        fill = fleet.fill()
        print(f"  published {volumes} volumes", flush=True)
        fleet.start_ticker()
        idle = fleet.measure_idle(idle_seconds, settle=3.0)
        print(f"  idle window of {idle_seconds}s measured", flush=True)
        # What the mounter pays per look at the mount table with the N volumes mounted.
        entries = len(read_mountinfo())
        reads = Stats.of([timed(read_mountinfo) for _ in range(30)])
        full, empty, stops, recovered = fleet.restart(restarts)
        mounts = mounts_below(fleet.full_dir / "kubelet") if IS_ROOT else 0
        print(f"  {restarts} restarts measured", flush=True)
        return FleetResults(
            volumes, fill, idle, idle_seconds, full, empty, stops, recovered, mounts, entries, reads
        )
    finally:
        fleet.close()


# ---------------------------------------------------------------------------------- report


@dataclass
class ScrapeResults:
    clients: int
    volumes: int
    latencies: list[float]
    failures: int
    listen_overflows: int
    body_bytes: int


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this network namespace (accept queue full, SYN dropped)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            fields = dict(zip(header.split()[1:], values.split()[1:], strict=True))
            return int(fields.get("ListenOverflows", 0))
    return 0


def bench_scrapes(volumes: int, clients: int, requests: int) -> ScrapeResults:
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    metrics = AgentMetrics()
    for i in range(volumes):
        metrics.set_volume(f"csi-{i:064x}", "bench", f"pod-{i}", "local", 2e9, 1.9e9)
    server = HealthServer("127.0.0.1:0", metrics.registry, lambda: (True, ""))
    server.start()

    def one(_: int) -> tuple[float, int]:
        started = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            body = response.read()
            connection.close()
            ok = response.status == 200
        except OSError:
            return time.perf_counter() - started, -1
        return time.perf_counter() - started, len(body) if ok else -1

    try:
        before = listen_overflows()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(requests)))
        overflows = listen_overflows() - before
    finally:
        server.stop()
    return ScrapeResults(
        clients=clients,
        volumes=volumes,
        latencies=[latency for latency, _ in results],
        failures=sum(1 for _, size in results if size < 0),
        listen_overflows=overflows,
        body_bytes=max(size for _, size in results),
    )


def _render_scrapes(add: Callable[[str], None], scrapes: ScrapeResults) -> None:
    add(f"## 8. /metrics under {scrapes.clients} concurrent scrapers")
    add("")
    add(
        f"{len(scrapes.latencies)} `GET /metrics` requests from {scrapes.clients} client threads "
        "(a new connection each)"
    )
    add(f"against the metrics endpoint holding the series of {scrapes.volumes} volumes")
    add(f"({scrapes.body_bytes} bytes per response), served by its {WORKERS} workers with a")
    add(f"listen backlog of {LISTEN_BACKLOG}. Listen overflows are the kernel's TcpExt")
    add("ListenOverflows counter over the run: a SYN dropped because the accept queue was full,")
    add("which the client retries after 1 s, then 3 s (the multi-second tail a backlog of 5 gave).")
    add("")
    stats = Stats.of(scrapes.latencies)
    add("| median ms | p10 ms | p90 ms | n | p99 ms | max ms | failed | listen overflows |")
    add("|---|---|---|---|---|---|---|---|")
    add(
        f"| {stats_cells(stats)} | {ms(percentile(scrapes.latencies, 99))} | "
        f"{ms(max(scrapes.latencies))} | {scrapes.failures} | {scrapes.listen_overflows} |"
    )
    add("")


def machine() -> dict[str, str]:
    from cryptography.hazmat.backends.openssl.backend import backend

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "CPUs (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU": model,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "OpenSSL": backend.openssl_version_text(),
        "grpcio": grpc.__version__,
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def stats_cells(stats: Stats, scale: Callable[[float], str] = ms) -> str:
    return f"{scale(stats.median)} | {scale(stats.p10)} | {scale(stats.p90)} | {stats.n}"


def render(
    info: dict[str, str],
    latency: LatencyResults,
    fleet: FleetResults,
    elapsed: float,
    node_ca: NodeCAResults | None = None,
    pod_ips: PodIPResults | None = None,
    pcr: PcrResults | None = None,
    scrapes: ScrapeResults | None = None,
    scale: object = None,
) -> str:
    out: list[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add("Generated by `tests/bench_agent.py` (`make bench`); do not edit by hand.")
    add("Every comparison below was measured side by side in one run: the agent and its")
    add("baseline alternate (raw first on even iterations, agent first on odd ones), so machine")
    add("noise and other load hit both alike. Latencies are wall-clock milliseconds; *p10/p90*")
    add("are the 10th and 90th percentiles; *n* counts measured iterations (warm-up excluded).")
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("|---|---|")
    for key, value in info.items():
        add(f"| {key} | {value} |")
    mode_text = (
        "**mount** (root: payloads on a tmpfs, bind-mounted read-only onto each target, real "
        "mount(2) calls)"
        if latency.mode == "mount"
        else "**direct** (not root: files written straight into the target, no mounts)"
    )
    add(f"| agent volume mode | {mode_text} |")
    add(f"| whole run | {elapsed:.0f} s |")
    add("")
    add("Other work may have shared the machine during the run (the load average above); the")
    add("ratios are what to compare across runs, not the absolute times.")
    add("")

    add("## 1. NodePublishVolume against the raw cryptography")
    add("")
    add("*Agent*: one `NodePublishVolume` call from a gRPC client over the agent's UNIX socket")
    add("(agent in the same process, its own gRPC server threads), a new pod each time, local CA")
    add("issuer (the self-signed ECDSA P-256 CA of `--standalone`). It covers attribute parsing,")
    add("key generation, signing (the local CA signs the public key: no CSR), payload files, the")
    add("mount, metadata and the log line. *Raw*: the same key type generated with")
    add("`cryptography`, a CSR signed by it,")
    add(
        "a certificate signed by the same CA key, both encoded to PEM; nothing else. Each volume is"
    )
    add("unpublished right after its publish (timed separately below).")
    add("")
    add("| key | side | median ms | p10 ms | p90 ms | n |")
    add("|---|---|---|---|---|---|")
    for algorithm, paired in latency.publish.items():
        add(f"| {algorithm} | agent publish | {stats_cells(Stats.of(paired.agent))} |")
        add(f"| {algorithm} | raw crypto | {stats_cells(Stats.of(paired.raw))} |")
        add(f"| {algorithm} | agent - raw (paired) | {stats_cells(paired.overhead())} |")
    add("")
    _ratio_table(add, latency.publish)
    add("")
    add("| key | NodeUnpublishVolume median ms | p10 ms | p90 ms | n |")
    add("|---|---|---|---|---|")
    for algorithm, stats in latency.unpublish.items():
        add(f"| {algorithm} | {stats_cells(stats)} |")
    add("")

    add("## 2. One renewal against the raw cryptography")
    add("")
    add("*Agent*: `VolumeManager.renew(volume_id)` called directly on a published volume (what")
    add("the scheduler's worker runs): new key, local signature, new payload generation")
    add("swapped in, mount checked, metadata saved, next renewal scheduled. *Raw*: as above.")
    add("")
    add("| key | side | median ms | p10 ms | p90 ms | n |")
    add("|---|---|---|---|---|---|")
    for algorithm, paired in latency.renew.items():
        add(f"| {algorithm} | agent renew | {stats_cells(Stats.of(paired.agent))} |")
        add(f"| {algorithm} | raw crypto | {stats_cells(Stats.of(paired.raw))} |")
        add(f"| {algorithm} | agent - raw (paired) | {stats_cells(paired.overhead())} |")
    add("")
    _ratio_table(add, latency.renew)
    add("")

    n = fleet.volumes
    _render_idle(add, fleet)
    _render_fill(add, fleet)
    add(f"## 4. Restart recovery with {n} volumes")
    add("")
    add("Time from starting `cert-agent serve --standalone` until it has recovered every volume")
    add("(read its metadata, checked the payload, re-checked the bind mount, scheduled the")
    add("renewal): the agent serves first (its socket answers `GetPluginInfo`, polled every 5 ms)")
    add("and recovers behind it, then logs `volumes recovered` (polled every 2 ms), which reported")
    add(f"`volumes_recovered: {fleet.recovered}`. The same agent with no volumes, restarted")
    add("alternately, measures interpreter start, imports and CA load. Section 11 has the time")
    add("until `Probe` answers, apart from the recovery.")
    add("")
    full, empty = Stats.of(fleet.restart_full), Stats.of(fleet.restart_empty)
    add("| agent | median ms | p10 ms | p90 ms | n |")
    add("|---|---|---|---|---|")
    add(f"| {n} volumes | {stats_cells(full)} |")
    add(f"| no volumes | {stats_cells(empty)} |")
    add(f"| stop (SIGTERM to exit), {n} volumes | {stats_cells(Stats.of(fleet.stop_full))} |")
    add("")
    per_volume = (full.median - empty.median) / n
    add("| ratio | value |")
    add("|---|---|")
    add(f"| restart with {n} volumes / with none (medians) | {full.median / empty.median:.2f} |")
    add(
        f"| recovery cost per volume ((median {n} - median 0) / {n}) | {per_volume * 1000:.2f} ms |"
    )
    if IS_ROOT:
        add(
            f"| bind mounts in place after the last restart | {fleet.mounts_after_restart} of {n} |"
        )
    read = fleet.mountinfo_read
    add(
        f"| one `read_mountinfo()` with {fleet.mountinfo_entries} mount entries (median, "
        f"p10-p90, n={read.n}) | {ms(read.median)} ms ({ms(read.p10)}-{ms(read.p90)}) |"
    )
    add("")

    render_node_ca(add, node_ca)
    if pod_ips is not None:
        render_pod_ips(add, pod_ips, percentile)
    if pcr is not None:
        render_pcr(add, pcr, percentile)
    if scrapes is not None:
        _render_scrapes(add, scrapes)

    if scale is not None:
        from tests import bench_scale_report

        bench_scale_report.render(add, scale, latency.publish["ECDSA P-256"])  # type: ignore[arg-type]

    add("## Interpretation")
    add("")
    add(_interpretation(latency, fleet))
    add("")
    add("## How to rerun")
    add("")
    add("```")
    add("make bench        # docs/benchmarks.md, docs/scale.md, docs/img/*.png (under 10 minutes)")
    add("make bench-quick  # the same with small n, into /tmp/bench (under 2 minutes)")
    add("```")
    add("")
    add("Run it as root to measure the mount mode (real bind mounts); otherwise the agent writes")
    add("files straight into the target and the document says so.")
    add("")
    image_doc = Path("docs/image.md")
    add("The container image (its size beside the base image's, what is in it, its start-up to a")
    add("serving socket) is measured with docker, outside `make bench`:")
    add(f"[{image_doc}]({image_doc.name}).")
    return "\n".join(out) + "\n"


def _render_idle(add: Callable[[str], None], fleet: FleetResults) -> None:
    n, window = fleet.volumes, fleet.idle_seconds
    add(f"## 3. Idle cost with {n} volumes")
    add("")
    add(f"Three processes idled over the same {window} s window (after 3 s to settle):")
    add(f"`cert-agent serve --standalone` holding {n} published ECDSA volumes (90-day")
    add("certificates, so no renewal falls due), the same agent holding none, and a Python")
    add(f"process simulating the per-volume design: {n} threads each waking every second for a")
    add("trivial due check (started over one second, as volumes would be). *CPU (stat)* is")
    add(f"utime + stime from `/proc/PID/stat` (resolution {1000 // CLK_TCK} ms); *on-CPU* is the")
    add("nanosecond run time summed over threads from `/proc/PID/task/*/schedstat`; *wakeups*")
    add("are voluntary + involuntary context switches summed over threads; RSS is `VmRSS` at the")
    add("end. Per-second columns: median (p10-p90) over the 1 s slices of the window.")
    add("")
    add(
        f"| process | volumes | CPU (stat) s in {window} s | on-CPU ms in {window} s "
        "| on-CPU ms/s | wakeups/s | RSS MiB | threads |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for sample in fleet.idle:
        cpu = Stats.of(sample.oncpu_per_second)
        wake = Stats.of(sample.switches_per_second)
        add(
            f"| {sample.label} | {sample.volumes} | {sample.cpu_total:.2f} "
            f"| {sample.oncpu_total * 1000:.1f} "
            f"| {cpu.median * 1000:.2f} ({cpu.p10 * 1000:.2f}-{cpu.p90 * 1000:.2f}) "
            f"| {wake.median:.0f} ({wake.p10:.0f}-{wake.p90:.0f}) "
            f"| {sample.rss_kib / 1024:.1f} | {sample.threads} |"
        )
    add("")
    full, empty, ticker = fleet.idle
    add("| ratio (same window) | value |")
    add("|---|---|")
    add(f"| ticker on-CPU / agent on-CPU ({n} volumes each) | {_ratio(ticker, full, 'cpu')} |")
    add(f"| ticker wakeups / agent wakeups ({n} volumes each) | {_ratio(ticker, full, 'wake')} |")
    add(f"| agent on-CPU, {n} volumes / no volumes | {_ratio(full, empty, 'cpu')} |")
    add(f"| agent wakeups, {n} volumes / no volumes | {_ratio(full, empty, 'wake')} |")
    per_volume = (full.oncpu_total - empty.oncpu_total) / n / window * 1e6
    noise = " (below zero: within noise)" if per_volume < 0 else ""
    add(f"| agent idle on-CPU per volume ((N - 0) / N) | {per_volume:.2f} µs per second{noise} |")
    per_volume_kib = (full.rss_kib - empty.rss_kib) / n
    add(f"| agent RSS per volume ((RSS with {n} - RSS with 0) / {n}) | {per_volume_kib:.1f} KiB |")
    add("")


def _ratio(numerator: IdleSample, denominator: IdleSample, what: str) -> str:
    if what == "cpu":
        top, bottom = numerator.oncpu_total, denominator.oncpu_total
    else:
        top, bottom = sum(numerator.switches_per_second), sum(denominator.switches_per_second)
    return "n/a (denominator 0)" if bottom <= 0 else f"{top / bottom:.2f}"


def _render_fill(add: Callable[[str], None], fleet: FleetResults) -> None:
    """Publish latency while the agent fills up: every publish reads the whole mount table."""
    fill = fleet.fill_latency
    slices = 4
    size = max(1, len(fill) // slices)
    add(f"Publishing the {fleet.volumes} ECDSA volumes one after another into that agent (a")
    add("separate process, real gRPC), by position in the sequence:")
    add("")
    add("| volumes already published | median ms | p10 ms | p90 ms | n |")
    add("|---|---|---|---|---|")
    for i in range(slices):
        chunk = fill[i * size : (i + 1) * size] if i < slices - 1 else fill[i * size :]
        if chunk:
            last = i * size + len(chunk) - 1
            add(f"| {i * size}-{last} | {stats_cells(Stats.of(chunk))} |")
    add("")


def _ratio_table(add: Callable[[str], None], results: dict[str, Paired]) -> None:
    add("| key | ratio agent / raw (medians) | paired ratio median (p10-p90) | n |")
    add("|---|---|---|---|")
    for algorithm, paired in results.items():
        ratios = paired.paired_ratios()
        add(
            f"| {algorithm} | {paired.ratio_of_medians():.2f} | "
            f"{ratios.median:.2f} ({ratios.p10:.2f}-{ratios.p90:.2f}) | {ratios.n} |"
        )


def _interpretation(latency: LatencyResults, fleet: FleetResults) -> str:
    lines: list[str] = []
    for algorithm in ALGORITHMS:
        publish = latency.publish[algorithm]
        renew = latency.renew[algorithm]
        lines.append(
            f"- {algorithm}: a publish costs {publish.ratio_of_medians():.1f}x the raw "
            f"cryptography (+{ms(publish.overhead().median)} ms median), a renewal "
            f"{renew.ratio_of_medians():.1f}x (+{ms(renew.overhead().median)} ms)."
        )
    rsa = Stats.of(latency.publish["RSA 2048"].raw)
    lines.append(
        "  The agent's own work (gRPC, attribute parsing, payload files, mounts, "
        "metadata, log line) costs about the same whatever the key, so with ECDSA, whose "
        "crypto is cheap, that overhead is most of the time, and with RSA, whose key "
        "generation dominates, the agent stays close to the crypto floor. RSA key generation "
        f"is heavy-tailed (a random prime search: raw p10 {ms(rsa.p10)} ms, p90 "
        f"{ms(rsa.p90)} ms), so the RSA ratios carry a wide spread and the paired "
        "differences straddle zero; the ECDSA rows show the agent's overhead precisely."
    )
    agent_full, agent_empty, ticker = fleet.idle
    n, window = fleet.volumes, fleet.idle_seconds
    holds = agent_full.oncpu_total <= 1.5 * agent_empty.oncpu_total + 0.002
    lines.append(
        f"- Idle: over {window} s the agent holding {n} volumes was on a CPU for "
        f"{agent_full.oncpu_total * 1000:.1f} ms, the same agent holding none "
        f"{agent_empty.oncpu_total * 1000:.1f} ms, the per-volume ticker design "
        f"{ticker.oncpu_total * 1000:.1f} ms. The claim that idle volumes cost nothing "
        + (
            "holds: what the agent spends idle does not grow with its volumes (one scheduler "
            "thread sleeping on a heap until the earliest due time, no per-volume timers). "
            "Its idle wakeups come from the gRPC server's own threads, present with no "
            "volumes too (the metrics and status servers sleep until a client connects); "
            "the ticker's wakeups grow by one per volume per second."
            if holds
            else "does not hold in this run: the agent with volumes spent clearly more idle "
            "CPU than the one without (see the table); investigate before repeating it."
        )
    )
    full, empty = Stats.of(fleet.restart_full), Stats.of(fleet.restart_empty)
    per_volume = (full.median - empty.median) / n
    read = fleet.mountinfo_read.median
    lines.append(
        f"- Restart: {n} volumes are back {ms(full.median)} ms after start "
        f"({ms(empty.median)} ms with none), about {ms(per_volume)} ms per volume. "
        f"One parse of the mount table with {fleet.mountinfo_entries} entries costs "
        f"{ms(read)} ms here; the agent avoids it on the hot paths (a bind is checked with "
        "one stat of target and payload, and a freshly created target needs no look at the "
        "table), so recovery is linear in the number of volumes: compare the per-volume cost "
        "with the parse cost, and the publish latency by position in section 3."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="cert-agent-bench-"))
    try:
        yield tmp
    finally:
        unmount_below(tmp)
        if mounts_below(tmp) == 0 or not IS_ROOT:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"warning: mounts left below {tmp}; not removing it", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, help="write the Markdown report here")
    parser.add_argument("--quick", action="store_true", help="small n, for a smoke run")
    parser.add_argument("--volumes", type=int, default=None, help="volumes for idle and restart")
    parser.add_argument("--idle-seconds", type=int, default=10)
    parser.add_argument(
        "--scale-output", type=Path, help="write the cluster model (docs/scale.md) here"
    )
    parser.add_argument(
        "--skip-scale", action="store_true", help="leave out issue 12's sections (7-14)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if IS_ROOT:
        # As the test suite: the agents measured here mount in a namespace of their own, so
        # nothing they do reaches the machine's mounts (before any thread exists).
        enter_private_mount_namespace()
    if args.quick:
        iterations, warmup, volumes, restarts = {"ECDSA P-256": 30, "RSA 2048": 10}, 3, 50, 2
    else:
        iterations, warmup, volumes, restarts = {"ECDSA P-256": 300, "RSA 2048": 200}, 5, 500, 5
    volumes = args.volumes or volumes
    from tests.bench_scale import compile_agent

    compile_agent()  # the agent processes started below import .pyc files, as in the image
    info = machine()
    started = time.perf_counter()
    # SIGTERM (e.g. from make being interrupted) must still run the cleanup in finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with scratch_dir() as tmp:
        log_file = open(tmp / "in-process-agent.log", "w")  # noqa: SIM115 - closed below
        try:
            # The in-process agent logs as the real one does (JSON lines), to a file.
            configure_logging("info", "json", stream=log_file)
            print("1-2. publish, unpublish and renew latency", flush=True)
            (tmp / "latency").mkdir()
            latency = bench_latency(tmp / "latency", iterations, warmup)
        finally:
            configure_logging("warning", "json")  # off the file before closing it
            log_file.close()
        print(f"3-4. idle cost and restart with {volumes} volumes", flush=True)
        (tmp / "fleet").mkdir()
        fleet = bench_fleet(tmp / "fleet", volumes, args.idle_seconds, restarts)
        node_ca = None
        if IS_ROOT:
            print("5. node CA mode: API calls", flush=True)
            (tmp / "node-ca").mkdir()
            node_ca = bench_node_ca(tmp / "node-ca", 20 if args.quick else 100)
            print(
                f"  {node_ca.api_calls_for_publishes} API calls for {node_ca.pods} pods, "
                f"{node_ca.node_ca_requests_start} CertificateRequest at start, "
                f"{node_ca.node_ca_requests_after} after one renewal",
                flush=True,
            )
        print("6. pod IP SANs: watch event to certificate", flush=True)
        (tmp / "pod-ips").mkdir()
        sequential, burst = (20, 10) if args.quick else (200, 50)
        pod_ips = bench_pod_ips(tmp / "pod-ips", sequential, burst)
        print("7. PodCertificateRequests: watch event to status written", flush=True)
        (tmp / "pcr").mkdir()
        pcr = bench_pcr(tmp / "pcr", *((20, 10) if args.quick else (200, 50)))
        scale = None
        if IS_ROOT and not args.skip_scale:
            from tests import bench_scale_report

            (tmp / "scale-report").mkdir()
            scale = bench_scale_report.run(tmp / "scale-report", args.quick)
            bench_scale_report.save(scale, latency, Path("/tmp/cert-agent-bench-last.pickle"))
    print(f"8. /metrics under 50 concurrent scrapers, {volumes} volumes", flush=True)
    scrapes = bench_scrapes(volumes, clients=50, requests=200 if args.quick else 1000)
    elapsed = time.perf_counter() - started
    report = render(info, latency, fleet, elapsed, node_ca, pod_ips, pcr, scrapes, scale)
    if scale is not None:
        from tests import bench_scale_report

        docs = (args.output or Path("docs/benchmarks.md")).parent
        for path in bench_scale_report.plots(docs, scale, latency.publish["ECDSA P-256"]):
            print(f"wrote {path}")
        if args.scale_output:
            args.scale_output.write_text(bench_scale_report.scale_document(scale, None))
            print(f"wrote {args.scale_output}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        print(f"wrote {args.output}")
    else:
        print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
