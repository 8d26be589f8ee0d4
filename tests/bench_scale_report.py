"""Issue 12's sections of `make bench`: profile, scale, restart, idle, bursts, storm, API cost,
the cluster model (docs/scale.md) and the plots (docs/img/*.png)."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.bench_api import ModeCost, bench_cert_manager_mode, bench_secret_ca_mode, render_api_cost
from tests.bench_load import BurstResults, StormResults, bench_burst, bench_storm
from tests.bench_profile import ProfileResults, bench_profile, python_ms, render_profile
from tests.bench_scale import RestartSample, ScaleResults, bench_scale
from tests.cluster_model import (
    Cluster,
    DesignLoad,
    SimulationResult,
    check_within,
    costs_from,
    expected_requests,
    model,
    simulate,
)

IMG = "img"  # docs/img/, linked from docs/benchmarks.md
SCALE_DOC = Path("docs/scale.md")


@dataclass
class Settings:
    checkpoints: list[int]
    samples: int
    restarts: int
    idle_seconds: int
    profile_publishes: int
    api_pods: int
    burst_rounds: int
    storm_volumes: int
    storm_publishes: int
    sim_agents: int
    sim_pods: int

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls([0, 200, 500], 30, 2, 3, 50, 5, 1, 300, 50, 20, 1)
        return cls([0, 500, 2000, 5000], 100, 4, 10, 300, 20, 2, 5000, 200, 40, 2)


@dataclass
class Simulation:
    mode: str
    single: SimulationResult
    many: SimulationResult
    expected: dict[str, float]
    problems: list[str]


@dataclass
class ScaleReport:
    settings: Settings
    profile: ProfileResults
    scale: ScaleResults
    api: list[ModeCost]
    burst: BurstResults
    storm: StormResults
    simulations: list[Simulation]
    seconds: dict[str, float]


def _stage(name: str, seconds: dict[str, float], action: Callable[[], object]) -> object:
    print(name, flush=True)
    started = time.perf_counter()
    try:
        return action()
    finally:
        seconds[name] = time.perf_counter() - started


def measure_idle(subjects: list[tuple[str, int, int]], seconds: int) -> list[object]:
    from tests.bench_agent import (
        IdleSample,
        context_switches,
        cpu_seconds,
        oncpu_seconds,
        status_field,
    )

    time.sleep(3.0)  # settle
    cpu = {pid: cpu_seconds(pid) for _, _, pid in subjects}
    oncpu = {pid: [oncpu_seconds(pid)] for _, _, pid in subjects}
    switches = {pid: [context_switches(pid)] for _, _, pid in subjects}
    started = time.perf_counter()
    for second in range(1, seconds + 1):
        time.sleep(max(0.0, started + second - time.perf_counter()))
        for _, _, pid in subjects:
            oncpu[pid].append(oncpu_seconds(pid))
            switches[pid].append(context_switches(pid))
    return [
        IdleSample(
            label=label,
            volumes=volumes,
            cpu_total=cpu_seconds(pid) - cpu[pid],
            oncpu_per_second=[b - a for a, b in itertools.pairwise(oncpu[pid])],
            switches_per_second=[float(b - a) for a, b in itertools.pairwise(switches[pid])],
            oncpu_total=oncpu[pid][-1] - oncpu[pid][0],
            rss_kib=status_field(pid, "VmRSS"),
            threads=status_field(pid, "Threads"),
        )
        for label, volumes, pid in subjects
    ]


def run(tmp: Path, quick: bool) -> ScaleReport:
    s = Settings.for_run(quick)
    seconds: dict[str, float] = {}
    for name in ("profile", "scale", "api-cm", "api-secret", "burst", "storm"):
        (tmp / name).mkdir()
    profile = _stage(
        "9. profile of an ECDSA publish",
        seconds,
        lambda: bench_profile(tmp / "profile", s.profile_publishes),
    )
    scale = _stage(
        f"10-12. scale to {s.checkpoints[-1]} volumes, restart, idle",
        seconds,
        lambda: bench_scale(
            tmp / "scale", s.checkpoints, s.samples, s.restarts, s.idle_seconds, measure_idle
        ),
    )
    burst = _stage(
        "13. bursts of 110 publishes",
        seconds,
        lambda: bench_burst(tmp / "burst", 110, s.burst_rounds),
    )
    storm = _stage(
        f"14. renewal storm of {s.storm_volumes} volumes",
        seconds,
        lambda: bench_storm(tmp / "storm", s.storm_volumes, s.storm_publishes, print),
    )
    api = [
        _stage(
            "15. API cost: cert-manager mode",
            seconds,
            lambda: bench_cert_manager_mode(tmp / "api-cm", s.api_pods),
        ),
        _stage(
            "15. API cost: Secret CA mode",
            seconds,
            lambda: bench_secret_ca_mode(tmp / "api-secret", s.api_pods),
        ),
    ]
    simulations = []
    for mode in ("cert-manager", "node-ca"):
        base = tmp / f"sim-{mode}"
        (base / "one").mkdir(parents=True)
        (base / "many").mkdir()

        def one_mode(mode: str = mode, base: Path = base) -> Simulation:
            single = simulate(base / "one", mode, 1, s.sim_pods)
            many = simulate(base / "many", mode, s.sim_agents, s.sim_pods)
            pods = s.sim_agents * s.sim_pods
            renewals = pods if mode == "cert-manager" else s.sim_agents
            expected = expected_requests(costs_from(single), s.sim_agents, pods, renewals)
            return Simulation(mode, single, many, expected, check_within(expected, many.counted))

        simulations.append(
            _stage(f"16. simulation: {s.sim_agents} agents, {mode}", seconds, one_mode)
        )
    return ScaleReport(
        s,
        profile,  # type: ignore[arg-type]
        scale,  # type: ignore[arg-type]
        api,  # type: ignore[arg-type]
        burst,  # type: ignore[arg-type]
        storm,  # type: ignore[arg-type]
        simulations,  # type: ignore[arg-type]
        seconds,
    )


def save(report: ScaleReport, latency: object, path: Path) -> None:
    """Keep the raw results (to re-render the documents without measuring again)."""
    import pickle

    with open(path, "wb") as f:
        pickle.dump((report, latency), f)


# ---------------------------------------------------------------------------------- report


def _pct(values: Sequence[float], q: float) -> float:
    from tests.bench_agent import percentile

    return percentile(values, q)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _row(values: Sequence[float]) -> str:
    return (
        f"{_ms(_pct(values, 50))} | {_ms(_pct(values, 10))} | {_ms(_pct(values, 90))} | "
        f"{_ms(_pct(values, 99))} | {len(values)}"
    )


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: reported only


def targets(report: ScaleReport, publish_paired: object) -> list[Target]:
    # Duck-typed: under `python -m tests.bench_agent` its classes live in __main__.
    agent = _pct(publish_paired.agent, 50)  # type: ignore[attr-defined]
    ratio = publish_paired.ratio_of_medians()  # type: ignore[attr-defined]
    points = report.scale.checkpoints
    first, last = points[0], points[-1]
    pub0, pubn = _pct(first.publish, 50), _pct(last.publish, 50)
    unpubn = _pct(last.unpublish, 50)
    probes = [r.probe for r in report.scale.restarts]
    rebound = [r.recovered for r in report.scale.restarts if r.binds_removed]
    recovered = [r.recovered for r in report.scale.restarts]
    idle = report.scale.idle
    burst_ratio = _pct(report.burst.parallel, 50) / _pct(report.burst.sequential, 50)
    storm_ratio = _pct(report.storm.storm, 99) / _pct(report.storm.idle, 99)
    out = [
        Target("1. publish median", "<= 1.2 ms", f"{agent * 1000:.2f} ms", agent <= 0.0012),
        Target("1. publish / raw crypto", "<= 5x", f"{ratio:.2f}x", ratio <= 5),
        Target(
            f"2. publish median at {last.volumes} / at 0 volumes",
            "<= 1.2x",
            f"{pubn / pub0:.2f}x ({_ms(pubn)} / {_ms(pub0)} ms)",
            pubn / pub0 <= 1.2,
        ),
        Target(
            f"2. unpublish median at {last.volumes} <= publish median",
            "unpublish <= publish",
            f"{_ms(unpubn)} vs {_ms(pubn)} ms",
            unpubn <= pubn,
        ),
        Target(
            f"3. Probe answers after a start with {last.volumes} volumes",
            "<= 300 ms",
            f"{max(probes) * 1000:.0f} ms (worst of {len(probes)})",
            max(probes) <= 0.3,
        ),
        Target(
            f"3. every volume verified and re-bound ({last.volumes})",
            "<= 2 s",
            f"{max(rebound or recovered):.2f} s (worst; binds removed)",
            max(rebound or recovered) <= 2.0,
        ),
    ]
    if len(idle) == 2:
        full, empty = idle
        out.append(
            Target(
                f"4. idle on-CPU with {last.volumes} volumes vs none",
                "within noise",
                f"{full.oncpu_total * 1000:.1f} vs {empty.oncpu_total * 1000:.1f} ms "  # type: ignore[attr-defined]
                f"in {report.scale.idle_seconds} s",
                full.oncpu_total <= empty.oncpu_total * 1.5 + 0.005,  # type: ignore[attr-defined]
            )
        )
        rss = full.rss_kib / 1024  # type: ignore[attr-defined]
        out.append(
            Target(
                f"4. RSS with {last.volumes} volumes", "<= 120 MB", f"{rss:.1f} MiB", rss <= 114.4
            )
        )
    out.append(
        Target(
            "5. 110 RSA-2048 at once / one after another (wall)",
            "<= 0.6x",
            f"{burst_ratio:.2f}x",
            burst_ratio <= 0.6,
        )
    )
    out.append(
        Target(
            f"6. publish p99 during a storm of {report.storm.volumes} / idle p99",
            "<= 3x",
            f"{storm_ratio:.2f}x",
            storm_ratio <= 3,
        )
    )
    return out


def render(add: Callable[[str], None], report: ScaleReport, publish_paired: object) -> None:
    s = report.settings
    add("## Targets of issue 12 at a glance")
    add("")
    add("| target | goal | measured | met |")
    add("|---|---|---|---|")
    for t in targets(report, publish_paired):
        met = "yes" if t.met else ("no" if t.met is not None else "-")
        add(f"| {t.name} | {t.goal} | {t.measured} | {met} |")
    add("")
    _render_bounds(add, report, publish_paired)
    add("## 9. Where a publish spends its time")
    add("")
    render_profile(add, report.profile)
    _render_scale(add, report)
    _render_restart(add, report)
    _render_idle(add, report)
    _render_burst(add, report)
    _render_storm(add, report)
    render_api_cost(add, report.api)
    # The link is relative to docs/, where both documents are written.
    add(f"The cluster-wide consequences of these counts are in [{SCALE_DOC}]({SCALE_DOC.name}).")
    add("")
    add(
        "Stage times of these sections (s): "
        + ", ".join(f"{name.split('.')[0]} {sec:.0f}" for name, sec in report.seconds.items())
        + f"; settings: checkpoints {s.checkpoints}, {s.samples} samples each."
    )
    add("")


def _render_bounds(add: Callable[[str], None], report: ScaleReport, publish_paired: object) -> None:
    """What bounds each target, from this run's measurements."""
    prof = report.profile
    raw = _pct(publish_paired.raw, 50) * 1000  # type: ignore[attr-defined]
    agent = _pct(publish_paired.agent, 50) * 1000  # type: ignore[attr-defined]
    n = report.scale.checkpoints[-1].volumes
    restarts = report.scale.restarts
    worst = max(r.recovered for r in restarts) if restarts else 0.0
    probe = max(r.probe for r in restarts) if restarts else 0.0
    add("What bounds them, from this run:")
    add("")
    _render_publish_bound(add, prof, raw, agent)
    add(_restart_bound(restarts, n, probe, worst))
    b = report.burst
    cores = _pct(b.parallel_cpu, 50) / _pct(b.parallel, 50)
    ratio = _pct(b.parallel, 50) / _pct(b.sequential, 50)
    burst = (
        f"- Burst: during the {b.pods} RSA-2048 publishes at once the agent used "
        f"{cores:.2f} cores (CPU time over wall time), and all of them took {ratio:.2f}x the "
        "time of the same publishes one after another. Key generation runs in the gRPC "
        "threads, at most `--keygen-workers` (2) at a time; the cores measured show two "
        "generations running side by side, outside the interpreter lock"
    )
    if ratio <= 0.6:
        burst += "; the 0.6x target is met with threads, so there is no process pool."
    else:
        burst += (
            "; the 0.6x target is not met in this run: what it would take is a process pool "
            "for RSA key generation (the key coming back over a pipe to the agent itself), so "
            "that two generations never share the interpreter lock."
        )
    add(burst)
    add(_probe_bound(restarts, probe))
    add(
        "- Removed for the local CA, kept for cert-manager: the CSR (the local CA signs the "
        "public key of a key that never left the process; the certificate is the same, "
        "extension for extension: tests/test_local_issuer.py), the `issuing` record and the "
        "pending key (they let a retry pick up a slow issuer's pending request; a local "
        "first issue writes its metadata once, complete, after the payload and before the "
        "bind, so a kill leaves no bind without a record, and a payload without one is "
        "removed on start or on kubelet's unpublish: tests/test_unrecorded_volumes.py, the "
        "crash trials). Kept on purpose: the fsync of each payload file and directory "
        "(cheap on the tmpfs that holds them, and what makes the same code safe on a "
        "disk-backed data root) and the atomic `..data` swap of a rewrite "
        "(tests/test_store.py); a first payload, in a directory nobody has seen, makes its "
        "links in place."
    )
    add("")


def _render_publish_bound(
    add: Callable[[str], None], prof: ProfileResults, raw: float, agent: float
) -> None:
    """Where an ECDSA publish's time goes: gRPC floor, crypto, syscalls, the agent's Python."""
    f, g, rest = prof.floors, prof.grpc, python_ms(prof)
    if f is None or g is None or rest is None:
        return
    aio_note = (
        ": no faster, so the agent keeps its sync server"
        if g.aio_ms >= g.sync_ms
        else "; volume operations would still need a thread of their own there, to keep "
        "Probe answered while a publish waits for cert-manager"
    )
    add(
        f"- Publish ({agent:.2f} ms in section 1, {prof.client_ms:.2f} ms in section 9): an "
        f"empty gRPC call between two Python processes costs {g.sync_ms:.2f} ms against the "
        f"sync thread-pool server the agent runs ({g.aio_ms:.2f} ms against a `grpc.aio` "
        f"server answering inline{aio_note}), of which {g.client_cpu_ms:.2f} ms is CPU in "
        "the Python client and "
        f"{g.server_cpu_ms:.2f} ms in the server; kubelet's Go client spends far less than "
        "the Python one, so for a real kubelet the floor is lower than measured here. The "
        f"CSI servicer's method takes {prof.servicer_ms:.2f} ms, of which "
        f"{prof.servicer_ms - prof.handler_ms:.2f} ms around the handler (the admission "
        "slot, the field checks of the request, the per-call metrics, the error mapping): "
        "the CSI layer is not where the time goes. Inside "
        f"the handler ({prof.handler_ms:.2f} ms): the crypto {f.crypto_ms:.2f} ms (key and "
        f"certificate, no CSR; the raw baseline of section 1, with a CSR, {raw:.2f} ms), the "
        f"file writes {f.files_ms:.2f} ms and the bind {f.bind_ms:.2f} ms when done with "
        f"bare calls, and the remaining {rest:.2f} ms the agent's own Python (attribute "
        "parsing and templating, the path policy and its openat2 walk, the issuance policy, "
        "the checks around each file and mount, metadata JSON, metrics, the log line; the "
        "profile in section 9 lists them). The gRPC floor and the crypto alone come to "
        f"{g.sync_ms + f.crypto_ms:.2f} ms, which leaves "
        f"{max(0.0, 1.2 - g.sync_ms - f.crypto_ms):.2f} ms of the 1.2 ms target for the "
        "syscalls and all of the agent's Python: the rest of the way is interpreter time "
        "spread over many small steps, which a compiled agent would not spend."
    )


def _restart_bound(restarts: Sequence[RestartSample], n: int, probe: float, worst: float) -> str:
    per_volume = [(r.recovered - r.probe) / max(r.recovered_count, 1) * 1e6 for r in restarts] or [
        0.0
    ]
    return (
        f"- Restart, recovery: all {n} volumes were recovered within {worst:.2f} s of exec "
        f"(worst), {min(per_volume):.0f}-{max(per_volume):.0f} µs per volume after the socket "
        "serves, in one background thread: the metadata read and checked, the target's path "
        "checked and walked once (descriptors, no symlink followed), one stat per payload file, "
        "the bind check through the mount ids of two descriptors (and the bind itself when it "
        "was lost), the metrics entry and the schedule. The attributes are not parsed again: "
        "the commit stores what recovery needs (`recovery_hint`; older metadata is parsed). A "
        "second recovery thread was measured slower (the interpreter lock; binds serialize in "
        "the kernel anyway), so there is one; what remains is interpreter time per volume."
    )


def _probe_bound(restarts: Sequence[RestartSample], probe: float) -> str:
    steps = {name: median for name, median, _low, _high in _startup_steps(restarts)}
    during, after = _probe_latencies(restarts)
    if not steps:
        return f"- Restart, Probe: answered within {probe * 1000:.0f} ms (worst)."
    imports = sum(v for k, v in steps.items() if "imports" in k)
    before = steps.get("exec, interpreter start", 0.0)
    total = steps.get("total", 0.0)
    rest = total - imports
    latency = (
        f"; while the recovery runs a Probe takes {_ms(_pct(during, 50))} ms (median, "
        f"{_ms(_pct(during, 90))} p90) against {_ms(_pct(after, 50))} ms after it"
        if during and after
        else ""
    )
    return (
        f"- Restart, Probe: answered within {probe * 1000:.0f} ms of exec (worst), whatever the "
        f"number of volumes: the socket serves before any volume is recovered. Of the median "
        f"start, {before:.0f} ms is exec and interpreter start, {imports:.0f} ms importing "
        f"modules (grpc with asyncio and ssl, protobuf and the CSI bindings, cryptography, "
        f"prometheus_client, the agent's own) and {rest:.0f} ms everything else until "
        f"the socket serves (configuration from a --config file as deployed, with the YAML "
        f"parser's import, the metrics port, the data root's tmpfs found from "
        f"two descriptors, the CA, the manager, the gRPC server; table in section 11){latency}. "
        f"The imports run with the cyclic garbage collector paused (it resumes once they are "
        f"in, their objects frozen: collecting over them as they piled up took ~8% of a start), "
        f"and a standalone start imports no other mode's modules. What is left is Python's "
        f"import time, about a third of it grpc's (asyncio, ssl and grpc.aio come with it), "
        f"a quarter the agent's own modules, where building ~30 dataclasses is ~40% of it "
        f"(Python 3.11 compiles each generated method on its own): the next steps would be "
        f"importing the publish path after the socket serves, or a smaller runtime than grpcio."
    )


def _render_scale(add: Callable[[str], None], report: ScaleReport) -> None:
    scale = report.scale
    add("## 10. Publish and unpublish as volumes pile up")
    add("")
    add("`cert-agent serve` as its own process; this bench is the kubelet-like client (real gRPC")
    add("over the UNIX socket). The agent is filled to each checkpoint by 4 client threads, then")
    add(f"{report.settings.samples} new pods are published one after another and unpublished one")
    add(
        "after another, timed one call at a time. "
        + (
            "The bench tree is a shared mount with a peer (as kubelet's directory is, host and "
            "agent container, under Bidirectional propagation), so every mount propagates once."
            if scale.shared_propagation
            else "No mount propagation (not root)."
        )
    )
    add(f"Filling took {scale.fill_seconds:.1f} s in all.")
    add("")
    add(
        "| volumes already published | publish median ms | p10 | p90 | p99 | n "
        "| unpublish median ms | p10 | p90 | p99 | n | agent CPU per publish ms |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for point in scale.checkpoints:
        add(
            f"| {point.volumes} | {_row(point.publish)} | {_row(point.unpublish)} | "
            f"{point.publish_cpu / len(point.publish) * 1000:.2f} |"
        )
    add("")
    first = scale.checkpoints[0]
    add("| ratio | publish | unpublish |")
    add("|---|---|---|")
    for point in scale.checkpoints[1:]:
        add(
            f"| median at {point.volumes} / at {first.volumes} | "
            f"{_pct(point.publish, 50) / _pct(first.publish, 50):.2f} | "
            f"{_pct(point.unpublish, 50) / _pct(first.unpublish, 50):.2f} |"
        )
    add("")
    add(f"![publish latency against the number of volumes]({IMG}/publish-vs-volumes.png)")
    add("")


def _startup_steps(restarts: Sequence[RestartSample]) -> list[tuple[str, float, float, float]]:
    """(step, median, min, max) in ms over the restarts, in the order the agent logged them."""
    timed = [r.times.steps for r in restarts if r.times is not None and r.times.steps]
    names = list(dict.fromkeys(name for steps in timed for name in steps))
    rows = []
    for name in names:
        values = [steps.get(name, 0.0) for steps in timed]
        rows.append((name, statistics.median(values), min(values), max(values)))
    return rows


def _probe_latencies(restarts: Sequence[RestartSample]) -> tuple[list[float], list[float]]:
    during = [x for r in restarts if r.times is not None for x in r.times.probe_recovering]
    after = [x for r in restarts if r.times is not None for x in r.times.probe_after]
    return during, after


def _render_restart(add: Callable[[str], None], report: ScaleReport) -> None:
    scale = report.scale
    n = scale.checkpoints[-1].volumes
    add(f"## 11. Restart with {n} volumes")
    add("")
    add("Times from exec of `cert-agent serve` (SIGTERM to the previous one first): until `Probe`")
    add("answers ready over the socket (polled every 2 ms), and until the agent logs that every")
    add("volume is recovered (metadata read, payload checked, bind verified or re-bound, renewal")
    add("scheduled). *Binds removed*: every target was unmounted while the agent was down (1 s")
    add("before its start), so all of them are re-bound. The agent's modules were byte-compiled")
    add("first, as the image does (with `PYTHONDONTWRITEBYTECODE` set, each start would otherwise")
    add("compile them anew); it reads its settings from a `--config` file, as the DaemonSet does.")
    add("")
    add(
        "| start | Probe ready ms | all recovered ms | µs per volume | volumes recovered "
        "| binds after |"
    )
    add("|---|---|---|---|---|---|")
    for r in scale.restarts:
        kind = "binds removed" if r.binds_removed else "binds in place"
        per_volume = (r.recovered - r.probe) / max(r.recovered_count, 1) * 1e6
        add(
            f"| {kind} | {r.probe * 1000:.0f} | {r.recovered * 1000:.0f} | {per_volume:.0f} | "
            f"{r.recovered_count} | {r.mounts_after} |"
        )
    add("")
    add("*µs per volume*: (all recovered - Probe ready) / volumes; recovery starts once the socket")
    add("serves.")
    add("")
    steps = _startup_steps(scale.restarts)
    if steps:
        add("Where the time until the socket serves goes: the agent logs its own start-up steps")
        add("with `agent serving` (`startup_ms`, from the first import of the `agent` package);")
        add("*exec, interpreter start* is the rest, from this bench's exec to that first import.")
        add("")
        add("| step | median ms | min | max |")
        add("|---|---|---|---|")
        for name, median, low, high in steps:
            add(f"| {name} | {median:.1f} | {low:.1f} | {high:.1f} |")
        add("")
    during, after = _probe_latencies(scale.restarts)
    if during and after:
        add("`Probe` latency while the recovery thread runs (one Probe every 5 ms) and after it:")
        add("")
        add("| Probe | median ms | p10 | p90 | p99 | n |")
        add("|---|---|---|---|---|---|")
        add(f"| while recovering | {_row(during)} |")
        add(f"| after recovery | {_row(after)} |")
        add("")


def _render_idle(add: Callable[[str], None], report: ScaleReport) -> None:
    scale = report.scale
    if len(scale.idle) != 2:
        return
    add(f"## 12. Idle and memory with {scale.checkpoints[-1].volumes} volumes")
    add("")
    add(
        f"The agent above (holding its volumes) and an agent holding none, over the same "
        f"{scale.idle_seconds} s window after 3 s to settle (columns as in section 3)."
    )
    add("")
    add("| process | volumes | on-CPU ms in window | wakeups/s (median) | RSS MiB | threads |")
    add("|---|---|---|---|---|---|")
    for sample in scale.idle:
        wake = sorted(sample.switches_per_second)  # type: ignore[attr-defined]
        add(
            f"| {sample.label} | {sample.volumes} | {sample.oncpu_total * 1000:.1f} | "  # type: ignore[attr-defined]
            f"{wake[len(wake) // 2]:.0f} | {sample.rss_kib / 1024:.1f} | {sample.threads} |"
        )  # type: ignore[attr-defined]
    add("")


def _render_burst(add: Callable[[str], None], report: ScaleReport) -> None:
    b = report.burst
    add(f"## 13. Bursts of {b.pods} publishes")
    add("")
    add(
        f"{b.pods} RSA-2048 publishes released together (one client thread each, a barrier) "
        f"against the same {b.pods} one after another, {b.rounds} rounds alternating, into one"
    )
    add(
        "`cert-agent serve` process started with `--grpc-workers` "
        f"{b.pods} (so every call of the burst is admitted; key generation stays bounded by "
        "`--keygen-workers`, 2); wall time for all of them. *Agent CPU* is the process's"
    )
    add("utime + stime during the burst: above the wall time means more than one core worked.")
    add(f"Calls the agent shed and the client retried: {b.retries}.")
    add("")
    seq, par = _pct(b.sequential, 50), _pct(b.parallel, 50)
    cpu = _pct(b.parallel_cpu, 50)
    add("| | wall s (median) | all rounds |")
    add("|---|---|---|")
    add(f"| one after another | {seq:.2f} | {', '.join(f'{x:.2f}' for x in b.sequential)} |")
    add(f"| all at once | {par:.2f} | {', '.join(f'{x:.2f}' for x in b.parallel)} |")
    add(f"| all at once / one after another | {par / seq:.2f} | |")
    add(f"| agent CPU during the burst / wall | {cpu / par:.2f} cores | |")
    add("")
    add(
        f"{b.pods} ECDSA P-256 publishes at once: all done in {b.ecdsa_wall * 1000:.0f} ms; "
        f"per call median {_ms(_pct(b.ecdsa_burst, 50))} ms, p99 {_ms(_pct(b.ecdsa_burst, 99))} ms."
    )
    add("")


def _render_storm(add: Callable[[str], None], report: ScaleReport) -> None:
    st = report.storm
    add(f"## 14. Renewal storm: {st.volumes} volumes due at once")
    add("")
    add("An agent in this process with an injected clock holds the volumes; the clock jumps past")
    add("every renewal point. A kubelet-like client in a separate process publishes new pods one")
    add("after another during the storm, and the same number while the agent is idle.")
    add("")
    add(
        f"All {st.renewed} renewed {st.renew_all_seconds:.2f} s after the jump "
        f"({st.volumes / st.renew_all_seconds:.0f} renewals/s); {st.publishes_during_storm} of "
        f"the {len(st.storm)} storm publishes ran while renewals were still going."
    )
    add("")
    add("| publishes | median ms | p10 | p90 | p99 | n |")
    add("|---|---|---|---|---|---|")
    add(f"| idle agent | {_row(st.idle)} |")
    add(f"| during the storm | {_row(st.storm)} |")
    add(f"| p99 storm / p99 idle | {_pct(st.storm, 99) / _pct(st.idle, 99):.2f} | | | | |")
    add("")


# ------------------------------------------------------------------------------------ plots


def plots(docs: Path, report: ScaleReport, publish_paired: object) -> list[Path]:
    """docs/img/publish-latency.png and docs/img/publish-vs-volumes.png (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = docs / IMG
    img.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    agent_side: list[float] = publish_paired.agent  # type: ignore[attr-defined]
    raw_side: list[float] = publish_paired.raw  # type: ignore[attr-defined]
    for values, label in (
        (agent_side, "agent publish (gRPC, mount, files)"),
        (raw_side, "raw cryptography (key, CSR, signature)"),
    ):
        ordered = sorted(v * 1000 for v in values)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of calls at or below")
    ax.set_title("ECDSA P-256: publish latency, agent vs raw crypto")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = img / "publish-latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    points = report.scale.checkpoints
    xs = [p.volumes for p in points]
    for attr, label in (("publish", "publish"), ("unpublish", "unpublish")):
        med = [_pct(getattr(p, attr), 50) * 1000 for p in points]
        low = [_pct(getattr(p, attr), 10) * 1000 for p in points]
        high = [_pct(getattr(p, attr), 90) * 1000 for p in points]
        ax.plot(xs, med, marker="o", label=f"{label} median")
        ax.fill_between(xs, low, high, alpha=0.2, label=f"{label} p10-p90")
    ax.set_xlabel("volumes already published")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Publish and unpublish latency against the number of volumes")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = img / "publish-vs-volumes.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


# ---------------------------------------------------------------------------- docs/scale.md


def _rate(value: float) -> str:
    return f"{value:,.3f}" if value < 10 else f"{value:,.1f}"


def scale_document(report: ScaleReport, node_ca_start: dict[str, float] | None) -> str:
    cm = report.api[0]
    sim = {s.mode: s for s in report.simulations}
    agent_costs = costs_from(sim["cert-manager"].single)
    node_costs = costs_from(sim["node-ca"].single)
    first = report.scale.checkpoints[0]
    cpu = first.publish_cpu / len(first.publish)
    cluster = Cluster()
    loads = model(cluster, agent_costs, node_costs, cm.objects_after_renew / cm.pods, cpu, cpu)
    out: list[str] = []
    add = out.append
    add("# Cluster scale: what certificates per pod cost the Kubernetes API")
    add("")
    add("Generated by `make bench` (tests/bench_scale_report.py, tests/cluster_model.py); do not")
    add("edit by hand. The per-operation counts are measured on the in-process fake API server")
    add("(real REST protocol, every request recorded) with the real agent; the cluster numbers")
    add("are those counts times the rates of the cluster below.")
    add("")
    add("## The cluster")
    add("")
    add(
        f"{cluster.nodes:,} nodes x {cluster.pods_per_node} pods = {cluster.pods:,} pods, one "
        f"certificate volume each, {cluster.lifetime_hours:g} h certificates renewed at 2/3 of "
        f"their life: every certificate is reissued every "
        f"{cluster.lifetime_hours * cluster.renew_fraction:g} h, "
        f"**{cluster.renewals_per_second:.2f} issuances per second** cluster-wide in the steady "
        "state (pod churn adds its own first issuances on top, at the same cost each)."
    )
    add(
        f"Node CAs (mode c) live {cluster.node_ca_lifetime_hours:g} h and renew at 2/3 too: "
        f"{cluster.node_ca_renewals_per_second:.3f} per second."
    )
    add("")
    add("## Measured per-operation costs (requests by verb)")
    add("")
    add("| design | per agent at start | per pod certificate issued | per renewal | kept in etcd |")
    add("|---|---|---|---|---|")

    def cells(counts: dict[str, float]) -> str:
        return ", ".join(f"{v} {n:g}" for v, n in sorted(counts.items())) or "0"

    add(
        "| (a) cert-manager csi-driver (from its code, see below) | LIST 1, WATCH 1 "
        "(node-wide informer) | CREATE 1 | CREATE 1, DELETE 1 | 2 CertificateRequests per pod |"
    )
    add(
        f"| (b) cert-agent, CertificateRequest per pod (measured) | {cells(agent_costs.start)} "
        f"| {cells(agent_costs.issue)} | {cells(agent_costs.renew)} "
        f"| {cm.objects_after_renew / cm.pods:g} CertificateRequest per pod |"
    )
    add(
        f"| (c) cert-agent, node CA mode (measured) | {cells(node_costs.start)} "
        f"| {cells(node_costs.issue)} | {cells(node_costs.renew)} per node CA renewal "
        "| 1 CertificateRequest per node |"
    )
    add(
        "| (d) PodCertificateRequest (KEP-4317) | LIST 1, WATCH 1 (kubelet's PCR informer) "
        "| CREATE 1 (kubelet) | CREATE 1 (kubelet), DELETE 1 (cleaner) "
        "| each PCR for 30 min |"
    )
    add("")
    add("The agent in (b) ran with a local CA from a Secret beside cert-manager, so its start")
    add(
        "shows that Secret's GET and its one long-lived WATCH; without `--ca-secret` there is none."
    )
    add("Node CPU for issuance: the agent's measured CPU per ECDSA issuance stands in for the")
    add("node's side in every design (key, CSR and, for (c), the signature; the API calls of")
    add("(a), (b) and (d) come on top).")
    add("")
    add("Status writes by the signing controller are not the node's requests but are API writes")
    add("all the same: cert-manager writes each CertificateRequest's status twice (approval, then")
    add("the certificate), a PodCertificateRequest signer once. They are counted in *writes/s*.")
    add("")
    add("## The four designs at this scale")
    add("")
    add(
        "| design | API requests/s from nodes | writes/s (incl. controller) | request objects "
        "in etcd | long-lived watches | short watches open | node CPU for issuance (cores, "
        "cluster-wide) |"
    )
    add("|---|---|---|---|---|---|---|")
    for load in loads:
        add(
            f"| {load.design} | {_rate(sum(load.requests.values()))} "
            f"({', '.join(f'{v} {_rate(n)}' for v, n in sorted(load.requests.items()))}) "
            f"| {_rate(load.writes)} | {load.objects:,.0f} | {load.long_watches:,.0f} "
            f"| {load.short_watches:,.1f} | {load.node_cpu_cores:.3f} |"
        )
    add("")
    add(_reading(loads, cluster, cpu))
    add("")
    add("## How the designs wait for a certificate")
    add("")
    add("- (a) cert-manager's csi-driver (csi-lib `manager/manager.go`): one shared informer per")
    add("  node on CertificateRequests labelled with the node's hash (one LIST and one WATCH per")
    add("  node, kept open), and a 200 ms poll of that informer's cache per issuance (no request")
    add("  per poll); a 1 s renewal ticker per volume on the node. Each issuance creates a")
    add("  request; with `MaxRequestsPerVolume` 1 the one before the last is deleted at the next")
    add("  issuance, so two requests per volume stay in etcd between renewals.")
    add("- (b) this agent: one LIST of the volume's requests (a kubelet retry reuses a pending")
    add("  one), CREATE, and a WATCH of that one object (field selector) until it is Ready; the")
    add("  request it replaces is deleted after a renewal, so one request per volume stays.")
    add("- (c) node CA mode: the same per node CA, once per node CA lifetime; pods are signed")
    add("  on the node with no API call.")
    add("- (d) PodCertificateRequest: kubelet creates one per pod and projected volume and")
    add("  refreshes at the signer's `beginRefreshAt`; kube-controller-manager's PCR cleaner")
    add("  deletes requests older than 30 minutes.")
    add("")
    add("## The simulation")
    add("")
    add("N real agents (in one process, one thread each, each with its own data root, socket and")
    add("API client) against one fake API server and one fake cert-manager: each publishes its")
    add("pods, then the injected clock moves past every renewal point. One agent's run gives the")
    add("per-operation costs; the model multiplies them out; the N-agent run counts what was")
    add("really sent. A test in the suite runs it with 20 agents (tests/test_cluster_model.py).")
    add("")
    add("| mode | agents x pods | verb | model | counted | difference |")
    add("|---|---|---|---|---|---|")
    for s in report.simulations:
        m = s.many
        for verb in sorted(set(s.expected) | set(m.counted)):
            want, got = s.expected.get(verb, 0.0), m.counted.get(verb, 0)
            diff = (got - want) / want * 100 if want else 0.0
            add(
                f"| {s.mode} | {m.agents} x {m.pods_per_agent} | {verb} | {want:g} | {got} | "
                f"{diff:+.1f} % |"
            )
    add("")
    verdict = all(not s.problems for s in report.simulations)
    add(
        "Every count within 10 % of the model: **"
        + ("yes" if verdict else "no")
        + "**"
        + (
            ""
            if verdict
            else " (" + "; ".join(p for s in report.simulations for p in s.problems) + ")"
        )
        + "."
    )
    add("")
    return "\n".join(out) + "\n"


def _reading(loads: list[DesignLoad], cluster: Cluster, cpu: float) -> str:
    a, b, c, d = loads
    return "\n".join(
        [
            "Reading the table:",
            "",
            f"- Objects: the csi-driver keeps {a.objects:,.0f} CertificateRequests in etcd (each "
            "carries a CSR, a certificate chain and the CA: a few KiB, so gigabytes against etcd's "
            f"default 2 GiB quota); this agent per pod {b.objects:,.0f}; node CA mode "
            f"{c.objects:,.0f}; PodCertificateRequests {d.objects:,.0f} at a time.",
            "- Writes: (a), (b) and (d) write at the issuance rate "
            f"({cluster.renewals_per_second:.1f}/s) several times over; "
            f"node CA mode {c.writes:.3f} writes/s, "
            f"{a.writes / c.writes:,.0f}x fewer than the csi-driver.",
            f"- Watches: the csi-driver and PCR kubelets hold {a.long_watches:,.0f} watches open "
            "all the time, and the API server checks every request event against each of them; "
            f"this agent opens one per request in flight ({b.short_watches:.1f} at a time with a "
            "1 s issuance) and none in node CA mode between node CA renewals.",
            f"- Node CPU: {cpu * 1000:.2f} ms of agent CPU per ECDSA issuance (measured at the "
            f"first checkpoint of section 10) is {c.node_cpu_cores:.3f} cores for the whole "
            "cluster, "
            f"{c.node_cpu_cores / cluster.nodes * 1e6:.1f} µcores per node.",
        ]
    )
