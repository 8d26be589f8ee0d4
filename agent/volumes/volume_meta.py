"""A volume's metadata (``meta.json``): its fields, their types on load, and the volume id rule."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent.errors import InvalidArgument

_VOLUME_ID_RE = re.compile(r"[A-Za-z0-9._-]+")


_MAX_VOLUME_ID = 128


class VolumeState(enum.StrEnum):
    ISSUING = "issuing"
    READY = "ready"


@dataclass
class VolumeMeta:
    """What the agent remembers about a published volume across restarts."""

    volume_id: str
    target_path: str
    # The request's attributes, re-parsed on restart; may contain a pkcs12 password.
    volume_context: dict[str, str] = field(repr=False)
    readonly: bool
    volume_mount_group: str | None
    node_id: str
    state: VolumeState
    issuer: str = "local"
    serial: str | None = None
    not_before: float | None = None  # unix seconds
    not_after: float | None = None
    next_renewal: float | None = None
    pending_request: str | None = None  # a cert-manager CertificateRequest still in flight
    mode: str = "mount"  # "mount" (payload bind-mounted) or "direct" (written into target_path)
    created_at: float = 0.0
    updated_at: float = 0.0
    # The pod IPs (from the pod watch) the current certificate carries for ${POD_IP}/${POD_IPS}.
    pod_ips: list[str] = field(default_factory=list)
    # The issuing CA (PEM), kept when ca.crt is a trust bundle with trust-bundle-include-issuer,
    # so a bundle change can rebuild ca.crt without reissuing.
    issuer_ca_pem: str = ""
    # What a restart needs from the attributes without parsing them (volumes/recovery_hint.py);
    # empty in metadata of older agents.
    recovery_hint: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # Not dataclasses.asdict (a deep copy, field by field) and no indent (which makes json
        # fall back to its pure-Python encoder): saved twice per publish, this was a tenth of
        # the agent's own time. Every field is a str, number, bool, None or a str->str dict.
        data = {name: getattr(self, name) for name in _META_FIELDS}
        data["state"] = str(self.state)
        return json.dumps(data, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> VolumeMeta:
        """Parse metadata; raises ValueError when it is not a valid VolumeMeta document."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("metadata is not a JSON object")
        # Unknown keys are ignored so an older agent can read a newer agent's metadata.
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in _KNOWN_FIELDS}
        try:
            meta = cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"metadata has missing fields: {exc}") from None
        meta.state = VolumeState(meta.state)
        _check_types(meta)
        return meta


_META_FIELDS = tuple(f.name for f in dataclasses.fields(VolumeMeta))
_KNOWN_FIELDS = frozenset(_META_FIELDS)


def _check_types(meta: VolumeMeta) -> None:
    def want(name: str, ok: bool) -> None:
        if not ok:
            raise ValueError(f"metadata field {name!r} has the wrong type")

    for name in ("volume_id", "target_path", "node_id", "issuer", "mode"):
        want(name, isinstance(getattr(meta, name), str))
    for name in ("volume_mount_group", "serial", "pending_request"):
        value = getattr(meta, name)
        want(name, value is None or isinstance(value, str))
    for name in ("not_before", "not_after", "next_renewal"):
        value = getattr(meta, name)
        want(name, value is None or _is_number(value))
    for name in ("created_at", "updated_at"):
        want(name, _is_number(getattr(meta, name)))
    want("readonly", isinstance(meta.readonly, bool))
    want("recovery_hint", isinstance(meta.recovery_hint, dict))
    ctx = meta.volume_context
    want(
        "volume_context",
        isinstance(ctx, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()),
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_volume_id(volume_id: str) -> None:
    """Refuse ids that could not safely be a directory name."""
    if not isinstance(volume_id, str) or not volume_id:
        raise InvalidArgument("volume_id is required", "volume_id")
    ok = len(volume_id) <= _MAX_VOLUME_ID and volume_id not in (".", "..")
    if ok and _VOLUME_ID_RE.fullmatch(volume_id):
        return  # the common case, checked several times per publish: no message built
    shown = repr(volume_id[:_MAX_VOLUME_ID]) + ("..." if len(volume_id) > _MAX_VOLUME_ID else "")
    if len(volume_id) > _MAX_VOLUME_ID:
        raise InvalidArgument(
            f"volume_id {shown} is longer than {_MAX_VOLUME_ID} characters", "volume_id"
        )
    if not _VOLUME_ID_RE.fullmatch(volume_id) or volume_id in (".", ".."):
        raise InvalidArgument(
            f"volume_id {shown} may only contain letters, digits, '.', '_' and '-' "
            "and must not be '.' or '..'",
            "volume_id",
        )
