"""Node CA mode's API cost, counted on the fake API server (a section of `make bench`).

The claim: zero Kubernetes API calls per pod certificate, one CertificateRequest per node per
node-CA renewal. The real agent runs in node CA mode against tests.fakekube with a fake
cert-manager CA issuer; an injected clock moves to the renewal point, so the renewal and the move
of every pod to the new node CA happen within the run.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from agent.config import NodeCAConfig
from agent.pki.name_constraints import PermittedNames
from tests.conftest import RunningAgent, unmount_below
from tests.fakekube import FakeClock, FakeKube, FakeSigner

ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
    # Pods renew on their own only in the old node CA's last hour: the move is what is counted.
    "csi.cert-agent.io/renew-before": "1h",
}


@dataclass
class NodeCAResults:
    pods: int
    api_calls_for_publishes: int
    publish_ms_median: float
    node_ca_requests_start: int
    renewals: int
    node_ca_requests_after: int
    api_calls_for_move: int
    moved: int


def _wait(predicate: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("node CA bench: condition not reached in time")
        time.sleep(0.05)


def bench_node_ca(tmp: Path, pods: int) -> NodeCAResults:
    clock = FakeClock()
    with FakeKube() as fake:
        signer = FakeSigner(fake, clock=clock.datetime).start()
        running = None
        try:
            running = RunningAgent(
                tmp,
                clock=clock,
                standalone=False,
                kubeconfig=str(fake.write_kubeconfig(tmp / "kubeconfig")),
                node_ca=NodeCAConfig(
                    issuer_name="ca-cluster-issuer",
                    issuer_kind="ClusterIssuer",
                    namespace="cert-agent",
                    permitted=PermittedNames.parse(
                        dns=["svc.cluster.local"], uri_hosts=["cluster.local"]
                    ),
                ),
                pod_name="cert-agent-bench",
                pod_uid=str(uuid.uuid4()),
                pod_namespace="cert-agent",
            )
            provider = running.agent.node_ca
            provider.wait_for_attempts(1)
            posts_start = fake.count("POST", "/certificaterequests")

            before = len(fake.requests)
            targets, times = [], []
            for i in range(pods):
                pod = running.pod(f"web-{i}", namespace="bench", uid=str(uuid.uuid4()))
                started = time.perf_counter()
                targets.append(running.publish(pod, ATTRIBUTES))
                times.append(time.perf_counter() - started)
            publish_calls = len(fake.requests) - before

            clock.advance_to(provider.renew_at + 1)
            provider.wake()
            provider.wait_for_attempts(2)
            new = provider.current().certificate
            posts_after = fake.count("POST", "/certificaterequests")
            before = len(fake.requests)
            scheduler = running.agent.scheduler
            dues = [scheduler.due_time(v) for v in running.agent.store.volume_ids()]
            clock.advance_to(max(d for d in dues if d is not None) + 1)
            scheduler.wake()

            def moved() -> int:
                return sum(
                    x509.load_pem_x509_certificates((t / "tls.crt").read_bytes())[1] == new
                    for t in targets
                )

            _wait(lambda: moved() == len(targets))
            return NodeCAResults(
                pods=pods,
                api_calls_for_publishes=publish_calls,
                publish_ms_median=statistics.median(times) * 1000,
                node_ca_requests_start=posts_start,
                renewals=1,
                node_ca_requests_after=posts_after,
                api_calls_for_move=len(fake.requests) - before,
                moved=moved(),
            )
        finally:
            if running is not None:
                running.stop()
            signer.stop()
            unmount_below(tmp)


def render_node_ca(add: Callable[[str], None], results: NodeCAResults | None) -> None:
    add("## 5. Node CA mode: Kubernetes API calls")
    add("")
    if results is None:
        add("Not measured: node CA mode needs mounts (run `make bench` as root).")
        add("")
        return
    add("The agent in node CA mode against the in-process fake API server (real REST protocol)")
    add("and a fake cert-manager CA issuer; every request the agent sends is counted there. An")
    add("injected clock moves to the node CA's renewal point, then to the last pod's move.")
    add("")
    add("| | count |")
    add("|---|---|")
    add(f"| CertificateRequests to get the node CA at start | {results.node_ca_requests_start} |")
    add(
        f"| API calls for {results.pods} pod certificates (publishes, median "
        f"{results.publish_ms_median:.1f} ms each) | {results.api_calls_for_publishes} |"
    )
    add(f"| API calls per pod certificate | {results.api_calls_for_publishes / results.pods:g} |")
    add(
        f"| CertificateRequests after {results.renewals} node CA renewal | "
        f"{results.node_ca_requests_after} |"
    )
    add(
        f"| API calls to move {results.moved} pod certificates to the new node CA | "
        f"{results.api_calls_for_move} |"
    )
    add("")
