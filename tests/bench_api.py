"""Kubernetes API cost per certificate, counted on the in-process fake API server.

A section of `make bench` (node CA mode is counted by tests.bench_node_ca). The real agent runs
against tests.fakekube (the real REST protocol; every request is recorded there) with the fake
cert-manager signer:

- cert-manager mode: P pods published (first issuances), then an injected clock moves past every
  renewal point and each pod renews once; requests are counted by verb in each phase, and the
  CertificateRequests left in the store afterwards are the objects etcd would hold.
- Secret CA mode: P pods published with the CA from a watched Secret; the requests counted
  during the publishes are what each pod costs the API (the Secret's one watch is per agent).

The per-operation counts feed the cluster model (tests.cluster_model, docs/scale.md).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.conftest import RunningAgent, unmount_below
from tests.fakekube import FakeClock, FakeKube, FakeSigner, RequestRecord, make_test_ca, pem

CERT_MANAGER_ATTRIBUTES = {
    "csi.cert-manager.io/issuer-name": "ca-cluster-issuer",
    "csi.cert-manager.io/issuer-kind": "ClusterIssuer",
    "csi.cert-manager.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
}
LOCAL_ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
}
CA_SECRET = ("cert-agent", "cert-agent-ca")


def verb(record: RequestRecord) -> str:
    """GET split into LIST, WATCH and GET the way the API server's metrics name them."""
    if record.method != "GET":
        return {"POST": "CREATE", "PUT": "UPDATE", "PATCH": "PATCH"}.get(
            record.method, record.method
        )
    if record.query.get("watch") in ("true", "1"):
        return "WATCH"
    parts = [p for p in record.path.split("/") if p]
    # .../namespaces/<ns>/<plural> is a collection (LIST); .../<plural>/<name> is one object.
    collection = (len(parts) >= 2 and parts[-2] == "namespaces") or parts[-1] in (
        "certificaterequests",
        "secrets",
    )
    return "LIST" if collection else "GET"


def count_verbs(records: list[RequestRecord]) -> dict[str, int]:
    return dict(Counter(verb(r) for r in records))


@dataclass
class ModeCost:
    mode: str
    pods: int
    issue: dict[str, int] = field(default_factory=dict)  # verbs for `pods` first issuances
    renew: dict[str, int] = field(default_factory=dict)  # verbs for `pods` renewals
    objects_after_issue: int = 0
    objects_after_renew: int = 0
    start: dict[str, int] = field(default_factory=dict)  # verbs at agent start (per agent)

    def per(self, phase: str, name: str) -> float:
        counts = self.issue if phase == "issue" else self.renew
        return counts.get(name, 0) / self.pods


def _wait(predicate: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("API cost bench: condition not reached in time")
        time.sleep(0.02)


def _ca_secret_data() -> dict[str, bytes]:
    key, cert = make_test_ca("bench Secret CA")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {"ca.crt": pem(cert), "ca.key": key_pem}


def bench_cert_manager_mode(tmp: Path, pods: int) -> ModeCost:
    clock = FakeClock()
    cost = ModeCost("cert-manager", pods)
    with FakeKube() as fake:
        fake.put_secret(*CA_SECRET, _ca_secret_data())
        signer = FakeSigner(fake, clock=clock.datetime).start()
        running = None
        try:
            running = RunningAgent(
                tmp,
                clock=clock,
                standalone=False,
                kubeconfig=str(fake.write_kubeconfig(tmp / "kubeconfig")),
                ca_secret=CA_SECRET,
            )
            cost.start = count_verbs(fake.requests)
            before = len(fake.requests)
            for i in range(pods):
                pod = running.pod(f"web-{i}", namespace="bench", uid=str(uuid.uuid4()))
                running.publish(pod, CERT_MANAGER_ATTRIBUTES)
            cost.issue = count_verbs(fake.requests[before:])
            cost.objects_after_issue = len(fake.list_crs())

            scheduler = running.agent.scheduler
            volume_ids = running.agent.store.volume_ids()
            dues = [scheduler.due_time(v) for v in volume_ids]
            before = len(fake.requests)
            posts = fake.count("POST", "/certificaterequests")
            clock.advance_to(max(d for d in dues if d is not None) + 1)
            scheduler.wake()
            _wait(
                lambda: (
                    fake.count("POST", "/certificaterequests") >= posts + pods
                    and scheduler.pending() == pods
                    and scheduler.running() == 0
                )
            )
            cost.renew = count_verbs(fake.requests[before:])
            cost.objects_after_renew = len(fake.list_crs())
        finally:
            if running is not None:
                running.stop()
            signer.stop()
            unmount_below(tmp)
    return cost


def bench_secret_ca_mode(tmp: Path, pods: int) -> ModeCost:
    cost = ModeCost("Secret CA", pods)
    with FakeKube() as fake:
        fake.put_secret(*CA_SECRET, _ca_secret_data())
        running = None
        try:
            running = RunningAgent(
                tmp,
                standalone=False,
                kubeconfig=str(fake.write_kubeconfig(tmp / "kubeconfig")),
                ca_secret=CA_SECRET,
            )
            cost.start = count_verbs(fake.requests)
            before = len(fake.requests)
            for i in range(pods):
                pod = running.pod(f"web-{i}", namespace="bench", uid=str(uuid.uuid4()))
                running.publish(pod, LOCAL_ATTRIBUTES)
            cost.issue = count_verbs(fake.requests[before:])
            before = len(fake.requests)
            for volume_id in running.agent.store.volume_ids():
                running.agent.manager.renew(volume_id)
            cost.renew = count_verbs(fake.requests[before:])
        finally:
            if running is not None:
                running.stop()
            unmount_below(tmp)
    return cost


def _cells(counts: dict[str, int], pods: int) -> str:
    if not counts:
        return "0"
    return ", ".join(f"{name} {n / pods:g}" for name, n in sorted(counts.items()))


def render_api_cost(add: Callable[[str], None], costs: list[ModeCost]) -> None:
    add("## 15. API cost per certificate (cert-manager and Secret CA modes)")
    add("")
    add("The real agent against the in-process fake API server (real REST protocol, every request")
    add("recorded) and the fake cert-manager signer; an injected clock moves past every renewal")
    add("point so each pod renews once. Requests per certificate, by verb (LIST and WATCH are")
    add("GETs, told apart as the API server's metrics do); objects are the CertificateRequests")
    add("left in the store. Node CA mode is the next section.")
    add("")
    add(
        "| mode | pods | at agent start (per agent) | per first issuance | per renewal "
        "| CertificateRequests kept per pod |"
    )
    add("|---|---|---|---|---|---|")
    for cost in costs:
        kept = (
            f"{cost.objects_after_issue / cost.pods:g} after issue, "
            f"{cost.objects_after_renew / cost.pods:g} after renewal"
            if cost.mode == "cert-manager"
            else "0"
        )
        add(
            f"| {cost.mode} | {cost.pods} | {_cells(cost.start, 1)} | "
            f"{_cells(cost.issue, cost.pods)} | {_cells(cost.renew, cost.pods)} | {kept} |"
        )
    add("")
