"""What node CA mode asks for and when: its settings, its request, its renewal times.

Pure: no thread, no I/O. ``node_ca.NodeCAProvider`` runs the schedule these describe.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent.issuers.base import IssueRequest
from agent.pki.intermediate import NODE_CA_USAGES
from agent.pki.name_constraints import PermittedNames
from agent.spec.model import CertificateSpec, IssuerRef, PodInfo

SPREAD_FRACTION = 0.05  # renewal moves earlier by up to 5 % of the lifetime ...
MAX_SPREAD_SECONDS = 3600.0  # ... and at most an hour, so nodes started together spread out
ANNOTATION_PURPOSE = "cert-agent.io/purpose"


@dataclass(frozen=True)
class NodeCASettings:
    issuer: IssuerRef
    namespace: str
    node_id: str
    permitted: PermittedNames
    duration_seconds: int = 24 * 3600
    renew_before_seconds: int | None = None  # None: a third of the issued lifetime
    require_name_constraints: bool = False
    # The agent's own Pod (downward API): owner of the request, so it goes away with the Pod.
    # Only used when the request is made in the Pod's namespace (owner references are local).
    pod_name: str | None = None
    pod_uid: str | None = None
    pod_namespace: str | None = None
    request_timeout_seconds: float = 60.0


def renewal_time(
    not_before: float, not_after: float, renew_before: int | None, rng: random.Random
) -> float:
    """When a node CA valid from ``not_before`` to ``not_after`` renews (epoch seconds)."""
    lifetime = max(0.0, not_after - not_before)
    ahead = lifetime / 3 if renew_before is None or renew_before >= lifetime else renew_before
    spread = rng.uniform(0.0, min(lifetime * SPREAD_FRACTION, MAX_SPREAD_SECONDS))
    return max(not_before, not_after - ahead - spread)


def reissue_due(now: float, leaf_not_after: float, rng: random.Random) -> float:
    """When to move a pod certificate of the old node CA to the new one: a random point in the
    first half of what is left of it, so pods do not all renew at once and none runs late."""
    return now + rng.uniform(0.0, max(0.0, (leaf_not_after - now) / 2))


def node_ca_issue_request(s: NodeCASettings, csr_pem: bytes) -> IssueRequest:
    """The request for the node CA: isCA, owned by the agent's Pod when in its namespace."""
    owned = bool(s.pod_name and s.pod_uid and s.pod_namespace == s.namespace)
    pod = PodInfo(
        name=(s.pod_name or "") if owned else "",
        namespace=s.namespace,
        uid=(s.pod_uid or "") if owned else "",
        service_account="",
    )
    spec = CertificateSpec(
        issuer=s.issuer,
        duration_seconds=s.duration_seconds,
        key_usages=NODE_CA_USAGES,
        is_ca=True,
        annotations=((ANNOTATION_PURPOSE, "node-ca"),),
    )
    return IssueRequest(
        volume_id=f"node-ca.{s.node_id}", node_id=s.node_id, pod=pod, spec=spec, csr_pem=csr_pem
    )
