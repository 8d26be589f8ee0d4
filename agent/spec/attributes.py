"""Turn a CSI ``volume_context`` into a validated CertificateSpec (README.md, "Volume attributes").

Pure functions: no I/O. Every problem becomes an InvalidArgument whose message names the
attribute by the full key the user wrote (``csi.cert-manager.io/dns-names``), shows the offending
value and says the rule, because kubelet shows that message in the pod's events. Independent
problems are reported together so a pod author can fix them in one go. The PKCS#12 password is
never part of a message.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.errors import InvalidArgument
from agent.spec import issuer_and_lifetime, key_attributes, output_files, sans
from agent.spec import subject as subject_attributes
from agent.spec.attribute_names import (
    ATTRIBUTE_NAMES,
    COMPAT_PREFIX,
    IDENTITY_ATTRIBUTES,
    LIST_ATTRIBUTES,
    MAX_ANNOTATION_BYTES,
    MAX_ANNOTATIONS,
    MAX_CONTEXT_BYTES,
    MAX_VALUE_BYTES,
    OWN_PREFIX,
    POD_INFO_PREFIX,
    TEMPLATED_ATTRIBUTES,
)
from agent.spec.attribute_state import NO_TEXT, Attr, ParseState, parse_bool
from agent.spec.context_keys import check_sizes, classify
from agent.spec.durations import parse_go_duration
from agent.spec.key_attributes import KEY_USAGES
from agent.spec.model import (
    DEFAULT_KEY_USAGES,
    CertificateSpec,
    IssuerRef,
    KeySpec,
    OtherName,
    PodInfo,
    PodIPSans,
    SubjectSpec,
    TrustBundleRef,
)
from agent.spec.pod_info import pod_info
from agent.spec.templating import (
    KNOWN_VARIABLES,
    expand_entries,
    expand_template,
    rfc4514_escape,
)
from agent.spec.trust import TRUST_ATTRIBUTES, parse_trust_bundle

__all__ = [
    "ATTRIBUTE_NAMES",
    "COMPAT_PREFIX",
    "KEY_USAGES",
    "KNOWN_VARIABLES",
    "MAX_ANNOTATIONS",
    "MAX_ANNOTATION_BYTES",
    "MAX_CONTEXT_BYTES",
    "MAX_VALUE_BYTES",
    "OWN_PREFIX",
    "POD_INFO_PREFIX",
    "TEMPLATED_ATTRIBUTES",
    "expand_template",
    "parse_go_duration",
    "parse_volume_context",
]

_NO_OTHER_NAMES: tuple[OtherName, ...] = ()


def _expand(state: ParseState, pod: PodInfo) -> None:
    """Expand templates; list attributes are split first and each entry expanded alone."""
    for name in TEMPLATED_ATTRIBUTES & set(state.attrs):
        attr = state.attrs[name]
        if name in LIST_ATTRIBUTES:
            entries = state.attempt(None, expand_entries, attr.raw, pod, attr.key, state.node_name)
            if entries is None:
                del state.attrs[name]
            else:
                state.attrs[name] = Attr(name, attr.key, attr.raw, ",".join(entries), entries)
            continue
        escape = rfc4514_escape if name == "literal-subject" else None
        expanded = state.attempt(
            None, expand_template, attr.raw, pod, attr.key, state.node_name, escape
        )
        if expanded is None:
            del state.attrs[name]
        else:
            state.attrs[name] = Attr(name, attr.key, attr.raw, expanded)


def _trust_bundle(state: ParseState) -> TrustBundleRef | None:
    given = {n: (a.key, a.value) for n, a in state.attrs.items() if n in TRUST_ATTRIBUTES}
    return parse_trust_bundle(given)


def _require_identity(state: ParseState, ip_addresses: tuple[str, ...]) -> None:
    others = [n for n in IDENTITY_ATTRIBUTES if n in state.attrs and n != "ip-sans"]
    if state.pod_ip_sans is not PodIPSans.NONE and not ip_addresses and not others:
        # The first certificate is issued before the pod has an IP: it needs another name.
        raise InvalidArgument(
            f"{state.key_for('ip-sans')}: the pod has no IP yet when the volume is mounted, "
            f"so the first certificate needs another name: set "
            f"{state.key_for('common-name')} or {state.key_for('dns-names')} too",
            state.key_for("ip-sans"),
        )
    if not any(name in state.attrs for name in IDENTITY_ATTRIBUTES):
        keys = ", ".join(state.key_for(name) for name in IDENTITY_ATTRIBUTES)
        raise InvalidArgument(f"the certificate would identify nothing: set at least one of {keys}")


def _build(state: ParseState) -> CertificateSpec:
    """Every attribute family in turn, collecting all their problems before raising."""
    attempt = state.attempt
    issuer = attempt(IssuerRef(), issuer_and_lifetime.issuer, state)
    subject = attempt(SubjectSpec(), subject_attributes.subject, state)
    dns_names = attempt(NO_TEXT, sans.dns_names, state)
    ip_addresses = attempt(NO_TEXT, sans.ip_addresses, state)
    uris = attempt(NO_TEXT, sans.uris, state)
    emails = attempt(NO_TEXT, sans.emails, state)
    other_names = attempt(_NO_OTHER_NAMES, sans.other_names, state)
    duration = attempt(None, issuer_and_lifetime.duration, state)
    duration_ok = "duration" not in state.attrs or duration is not None
    renew_before = (
        attempt(None, issuer_and_lifetime.renew_before, state, duration) if duration_ok else None
    )
    key = attempt(KeySpec(), key_attributes.key, state)
    key_usages = attempt(DEFAULT_KEY_USAGES, key_attributes.key_usages, state)
    is_ca = attempt(False, parse_bool, state.attrs.get("is-ca"))
    fs_group = attempt(None, output_files.fs_group, state)
    files, pkcs12 = output_files.files_and_pkcs12(state)
    trust_bundle = attempt(None, _trust_bundle, state)
    if not state.errors:  # otherwise it is most likely a consequence of those errors
        attempt(None, _require_identity, state, ip_addresses)
    state.raise_collected()
    return CertificateSpec(
        issuer=issuer,
        subject=subject,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        uris=uris,
        emails=emails,
        other_names=other_names,
        duration_seconds=duration,
        renew_before_seconds=renew_before,
        key=key,
        key_usages=key_usages,
        is_ca=is_ca,
        files=files,
        fs_group=fs_group,
        pkcs12=pkcs12,
        annotations=tuple(sorted(state.annotations.items())),
        pod_ip_sans=state.pod_ip_sans,
        trust_bundle=trust_bundle,
    )


def parse_volume_context(
    volume_context: Mapping[str, str], node_name: str = ""
) -> tuple[CertificateSpec, PodInfo]:
    """Validate ``volume_context`` and return what the volume asks for and whose pod it is.

    ``node_name`` is the value of ``${NODE_NAME}`` (the agent's --node-id). Raises
    InvalidArgument (never anything else for string input) naming the offending key.
    """
    state = ParseState(volume_context, node_name)
    check_sizes(state)
    pod = pod_info(volume_context)
    classify(state)
    _expand(state, pod)
    return _build(state), pod
