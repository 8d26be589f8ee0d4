"""The CertificateRequest the agent creates: its labels, annotations, owner and spec.

Labels find a volume's requests again (a volume id is too long for a label value: hashed);
annotations keep the full values. The Pod owns the request, so it goes with the pod.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from agent.issuers.base import IssueRequest

GROUP = "cert-manager.io"
VERSION = "v1"
PLURAL = "certificaterequests"


def collection_path(namespace: str) -> str:
    """The REST path of the CertificateRequests of ``namespace``."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"


GENERATE_NAME = "cert-agent-"

LABEL_VOLUME = "cert-agent.io/volume-id"
LABEL_NODE = "cert-agent.io/node"
LABEL_POD = "cert-agent.io/pod-name"
ANNOTATION_VOLUME = "cert-agent.io/volume-id"
ANNOTATION_NODE = "cert-agent.io/node"
ANNOTATION_POD = "cert-agent.io/pod-name"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

Obj = dict[str, Any]


def volume_label(volume_id: str) -> str:
    """A label value for a volume id (68 chars, over the 63 a label allows): sha256, 63 hex."""
    return hashlib.sha256(volume_id.encode()).hexdigest()[:63]


def label_value(value: str) -> tuple[str, bool]:
    """``value`` if it is a valid label value, else its sha256 prefix; and whether it was hashed."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value, False
    return hashlib.sha256(value.encode()).hexdigest()[:63], True


def go_duration(seconds: int) -> str:
    """Go's time.Duration.String() for whole seconds: ``2160h0m0s``, ``5m0s``, ``30s``."""
    if seconds == 0:
        return "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def build_request(request: IssueRequest, *, node_id: str, driver_name: str) -> Obj:
    """The CertificateRequest object for ``request``; ``node_id`` unless the request names one."""
    spec = request.spec
    ref = spec.issuer
    node_id = request.node_id or node_id
    node_label, node_hashed = label_value(node_id)
    pod_label, pod_hashed = label_value(request.pod.name)
    annotations = dict(spec.annotations)
    annotations[ANNOTATION_VOLUME] = request.volume_id
    if node_hashed:
        annotations[ANNOTATION_NODE] = node_id
    if pod_hashed:
        annotations[ANNOTATION_POD] = request.pod.name
    usages = [u.lower() for u in spec.key_usages]
    if spec.is_ca and "cert sign" not in usages:
        usages.append("cert sign")  # the CSR carries keyCertSign for a CA; keep them equal
    cr_spec: Obj = {
        "request": base64.b64encode(request.csr_pem).decode("ascii"),
        "issuerRef": {"name": ref.name, "kind": ref.kind, "group": ref.group},
        "isCA": spec.is_ca,
        "usages": usages,
    }
    if spec.duration_seconds is not None:
        cr_spec["duration"] = go_duration(spec.duration_seconds)
    body: Obj = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CertificateRequest",
        "metadata": {
            "generateName": GENERATE_NAME,
            "namespace": request.pod.namespace,
            "labels": {
                LABEL_VOLUME: volume_label(request.volume_id),
                LABEL_NODE: node_label,
                LABEL_POD: pod_label,
                "app.kubernetes.io/managed-by": driver_name,
            },
            "annotations": annotations,
        },
        "spec": cr_spec,
    }
    if request.pod.uid:
        # The garbage collector needs only the uid; blockOwnerDeletion would need
        # permission on pods/finalizers and would hold up pod deletion for nothing.
        body["metadata"]["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": request.pod.name,
                "uid": request.pod.uid,
                "controller": False,
                "blockOwnerDeletion": False,
            }
        ]
    return body
