"""The cluster-scale model (docs/scale.md) and the simulation that checks its request counts.

The model turns per-operation API costs, measured on the fake API server (tests.bench_api), into
cluster-wide rates for a fleet of nodes: requests per second by verb, writes, objects kept in
etcd, and watch streams. ``simulate`` runs N real agents (in this process, one thread each)
against one fake API server and counts what they actually send, so the model's linear scaling
from one agent's counts to N agents is checked, not assumed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import NodeCAConfig
from agent.pki.name_constraints import PermittedNames
from tests.bench_api import CA_SECRET, CERT_MANAGER_ATTRIBUTES, _ca_secret_data, count_verbs
from tests.conftest import RunningAgent, unmount_below
from tests.fakekube import FakeClock, FakeKube, FakeSigner

WRITE_VERBS = ("CREATE", "UPDATE", "PATCH", "DELETE")
NODE_CA_ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
    "csi.cert-agent.io/renew-before": "1h",
}


@dataclass(frozen=True)
class Costs:
    """Requests by verb: per agent at start, per first issuance, per renewal (of one pod's
    certificate, or of the node CA in node CA mode)."""

    start: dict[str, float]
    issue: dict[str, float]
    renew: dict[str, float]


def expected_requests(costs: Costs, agents: int, issues: int, renewals: int) -> dict[str, float]:
    """What ``agents`` agents send for ``issues`` first issuances and ``renewals`` renewals."""
    verbs = set(costs.start) | set(costs.issue) | set(costs.renew)
    return {
        v: agents * costs.start.get(v, 0)
        + issues * costs.issue.get(v, 0)
        + renewals * costs.renew.get(v, 0)
        for v in sorted(verbs)
    }


# ------------------------------------------------------------------------- the cluster model


@dataclass(frozen=True)
class Cluster:
    nodes: int = 5000
    pods_per_node: int = 110
    lifetime_hours: float = 24.0
    renew_fraction: float = 2 / 3  # renewed at 2/3 of the lifetime
    node_ca_lifetime_hours: float = 24.0
    issue_seconds: float = 1.0  # how long one CertificateRequest waits for cert-manager
    pcr_ttl_seconds: float = 1800.0  # the PodCertificateRequest cleaner's threshold

    @property
    def pods(self) -> int:
        return self.nodes * self.pods_per_node

    @property
    def renewals_per_second(self) -> float:
        """Steady state: every certificate renews once per renew_fraction x lifetime."""
        return self.pods / (self.lifetime_hours * 3600 * self.renew_fraction)

    @property
    def node_ca_renewals_per_second(self) -> float:
        return self.nodes / (self.node_ca_lifetime_hours * 3600 * self.renew_fraction)


@dataclass
class DesignLoad:
    design: str
    requests: dict[str, float]  # per second, by verb, sent by the node side
    controller_writes: float  # per second, status writes by the signing controller
    objects: float  # request objects kept in etcd at steady state
    long_watches: float  # watch streams open all the time
    short_watches: float  # watch streams open at any moment for single requests
    node_cpu_cores: float  # node-side CPU spent on issuance, cluster-wide (cores)
    notes: list[str] = field(default_factory=list)

    @property
    def writes(self) -> float:
        return sum(self.requests.get(v, 0) for v in WRITE_VERBS) + self.controller_writes


def model(
    cluster: Cluster,
    agent_cr: Costs,
    node_ca: Costs,
    cr_kept_per_pod: float,
    cpu_seconds_per_issuance: float,
    cpu_seconds_per_local_issuance: float,
) -> list[DesignLoad]:
    """The four designs at ``cluster`` scale (steady state, renewals only; no pod churn)."""
    r = cluster.renewals_per_second
    rn = cluster.node_ca_renewals_per_second
    loads = []
    # (a) cert-manager csi-driver (csi-lib): CREATE per issuance, the CR before last deleted at
    # the next issuance (MaxRequestsPerVolume 1), waiting through a node-wide CR informer
    # (one LIST + one WATCH per node, polled in memory every 200 ms: no request per poll).
    loads.append(
        DesignLoad(
            "(a) cert-manager csi-driver",
            {"CREATE": r, "DELETE": r},
            controller_writes=2 * r,
            objects=2 * cluster.pods,
            long_watches=cluster.nodes,
            short_watches=0,
            node_cpu_cores=r * cpu_seconds_per_issuance,
            notes=["the informer's watch sees every CR event of its node (label selector)"],
        )
    )
    loads.append(
        DesignLoad(
            "(b) cert-agent, a CertificateRequest per pod",
            {v: r * n for v, n in agent_cr.renew.items()},
            controller_writes=2 * r,
            objects=cr_kept_per_pod * cluster.pods,
            # The start's WATCH is the CA Secret's (the local CA beside cert-manager; none
            # without --ca-secret).
            long_watches=cluster.nodes * agent_cr.start.get("WATCH", 0),
            short_watches=r * agent_cr.renew.get("WATCH", 0) * cluster.issue_seconds,
            node_cpu_cores=r * cpu_seconds_per_issuance,
        )
    )
    loads.append(
        DesignLoad(
            "(c) cert-agent, node CA mode",
            {v: rn * n for v, n in node_ca.renew.items()},
            controller_writes=2 * rn,
            objects=cluster.nodes,
            long_watches=0,  # the start's WATCH is the node CA request's own, short-lived
            short_watches=rn * node_ca.renew.get("WATCH", 0) * cluster.issue_seconds,
            node_cpu_cores=r * cpu_seconds_per_local_issuance,
        )
    )
    # (d) PodCertificateRequest (KEP-4317): kubelet creates one per pod per refresh, the signer
    # writes the status once, kube-controller-manager's cleaner deletes it after 30 minutes;
    # kubelet waits through a PCR informer of its node.
    loads.append(
        DesignLoad(
            "(d) Kubernetes PodCertificateRequest",
            {"CREATE": r, "DELETE": r},
            controller_writes=r,
            objects=r * cluster.pcr_ttl_seconds,
            long_watches=cluster.nodes,
            short_watches=0,
            node_cpu_cores=r * cpu_seconds_per_issuance,
            notes=["signer-side signing CPU not included (the same in every design)"],
        )
    )
    return loads


# ---------------------------------------------------------------------------- the simulation


@dataclass
class SimulationResult:
    mode: str
    agents: int
    pods_per_agent: int
    counted: dict[str, int]
    phases: dict[str, dict[str, int]]  # start, issue, renew: verbs counted in each phase
    seconds: float


def _run_all(actions: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def run(action: Callable[[], None]) -> None:
        try:
            action()
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _wait(predicate: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("simulation: condition not reached in time")
        time.sleep(0.02)


def simulate(tmp: Path, mode: str, agents: int, pods_per_agent: int) -> SimulationResult:
    """``agents`` real agents (in-process, started and driven one thread each) against one fake
    API server: each publishes ``pods_per_agent`` pods, then every certificate renews once (pod
    certificates in ``cert-manager`` mode, the node CA in ``node-ca`` mode)."""
    clock = FakeClock()
    started = time.monotonic()
    running: list[RunningAgent] = []
    with FakeKube() as fake:
        fake.put_secret(*CA_SECRET, _ca_secret_data())
        signer = FakeSigner(fake, clock=clock.datetime).start()
        try:
            kubeconfig = str(fake.write_kubeconfig(tmp / "kubeconfig"))
            slots: list[RunningAgent | None] = [None] * agents

            def start(i: int) -> None:
                directory = tmp / f"agent-{i}"
                directory.mkdir()
                extra: dict[str, object] = (
                    {"ca_secret": CA_SECRET}
                    if mode == "cert-manager"
                    else {
                        "node_ca": NodeCAConfig(
                            issuer_name="ca-cluster-issuer",
                            issuer_kind="ClusterIssuer",
                            namespace="cert-agent",
                            permitted=PermittedNames.parse(
                                dns=["svc.cluster.local"], uri_hosts=["cluster.local"]
                            ),
                        ),
                        "pod_name": f"cert-agent-{i}",
                        "pod_uid": str(uuid.uuid4()),
                        "pod_namespace": "cert-agent",
                    }
                )
                agent = RunningAgent(
                    directory,
                    clock=clock,
                    standalone=False,
                    kubeconfig=kubeconfig,
                    node_id=f"node-{i}",
                    **extra,
                )
                slots[i] = agent
                if mode == "node-ca":
                    assert agent.agent.node_ca is not None
                    agent.agent.node_ca.wait_for_attempts(1)

            _run_all([lambda i=i: start(i) for i in range(agents)])  # type: ignore[misc]
            running = [a for a in slots if a is not None]
            phases = {"start": count_verbs(fake.requests)}
            before = len(fake.requests)
            attributes = CERT_MANAGER_ATTRIBUTES if mode == "cert-manager" else NODE_CA_ATTRIBUTES

            def publish(agent: RunningAgent, i: int) -> None:
                for p in range(pods_per_agent):
                    pod = agent.pod(f"web-{i}-{p}", namespace="sim", uid=str(uuid.uuid4()))
                    agent.publish(pod, attributes)

            _run_all([lambda a=a, i=i: publish(a, i) for i, a in enumerate(running)])  # type: ignore[misc]
            phases["issue"] = count_verbs(fake.requests[before:])
            before = len(fake.requests)
            posts = fake.count("POST", "/certificaterequests")
            if mode == "cert-manager":
                dues = [
                    a.agent.scheduler.due_time(v)
                    for a in running
                    for v in a.agent.store.volume_ids()
                ]
                clock.advance_to(max(d for d in dues if d is not None) + 1)
                for agent in running:
                    agent.agent.scheduler.wake()
                _wait(
                    lambda: (
                        fake.count("POST", "/certificaterequests")
                        >= posts + agents * pods_per_agent
                        and all(
                            a.agent.scheduler.pending() == pods_per_agent
                            and a.agent.scheduler.running() == 0
                            for a in running
                        )
                    )
                )
            else:
                providers = [a.agent.node_ca for a in running]
                clock.advance_to(max(p.renew_at for p in providers if p is not None) + 1)
                for provider in providers:
                    assert provider is not None
                    provider.wake()
                for provider in providers:
                    assert provider is not None
                    provider.wait_for_attempts(2)
            phases["renew"] = count_verbs(fake.requests[before:])
            counted = count_verbs(fake.requests)
        finally:
            # In parallel: each stop waits up to a second for work in flight.
            _run_all([agent.stop for agent in running])
            signer.stop()
            unmount_below(tmp)
    return SimulationResult(
        mode, agents, pods_per_agent, counted, phases, time.monotonic() - started
    )


def costs_from(result: SimulationResult, agents: int = 1) -> Costs:
    """Per-operation costs as a single agent's run measures them (agents=1, one pod or more)."""
    pods = result.agents * result.pods_per_agent
    renewed = pods if result.mode == "cert-manager" else result.agents
    return Costs(
        start={v: n / result.agents for v, n in result.phases["start"].items()},
        issue={v: n / pods for v, n in result.phases.get("issue", {}).items()},
        renew={v: n / renewed for v, n in result.phases.get("renew", {}).items()},
    )


def check_within(
    expected: dict[str, float], counted: dict[str, int], tolerance: float = 0.10
) -> list[str]:
    """Verbs whose count differs from the model by more than ``tolerance`` (relative)."""
    problems = []
    for verb in sorted(set(expected) | set(counted)):
        want, got = expected.get(verb, 0.0), counted.get(verb, 0)
        if abs(got - want) > tolerance * max(want, 1.0):
            problems.append(f"{verb}: model {want:g}, counted {got}")
    return problems
