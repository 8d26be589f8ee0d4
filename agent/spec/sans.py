"""The subject alternative names: dns-names, ip-sans, uri-sans, email-sans, other-names."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

from cryptography import x509

from agent.spec.attribute_state import (
    LABEL_RE,
    Attr,
    ParseState,
    dedupe,
    has_control,
    split_list,
)
from agent.spec.model import OtherName, PodIPSans
from agent.spec.templating import POD_IP_VARIABLES, quote

_OID_RE = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_EMAIL_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def dns_names(state: ParseState) -> tuple[str, ...]:
    attr = state.attrs.get("dns-names")
    if attr is None:
        return ()
    return dedupe(
        [
            _normalise_dns_name(attr, entry, allow_wildcard=True, what="DNS name")
            for entry in split_list(attr)
        ]
    )


def ip_addresses(state: ParseState) -> tuple[str, ...]:
    attr = state.attrs.get("ip-sans")
    if attr is None:
        return ()
    result = []
    for entry in split_list(attr):
        variable = entry[2:-1] if entry.startswith("${") and entry.endswith("}") else entry[1:]
        if entry.startswith("$") and variable in POD_IP_VARIABLES:
            # Filled in from the pod watch once the pod has an IP; "all" wins over "primary".
            if state.pod_ip_sans is not PodIPSans.ALL:
                state.pod_ip_sans = PodIPSans(variable)
            continue
        if "$" in entry:
            attr.fail(
                f"{quote(entry)}: ip-sans takes IP addresses and, as whole entries, "
                "${POD_IP} (the pod's primary IP) or ${POD_IPS} (all of its IPs)"
            )
        try:
            address = ipaddress.ip_address(entry)
        except ValueError:
            attr.fail(f"{quote(entry)} is not an IPv4 or IPv6 address")
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            attr.fail(f"{quote(entry)} has a zone (%...), which a certificate cannot hold")
        result.append(address.compressed)
    return dedupe(result)


def uris(state: ParseState) -> tuple[str, ...]:
    attr = state.attrs.get("uri-sans")
    if attr is None:
        return ()
    return dedupe([_check_uri(attr, entry) for entry in split_list(attr)])


def emails(state: ParseState) -> tuple[str, ...]:
    attr = state.attrs.get("email-sans")
    if attr is None:
        return ()
    result = []
    for entry in split_list(attr):
        local, at, domain = entry.rpartition("@")
        rule = "an email address is local@domain"
        if not at or not local:
            attr.fail(f"{quote(entry)} is not a valid email address: {rule}")
        if len(local) > 64 or not _EMAIL_LOCAL_RE.fullmatch(local):
            attr.fail(
                f"{quote(entry)} is not a valid email address: the part before '@' must be "
                "at most 64 characters of letters, digits, dots (not leading, trailing or "
                "doubled) and !#$%&'*+/=?^_`{|}~-"
            )
        domain = _normalise_dns_name(attr, domain, allow_wildcard=False, what="email domain")
        result.append(f"{local}@{domain}")
    return dedupe(result)


def other_names(state: ParseState) -> tuple[OtherName, ...]:
    attr = state.attrs.get("other-names")
    if attr is None:
        return ()
    result = []
    for entry in split_list(attr):
        oid, eq, value = entry.partition("=")
        oid, value = oid.strip(), value.strip()
        if not eq or not value:
            attr.fail(
                f"{quote(entry)} is not an otherName: write OID=value, as in "
                "2.5.4.3=${POD_NAME}.node.es.default.es.local"
            )
        if not _valid_oid(oid):
            attr.fail(
                f"{quote(oid)} in {quote(entry)} is not an OID: use dotted decimal with at "
                "least two arcs, the first 0, 1 or 2 (and the second at most 39 unless the "
                "first is 2), as in 2.5.4.3"
            )
        if has_control(value):
            attr.fail(f"{quote(entry)} has control characters in its value")
        result.append(OtherName(oid=oid, value=value))
    return dedupe(result)


def _dns_name_problem(name: str, *, allow_wildcard: bool) -> str | None:
    """Why ``name`` (already lower case, trailing dot removed) is not an RFC 1123 name, or None."""
    if not name:
        return "is empty"
    if len(name) > 253:
        return f"is {len(name)} characters long; a DNS name has at most 253"
    labels = name.split(".")
    for index, label in enumerate(labels):
        if "*" in label:
            if label == "*" and index == 0 and allow_wildcard and len(labels) > 1:
                continue
            where = "may not contain wildcards" if not allow_wildcard else "has a misplaced '*'"
            return (
                f"{where}: a wildcard is allowed only as the whole first label, as in *.example.com"
            )
        if not label:
            return "has an empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"has a label of {len(label)} characters; a label has at most 63"
        if not LABEL_RE.fullmatch(label):
            if label.startswith("-") or label.endswith("-"):
                return f"has label {quote(label)} that starts or ends with '-'"
            bad = next(ch for ch in label if not (ch.isascii() and (ch.isalnum() or ch == "-")))
            return (
                f"has label {quote(label)} with {quote(bad)}; labels may only hold a-z, 0-9 and '-'"
            )
    return None


def _normalise_dns_name(attr: Attr, entry: str, *, allow_wildcard: bool, what: str) -> str:
    if not entry.isascii():
        attr.fail(f"{quote(entry)} is not a valid {what}: use the punycode (xn--) form of IDNs")
    name = entry.lower()
    if name.endswith("."):
        name = name[:-1]
    problem = _dns_name_problem(name, allow_wildcard=allow_wildcard)
    if problem is None:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return name
        problem = "is an IP address; put it in ip-sans instead"
    attr.fail(f"{quote(entry)} is not a valid {what}: it {problem}")


def _valid_oid(oid: str) -> bool:
    if not _OID_RE.fullmatch(oid):
        return False
    arcs = [int(arc) for arc in oid.split(".")]
    if arcs[0] < 2 and arcs[1] > 39:
        return False
    try:
        x509.ObjectIdentifier(oid)
    except ValueError:
        return False
    return True


def _check_uri(attr: Attr, entry: str) -> str:
    rule = "use an absolute URI such as spiffe://cluster.local/ns/default/sa/app"
    if not entry.isascii():
        attr.fail(f"{quote(entry)} is not a valid URI: percent-encode non-ASCII characters")
    if any(ch.isspace() or has_control(ch) for ch in entry):
        attr.fail(f"{quote(entry)} is not a valid URI: it contains whitespace; {rule}")
    scheme, colon, rest = entry.partition(":")
    if not colon or not _SCHEME_RE.fullmatch(scheme) or not rest:
        attr.fail(f"{quote(entry)} is not an absolute URI (scheme:...); {rule}")
    try:
        parts = urllib.parse.urlsplit(entry)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        attr.fail(f"{quote(entry)} is not a valid URI ({exc}); {rule}")
    if rest.startswith("//") and not parts.netloc and scheme.lower() != "file":
        attr.fail(f"{quote(entry)} has an empty authority after '//'; {rule}")
    return entry
