"""Who signs and for how long: issuer-name/kind/group, duration and renew-before."""

from __future__ import annotations

import re

from agent.spec.attribute_state import K8S_SUBDOMAIN_RE, ParseState, whole_seconds
from agent.spec.model import DEFAULT_DURATION_SECONDS, IssuerRef
from agent.spec.templating import quote

_KIND_RE = re.compile(r"[A-Za-z0-9]+")


def duration(state: ParseState) -> int | None:
    attr = state.attrs.get("duration")
    return None if attr is None else whole_seconds(attr, "duration")


def renew_before(state: ParseState, duration: int | None) -> int | None:
    attr = state.attrs.get("renew-before")
    if attr is None:
        return None
    seconds = whole_seconds(attr, "renew-before")
    limit = duration if duration is not None else DEFAULT_DURATION_SECONDS
    if seconds >= limit:
        against = (
            f"{state.key_for('duration')} ({state.attrs['duration'].value.strip()})"
            if "duration" in state.attrs
            else f"the default duration ({DEFAULT_DURATION_SECONDS // 3600}h)"
        )
        attr.fail(f"{quote(attr.value)} must be shorter than {against}")
    return seconds


def issuer(state: ParseState) -> IssuerRef:
    name_attr = state.attrs.get("issuer-name")
    kind_attr = state.attrs.get("issuer-kind")
    group_attr = state.attrs.get("issuer-group")
    if name_attr is None:
        for attr in (kind_attr, group_attr):
            if attr is not None:
                attr.fail(
                    f"{attr.name} needs {state.key_for('issuer-name')}; without an issuer "
                    "name the agent's own issuer signs"
                )
        return IssuerRef()
    name = name_attr.value.strip()
    if len(name) > 253 or not K8S_SUBDOMAIN_RE.fullmatch(name):
        name_attr.fail(
            f"{quote(name_attr.value)} is not a valid Kubernetes object name: at most 253 "
            "characters of a-z, 0-9, '-' and '.', starting and ending with a letter or digit"
        )
    group = "cert-manager.io"
    if group_attr is not None:
        group = group_attr.value.strip()
        if len(group) > 253 or not K8S_SUBDOMAIN_RE.fullmatch(group):
            group_attr.fail(
                f"{quote(group_attr.value)} is not a valid API group: use a lower-case DNS "
                "subdomain such as cert-manager.io"
            )
    kind = "Issuer"
    if kind_attr is not None:
        kind = kind_attr.value.strip()
        if len(kind) > 63 or not _KIND_RE.fullmatch(kind):
            kind_attr.fail(
                f"{quote(kind_attr.value)} is not a valid kind: use Issuer, ClusterIssuer or "
                "the kind of an external issuer (letters and digits only)"
            )
        for known in ("Issuer", "ClusterIssuer"):
            if group == "cert-manager.io" and kind != known and kind.lower() == known.lower():
                kind_attr.fail(f"{quote(kind_attr.value)} is not a kind; did you mean {known}?")
    return IssuerRef(name=name, kind=kind, group=group)
