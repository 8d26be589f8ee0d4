"""Expansion of ``${POD_NAME}``-style variables in volume attribute values.

Kubelet tells the agent which pod a volume belongs to; pod authors use that to template per-pod
names (``${POD_NAME}.${POD_NAMESPACE}.svc``). Expansion is a single pass: a value produced by a
variable is never expanded again. A ``$`` that is followed by neither ``{`` nor a letter or ``_``
is plain text.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable

from agent.errors import InvalidArgument, shorten
from agent.spec.model import PodInfo

# Variable name -> where its value comes from (for the "not available" message).
KNOWN_VARIABLES: dict[str, str] = {
    "POD_NAME": "csi.storage.k8s.io/pod.name",
    "POD_NAMESPACE": "csi.storage.k8s.io/pod.namespace",
    "POD_UID": "csi.storage.k8s.io/pod.uid",
    "SERVICE_ACCOUNT_NAME": "csi.storage.k8s.io/serviceAccount.name",
    "NODE_NAME": "the agent's --node-id",
    "POD_IP": "the pod's status (the pod watch)",
    "POD_IPS": "the pod's status (the pod watch)",
}
# The pod has no IP when its volumes are mounted: these are only whole entries of ip-sans,
# filled in from the pod watch (agent.spec.model.CertificateSpec.with_pod_ips).
POD_IP_VARIABLES = frozenset({"POD_IP", "POD_IPS"})


def quote(value: str) -> str:
    """A value as it is shown in messages: quoted, control characters escaped, shortened
    (kubelet events are short; never echo a 4 KiB value back in full)."""
    shown = shorten(value)
    # Lone surrogates (not valid UTF-8) are escaped so the message can go over gRPC.
    return json.dumps(shown, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()


def _known_list() -> str:
    return ", ".join("${" + name + "}" for name in KNOWN_VARIABLES)


def _value_of(name: str, pod: PodInfo, node_name: str) -> str | None:
    return {
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "POD_UID": pod.uid,
        "SERVICE_ACCOUNT_NAME": pod.service_account,
        "NODE_NAME": node_name,
    }.get(name)


def _is_name_start(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _is_name_char(ch: str) -> bool:
    return _is_name_start(ch) or ("0" <= ch <= "9")


def _substitute(name: str, value: str, pod: PodInfo, attribute: str, node_name: str) -> str:
    if name in POD_IP_VARIABLES:
        raise InvalidArgument(
            f"{attribute}: ${{{name}}} in {quote(value)} is not allowed here: the pod's IPs "
            "can only be IP SANs; write it as a whole entry of ip-sans (ip-sans: "
            f'"${{{name}}}")',
            attribute,
        )
    result = _value_of(name, pod, node_name)
    if result is None:
        hint = ""
        close = difflib.get_close_matches(name.strip().upper(), list(KNOWN_VARIABLES), n=1)
        if close:
            hint = f" (did you mean ${{{close[0]}}}?)"
        raise InvalidArgument(
            f"{attribute}: unknown variable {quote(name)} in {quote(value)}{hint}; "
            f"known variables: {_known_list()}",
            attribute,
        )
    if not result and name == "NODE_NAME":
        raise InvalidArgument(
            f"{attribute}: ${{NODE_NAME}} is used in {quote(value)} but the node's name is not "
            "known here",
            attribute,
        )
    if not result:
        raise InvalidArgument(
            f"{attribute}: ${{{name}}} is used in {quote(value)} but kubelet did not send "
            f"{KNOWN_VARIABLES[name]}; make sure the CSIDriver object sets podInfoOnMount: true",
            attribute,
        )
    return result


def _unchanged(text: str) -> str:
    return text


def rfc4514_escape(value: str) -> str:
    """Escape a value for an RFC 4514 distinguished name, so it stays one attribute value."""
    # Every special character is escaped wherever it is: a backslash pair is valid anywhere,
    # and the expanded text may sit at the start or end of the attribute value.
    return "".join(
        "\\00" if ch == "\x00" else "\\" + ch if ch in '\\",+;<>=# ' else ch for ch in value
    )


def expand_entries(
    value: str, pod: PodInfo, attribute: str, node_name: str = ""
) -> tuple[str, ...]:
    """Split a comma-separated list, then expand each entry (trimmed) on its own.

    Splitting first means a pod value can never add an entry, whatever characters it holds.
    """
    return tuple(
        expand_template(entry.strip(), pod, attribute, node_name) for entry in value.split(",")
    )


def expand_template(
    value: str,
    pod: PodInfo,
    attribute: str,
    node_name: str = "",
    escape: Callable[[str], str] | None = None,
) -> str:
    """Replace ``${VAR}`` and ``$VAR`` with the pod's values (passed through ``escape``).

    ``attribute`` is the full key as the user wrote it; every error names it. Unknown variables,
    ``${}`` and an unterminated ``${`` raise InvalidArgument.
    """
    escaped = escape if escape is not None else _unchanged
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch != "$" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = value[i + 1]
        if nxt == "{":
            end = value.find("}", i + 2)
            if end < 0:
                raise InvalidArgument(
                    f'{attribute}: unterminated "${{" at position {i} in {quote(value)}; '
                    f"write variables as ${{POD_NAME}}; known variables: {_known_list()}",
                    attribute,
                )
            name = value[i + 2 : end]
            if not name:
                raise InvalidArgument(
                    f'{attribute}: empty variable "${{}}" in {quote(value)}; '
                    f"known variables: {_known_list()}",
                    attribute,
                )
            out.append(escaped(_substitute(name, value, pod, attribute, node_name)))
            i = end + 1
        elif _is_name_start(nxt):
            end = i + 1
            while end < n and _is_name_char(value[end]):
                end += 1
            out.append(escaped(_substitute(value[i + 1 : end], value, pod, attribute, node_name)))
            i = end
        else:
            out.append(ch)
            i += 1
    return "".join(out)
