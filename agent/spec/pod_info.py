"""The pod's identity from kubelet's ``csi.storage.k8s.io/*`` keys, checked before any use."""

from __future__ import annotations

import re
from collections.abc import Mapping

from agent.errors import InvalidArgument
from agent.spec.attribute_names import POD_INFO_PREFIX
from agent.spec.attribute_state import K8S_SUBDOMAIN_RE, LABEL_RE
from agent.spec.model import PodInfo
from agent.spec.templating import quote

_POD_KEYS = {"pod.name": "name", "pod.namespace": "namespace", "pod.uid": "uid"}
_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def pod_info(context: Mapping[str, str]) -> PodInfo:
    """The pod's identity, each value checked against the Kubernetes name rules first.

    kubelet fills these in, but anything that can reach the socket can send them, and they
    end up in certificates through templates: a "name" such as ``a,evil.example.com`` must
    be refused, not expanded.
    """
    fields: dict[str, str] = {}
    for suffix, field_name in _POD_KEYS.items():
        key = POD_INFO_PREFIX + suffix
        value = context.get(key, "")
        if not value.strip():
            raise InvalidArgument(
                f"{key} is missing from the volume context; the CSIDriver object must set "
                "podInfoOnMount: true so kubelet sends the pod's identity",
                key,
            )
        fields[field_name] = _check_pod_value(key, value)
    ephemeral_key = POD_INFO_PREFIX + "ephemeral"
    ephemeral = context.get(ephemeral_key)
    if ephemeral is not None and ephemeral != "true":
        raise InvalidArgument(
            f"{ephemeral_key} is {quote(ephemeral)}: only inline ephemeral volumes are "
            "supported; declare the volume inline in the pod spec (csi: driver: ...)",
            ephemeral_key,
        )
    account_key = POD_INFO_PREFIX + "serviceAccount.name"
    account = context.get(account_key, "")
    account = _check_pod_value(account_key, account) if account.strip() else ""
    return PodInfo(service_account=account, **fields)


def _check_pod_value(key: str, value: str) -> str:
    """A pod-info value as Kubernetes allows it, or InvalidArgument naming the key and rule."""
    if key.endswith("pod.uid"):
        ok, rule = (
            bool(_UUID_RE.fullmatch(value)),
            "a UUID such as 0c5e5e0e-3b1f-4c55-9c6a-1f2f0b7c9d11",
        )
    elif key.endswith("pod.namespace"):
        ok = len(value) <= 63 and bool(LABEL_RE.fullmatch(value))
        rule = "a DNS-1123 label: at most 63 of a-z, 0-9 and '-', starting and ending alphanumeric"
    else:
        ok = len(value) <= 253 and bool(K8S_SUBDOMAIN_RE.fullmatch(value))
        rule = (
            "a DNS-1123 subdomain: at most 253 of a-z, 0-9, '-' and '.', starting and ending "
            "alphanumeric"
        )
    if not ok:
        raise InvalidArgument(
            f"{key} is {quote(value)}, which is not a valid Kubernetes value: it must be {rule}; "
            "the volume context did not come from kubelet",
            key,
        )
    return value
