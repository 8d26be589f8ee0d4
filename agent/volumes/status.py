"""A read-only snapshot of every volume for `cert-agent status`: what an operator needs, no secrets.

Each entry is built field by field from the metadata, the parsed spec and the renewal bookkeeping;
the volume context (which may hold a PKCS#12 password) and the payload (the key) are never copied
into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import AgentError
from agent.spec.attributes import parse_volume_context
from agent.spec.model import CertificateSpec, KeyAlgorithm
from agent.volumes.store import VolumeMeta, VolumeState

# States, in the order an operator should look at them.
EXPIRED = "expired"
BACKOFF = "backoff"  # renewals are failing; retried with exponential backoff
RENEWING = "renewing"  # past its renewal time, waiting for (or in) a renewal worker
ISSUING = "issuing"  # the first issue has not finished
READY = "ready"


def openssl_serial(serial_hex: str | None) -> str:
    """The serial as ``openssl x509 -serial`` prints it: upper-case hex, whole bytes."""
    if not serial_hex:
        return ""
    text = format(int(serial_hex, 16), "X")
    return text if len(text) % 2 == 0 else "0" + text


def key_type(spec: CertificateSpec) -> str:
    if spec.key.algorithm == KeyAlgorithm.ED25519:
        return "Ed25519"
    if spec.key.algorithm == KeyAlgorithm.ECDSA:
        return f"ECDSA P-{spec.key.size}"
    return f"RSA {spec.key.size}"


def volume_status(
    meta: VolumeMeta, failures: Any, next_attempt: float | None, now: float
) -> dict[str, Any]:
    """One volume's status entry (``failures``: a RenewalFailures or None)."""
    context = meta.volume_context
    try:
        spec, _pod = parse_volume_context(context, meta.node_id)
        key = key_type(spec)
    except AgentError:
        key = "unknown"
    count = 0 if failures is None else int(failures.count)
    next_renewal = meta.next_renewal
    if next_attempt is not None and (next_renewal is None or next_attempt > next_renewal):
        next_renewal = next_attempt  # a retry after a failure: when it will really happen
    past_renewal = (
        meta.state == VolumeState.READY
        and meta.next_renewal is not None
        and meta.next_renewal <= now
    )
    if meta.state != VolumeState.READY:
        state = ISSUING
    elif meta.not_after is not None and meta.not_after <= now:
        state = EXPIRED
    elif count:
        state = BACKOFF
    elif past_renewal:
        state = RENEWING
    else:
        state = READY
    return {
        "volume_id": meta.volume_id,
        "namespace": context.get("csi.storage.k8s.io/pod.namespace", ""),
        "pod": context.get("csi.storage.k8s.io/pod.name", ""),
        "issuer": meta.issuer,
        "key_type": key,
        "serial": openssl_serial(meta.serial),
        "not_before": meta.not_before,
        "not_after": meta.not_after,
        "seconds_left": None if meta.not_after is None else meta.not_after - now,
        "renewal_time": meta.next_renewal,
        "next_renewal": next_renewal,
        "past_renewal": past_renewal,
        "state": state,
        "consecutive_failures": count,
        "last_error": "" if failures is None else str(failures.last_error),
    }


def snapshot(
    metas: list[VolumeMeta],
    failures: Mapping[str, Any],
    next_attempt: Callable[[str], float | None],
    now: float,
    node_id: str,
) -> dict[str, Any]:
    """Every volume, sorted by time left (volumes without a certificate first)."""
    volumes = [
        volume_status(meta, failures.get(meta.volume_id), next_attempt(meta.volume_id), now)
        for meta in metas
    ]
    volumes.sort(key=lambda v: (v["seconds_left"] is not None, v["seconds_left"] or 0.0))
    return {"node": node_id, "time": now, "volumes": volumes}
