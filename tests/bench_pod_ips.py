"""Benchmark section: pod IP appearing in the watch -> a certificate carrying it (``make bench``).

An in-process agent in cluster mode watches the fake API server's pods of its node. Each pod's
volume is published before the pod has an IP (the first certificate goes without); then the
pod's status gets its IPs. Measured per volume:

- *watch event -> certificate*: what ``cert_agent_pod_ip_san_latency_seconds`` observes, from
  the moment the agent's pod watch delivered the IP to the commit of the reissued certificate
  (the issue's target: p99 under 1 s);
- *status write -> certificate*: from the fake API server accepting the status update to the
  certificate being in place (adds the watch's delivery).

Sequentially (one pod at a time) and as a burst (every pod gets its IP at once, as when a node
starts many pods; the renewal workers bound the concurrency).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.conftest import NODE_AGENT_POLICY, RunningAgent
from tests.fakekube import FakeKube, make_test_ca, pem

ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/ip-sans": "${POD_IPS}",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}
NAMESPACE = "bench"
TARGET_P99_SECONDS = 1.0


@dataclass
class PodIPResults:
    sequential_event: list[float] = field(default_factory=list)
    sequential_write: list[float] = field(default_factory=list)
    burst_event: list[float] = field(default_factory=list)
    burst_wall: float = 0.0
    burst_size: int = 0
    renewal_workers: int = 0


def bench_pod_ips(tmp: Path, sequential: int, burst: int) -> PodIPResults:
    results = PodIPResults(burst_size=burst)
    with FakeKube() as fake:
        key, cert = make_test_ca("bench node CA")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fake.put_secret("cert-agent", "ca", {"ca.crt": pem(cert), "ca.key": key_pem})
        # ${POD_IPS} needs a policy that allows the pod's own addresses (the default allows none).
        policy = tmp / "policy.yaml"
        policy.write_text(NODE_AGENT_POLICY)
        running = RunningAgent(
            tmp,
            standalone=False,
            kubeconfig=str(fake.write_kubeconfig(tmp / "kubeconfig")),
            ca_secret=("cert-agent", "ca"),
            pod_watch="on",
            policy_file=policy,
        )
        results.renewal_workers = running.config.renewal_workers
        observed: list[float] = []
        metrics = running.agent.metrics
        original: Callable[[float], None] = metrics.observe_pod_ip_latency

        def record(seconds: float) -> None:
            observed.append(seconds)
            original(seconds)

        metrics.observe_pod_ip_latency = record  # type: ignore[method-assign]
        tracker = running.agent.manager.pod_ips
        try:
            for i in range(sequential):
                volume_id, name = _published_pod(running, fake, f"seq-{i}")
                written = time.perf_counter()
                fake.set_pod_ips(NAMESPACE, name, [f"10.8.{i // 250}.{i % 250 + 1}"])
                if not tracker.wait_carried(volume_id, 30):
                    raise RuntimeError(f"{name}: no certificate with the pod IP within 30 s")
                results.sequential_write.append(time.perf_counter() - written)
            results.sequential_event = list(observed)
            observed.clear()
            pods = [_published_pod(running, fake, f"burst-{i}") for i in range(burst)]
            started = time.perf_counter()
            for i, (_volume_id, name) in enumerate(pods):
                fake.set_pod_ips(NAMESPACE, name, [f"10.9.{i // 250}.{i % 250 + 1}"])
            for volume_id, name in pods:
                if not tracker.wait_carried(volume_id, 60):
                    raise RuntimeError(f"{name}: no certificate with the pod IP within 60 s")
            results.burst_wall = time.perf_counter() - started
            results.burst_event = list(observed)
        finally:
            running.stop()
    return results


def _published_pod(running: RunningAgent, fake: FakeKube, name: str) -> tuple[str, str]:
    created = fake.put_pod(NAMESPACE, name, running.config.node_id)
    pod = running.pod(name, namespace=NAMESPACE, uid=created["metadata"]["uid"])
    running.publish(pod, ATTRIBUTES)
    return pod.volume_id, name


def render_pod_ips(
    add: Callable[[str], None],
    results: PodIPResults,
    percentile: Callable[[list[float], float], float],
) -> None:
    def row(label: str, values: list[float]) -> None:
        cells = " | ".join(f"{percentile(values, q) * 1000:.1f}" for q in (50, 90, 99))
        add(f"| {label} | {cells} | {max(values) * 1000:.1f} | {len(values)} |")

    add("## 6. Pod IP SANs: from the watch event to the certificate")
    add("")
    add("An in-process agent in cluster mode against the in-process fake API server (real REST,")
    add("agent's REST client), local CA, ECDSA P-256, `ip-sans: ${POD_IPS}`. Each volume is")
    add("published while its pod has no IP; then the pod's status gets one. *Watch event*: from")
    add("the agent's pod watch delivering the IP to the reissued certificate being committed")
    add("(what `cert_agent_pod_ip_san_latency_seconds` observes). *Status write*: from the fake")
    add("API server accepting the status update to the certificate in place (adds the watch's")
    add(f"delivery). The burst gives {results.burst_size} pods their IPs at once;")
    add(f"`--renewal-workers` {results.renewal_workers} reissue them.")
    add("")
    add("| measured | p50 ms | p90 ms | p99 ms | max ms | n |")
    add("|---|---|---|---|---|---|")
    row("one pod at a time: watch event -> certificate", results.sequential_event)
    row("one pod at a time: status write -> certificate", results.sequential_write)
    row(f"burst of {results.burst_size}: watch event -> certificate", results.burst_event)
    add("")
    p99 = percentile(results.sequential_event, 99)
    verdict = "met" if p99 < TARGET_P99_SECONDS else "NOT met"
    add(
        f"Target p99 < {TARGET_P99_SECONDS:.0f} s after the watch event (one pod at a time): "
        f"{p99 * 1000:.1f} ms, {verdict}. The burst took {results.burst_wall:.2f} s from the "
        "first status write to the last certificate, most of it the fake API server writing and "
        f"validating the {results.burst_size} status updates one after another; per pod, the "
        f"watch event -> certificate p99 of {percentile(results.burst_event, 99) * 1000:.0f} ms "
        "is the wait behind the renewal workers."
    )
    add("")
