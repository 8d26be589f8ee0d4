"""Turn a CSI ``volume_context`` into a validated CertificateSpec (README.md, "Volume attributes").

Pure functions: no I/O. Every problem becomes an InvalidArgument whose message names the
attribute by the full key the user wrote (``csi.cert-manager.io/dns-names``), shows the offending
value and says the rule, because kubelet shows that message in the pod's events. Independent
problems are reported together so a pod author can fix them in one go. The PKCS#12 password is
never part of a message.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn, ParamSpec, TypeVar

from cryptography import x509

from agent.errors import InvalidArgument, shorten
from agent.spec.durations import parse_go_duration, parse_go_duration_ns
from agent.spec.model import (
    DEFAULT_DURATION_SECONDS,
    DEFAULT_KEY_USAGES,
    CertificateSpec,
    FileNames,
    IssuerRef,
    KeyAlgorithm,
    KeyEncoding,
    KeySpec,
    OtherName,
    Pkcs12Spec,
    PodInfo,
    PodIPSans,
    SubjectSpec,
    TrustBundleRef,
)
from agent.spec.templating import (
    KNOWN_VARIABLES,
    POD_IP_VARIABLES,
    expand_entries,
    expand_template,
    quote,
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

OWN_PREFIX = "csi.cert-agent.io/"
COMPAT_PREFIX = "csi.cert-manager.io/"
POD_INFO_PREFIX = "csi.storage.k8s.io/"
MAX_VALUE_BYTES = 4096
# Limits on what one volume may store in its metadata on the node's tmpfs (issue 8: 1,000
# annotations of 3.9 KB each filled it). An annotation key is at most a 253-character prefix, '/'
# and a 63-character name; cert-manager itself allows 256 KiB of annotations per object, far more
# than a per-pod CertificateRequest needs.
MAX_KEY_CHARS = 253 + 1 + 63
MAX_ANNOTATIONS = 32
MAX_ANNOTATION_BYTES = 8 * 1024
MAX_CONTEXT_BYTES = 32 * 1024
# 4294967295 is (gid_t)-1, which chown(2) reads as "leave the group alone": the files would stay
# root-owned and unreadable to the pod, so the largest usable group id is one less.
MAX_GROUP_ID = 4294967294

KEY_USAGES: frozenset[str] = frozenset(
    {
        "signing",
        "digital signature",
        "content commitment",
        "key encipherment",
        "key agreement",
        "data encipherment",
        "cert sign",
        "crl sign",
        "encipher only",
        "decipher only",
        "any",
        "server auth",
        "client auth",
        "code signing",
        "email protection",
        "s/mime",
        "ipsec end system",
        "ipsec tunnel",
        "ipsec user",
        "timestamping",
        "ocsp signing",
        "microsoft sgc",
        "netscape sgc",
    }
)

# Subject list attributes -> (SubjectSpec field, upper bound in characters from RFC 5280 / X.520).
_SUBJECT_LISTS: dict[str, tuple[str, int]] = {
    "organizations": ("organizations", 64),
    "organizationalunits": ("organizational_units", 64),
    "countries": ("countries", 2),
    "provinces": ("provinces", 128),
    "localities": ("localities", 128),
    "streetaddresses": ("street_addresses", 128),
    "postalcodes": ("postal_codes", 40),
}

TEMPLATED_ATTRIBUTES: frozenset[str] = frozenset(
    {"common-name", "dns-names", "uri-sans", "email-sans", "other-names", "literal-subject"}
    | set(_SUBJECT_LISTS)
)

ATTRIBUTE_NAMES: frozenset[str] = (
    TEMPLATED_ATTRIBUTES
    | {
        "issuer-name",
        "issuer-kind",
        "issuer-group",
        "ip-sans",
        "serialnumber",
        "duration",
        "renew-before",
        "key-algorithm",
        "key-size",
        "key-encoding",
        "reuse-private-key",
        "key-usages",
        "is-ca",
        "certificate-file",
        "ca-file",
        "privatekey-file",
        "fs-group",
        "pkcs12-enable",
        "pkcs12-filename",
        "pkcs12-password",
        "credential-bundle-file",
    }
    | TRUST_ATTRIBUTES
)

# At least one of these must be present or the certificate names nothing.
_IDENTITY_ATTRIBUTES = (
    "common-name",
    "dns-names",
    "uri-sans",
    "email-sans",
    "ip-sans",
    "other-names",
    "literal-subject",
)
_SECRET_ATTRIBUTES = frozenset({"pkcs12-password"})
_POD_KEYS = {"pod.name": "name", "pod.namespace": "namespace", "pod.uid": "uid"}
# Templated attributes that hold comma-separated lists: split before expanding, so a value that
# comes from the pod (even one that got past the name rules) can never add an entry.
_LIST_ATTRIBUTES = frozenset({"dns-names", "uri-sans", "email-sans", "other-names"}) | frozenset(
    {"organizations", "organizationalunits", "countries", "provinces", "localities"}
    | {"streetaddresses", "postalcodes"}
)

_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_K8S_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_K8S_NAME_PART_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_KIND_RE = re.compile(r"[A-Za-z0-9]+")
_DIGITS_RE = re.compile(r"[0-9]+")
_OID_RE = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_EMAIL_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_PRINTABLE_RE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]+")

T = TypeVar("T")
P = ParamSpec("P")
_NO_TEXT: tuple[str, ...] = ()
_NO_OTHER_NAMES: tuple[OtherName, ...] = ()


# --- small helpers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attr:
    """One of our attributes: the key as written, the raw value and the value after templating."""

    name: str
    key: str
    raw: str
    value: str
    # A list attribute's entries, each expanded on its own (see _LIST_ATTRIBUTES).
    entries: tuple[str, ...] | None = None

    def fail(self, detail: str) -> NoReturn:
        origin = ""
        if self.value != self.raw:
            origin = f" (after templating {quote(self.raw)})"
        raise InvalidArgument(f"{self.key}: {detail}{origin}", self.key)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def _split_list(attr: _Attr) -> list[str]:
    """Comma-separated entries, trimmed; an empty entry is a mistake, not something to skip."""
    if attr.entries is not None:
        entries = list(attr.entries)
    else:
        entries = [entry.strip() for entry in attr.value.split(",")]
    if any(not entry for entry in entries):
        attr.fail(f"empty entry in {quote(attr.value)}; remove the extra comma")
    return entries


def _dedupe(items: list[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(items))


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
        if not _LABEL_RE.fullmatch(label):
            if label.startswith("-") or label.endswith("-"):
                return f"has label {quote(label)} that starts or ends with '-'"
            bad = next(ch for ch in label if not (ch.isascii() and (ch.isalnum() or ch == "-")))
            return (
                f"has label {quote(label)} with {quote(bad)}; labels may only hold a-z, 0-9 and '-'"
            )
    return None


def _normalise_dns_name(attr: _Attr, entry: str, *, allow_wildcard: bool, what: str) -> str:
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


def _parse_bool(attr: _Attr | None) -> bool:
    if attr is None:
        return False
    text = attr.value.strip().lower()
    if text not in ("true", "false"):
        attr.fail(f'{quote(attr.value)} is not a boolean; use "true" or "false"')
    return text == "true"


def _parse_int(attr: _Attr, low: int, high: int, what: str) -> int:
    text = attr.value.strip()
    if not _DIGITS_RE.fullmatch(text) or not low <= int(text) <= high:
        attr.fail(f"{quote(attr.value)} is not a valid {what}: use an integer from {low} to {high}")
    return int(text)


def _closest(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word.lower(), sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


# --- the parser ----------------------------------------------------------------------------------


class _Parser:
    def __init__(self, volume_context: Mapping[str, str], node_name: str = "") -> None:
        self.context = volume_context
        self.node_name = node_name
        self.pod_ip_sans = PodIPSans.NONE
        self.errors: list[InvalidArgument] = []
        self.attrs: dict[str, _Attr] = {}
        self.annotations: dict[str, str] = {}
        self.prefix = OWN_PREFIX

    # Collect an error and carry on with a stand-in value, so all problems are reported at once.
    def attempt(self, fallback: T, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except InvalidArgument as exc:
            self.errors.append(exc)
            return fallback

    def raise_collected(self) -> None:
        if not self.errors:
            return
        if len(self.errors) == 1:
            raise self.errors[0]
        shown = [e.message for e in self.errors[:6]]
        if len(self.errors) > 6:
            shown.append(f"and {len(self.errors) - 6} more")
        raise InvalidArgument(
            f"{len(self.errors)} problems with the volume attributes: " + "; ".join(shown),
            self.errors[0].attribute,
        )

    def key_for(self, name: str) -> str:
        """The key for ``name`` as the user wrote it, or as they would write it."""
        attr = self.attrs.get(name)
        return attr.key if attr else self.prefix + name

    # -- step 1: sizes and pod info

    def check_sizes(self) -> None:
        total = 0
        for key in sorted(self.context):
            value = self.context[key]
            try:
                key_size = len(key.encode("utf-8"))
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidArgument(
                    f"{quote(key)}: key or value is not valid UTF-8", shorten(key)
                ) from None
            if len(key) > MAX_KEY_CHARS:
                raise InvalidArgument(
                    f"volume attribute key {quote(key)} is {len(key)} characters long; at most "
                    f"{MAX_KEY_CHARS} are allowed (a 253-character prefix, '/', a 63-character "
                    "name)",
                    shorten(key),
                )
            if size > MAX_VALUE_BYTES:
                raise InvalidArgument(
                    f"{key}: value is {size} bytes long; at most {MAX_VALUE_BYTES} are allowed", key
                )
            total += key_size + size
        if total > MAX_CONTEXT_BYTES:
            raise InvalidArgument(
                f"the volume attributes take {total} bytes (keys and values); at most "
                f"{MAX_CONTEXT_BYTES} are allowed per volume"
            )

    def pod_info(self) -> PodInfo:
        """The pod's identity, each value checked against the Kubernetes name rules first.

        kubelet fills these in, but anything that can reach the socket can send them, and they
        end up in certificates through templates: a "name" such as ``a,evil.example.com`` must
        be refused, not expanded.
        """
        fields: dict[str, str] = {}
        for suffix, field_name in _POD_KEYS.items():
            key = POD_INFO_PREFIX + suffix
            value = self.context.get(key, "")
            if not value.strip():
                raise InvalidArgument(
                    f"{key} is missing from the volume context; the CSIDriver object must set "
                    "podInfoOnMount: true so kubelet sends the pod's identity",
                    key,
                )
            fields[field_name] = _check_pod_value(key, value)
        ephemeral_key = POD_INFO_PREFIX + "ephemeral"
        ephemeral = self.context.get(ephemeral_key)
        if ephemeral is not None and ephemeral.strip().lower() != "true":
            raise InvalidArgument(
                f"{ephemeral_key} is {quote(ephemeral)}: only inline ephemeral volumes are "
                "supported; declare the volume inline in the pod spec (csi: driver: ...)",
                ephemeral_key,
            )
        account_key = POD_INFO_PREFIX + "serviceAccount.name"
        account = self.context.get(account_key, "")
        account = _check_pod_value(account_key, account) if account.strip() else ""
        return PodInfo(service_account=account, **fields)

    # -- step 2: sort keys into ours, foreign annotations and mistakes

    def classify(self) -> None:
        seen: dict[str, str] = {}
        conflicts: set[str] = set()
        counts = {OWN_PREFIX: 0, COMPAT_PREFIX: 0}
        for key in sorted(self.context):
            value = self.context[key]
            if key.startswith(POD_INFO_PREFIX):
                continue
            prefix = next((p for p in (OWN_PREFIX, COMPAT_PREFIX) if key.startswith(p)), None)
            if prefix is None:
                self.attempt(None, self.foreign, key, value)
                continue
            counts[prefix] += 1
            name = key[len(prefix) :]
            if name not in ATTRIBUTE_NAMES:
                close = _closest(name, ATTRIBUTE_NAMES)
                hint = f" (did you mean {prefix}{close}?)" if close else ""
                self.errors.append(
                    InvalidArgument(f"unknown volume attribute {quote(key)}{hint}", key)
                )
                continue
            if name in seen:
                conflicts.add(name)
                self.errors.append(
                    InvalidArgument(
                        f"{seen[name]} and {key} are both set; use only one of the two prefixes",
                        key,
                    )
                )
                continue
            seen[name] = key
            # An empty value means "not set", as in cert-manager's csi-driver.
            empty = value == "" if name in _SECRET_ATTRIBUTES else not value.strip()
            if not empty:
                self.attrs[name] = _Attr(name, key, value, value)
        for name in conflicts:  # a conflict must not leave one side in use
            self.attrs.pop(name, None)
        self.check_annotation_limits()
        if counts[COMPAT_PREFIX] > counts[OWN_PREFIX]:
            self.prefix = COMPAT_PREFIX

    def check_annotation_limits(self) -> None:
        """Attributes under other prefixes are stored per volume and sent to cert-manager: cap
        how many and how big, so a pod cannot fill the node's tmpfs with them."""
        count = len(self.annotations)
        size = sum(len(k.encode()) + len(v.encode()) for k, v in self.annotations.items())
        first = min(self.annotations, default=None)
        if count > MAX_ANNOTATIONS:
            self.errors.append(
                InvalidArgument(
                    f"{count} attributes under other prefixes (passed on as CertificateRequest "
                    f"annotations); at most {MAX_ANNOTATIONS} are allowed per volume",
                    first,
                )
            )
        elif size > MAX_ANNOTATION_BYTES:
            self.errors.append(
                InvalidArgument(
                    f"the attributes under other prefixes (passed on as CertificateRequest "
                    f"annotations) take {size} bytes; at most {MAX_ANNOTATION_BYTES} are allowed "
                    "per volume",
                    first,
                )
            )

    def foreign(self, key: str, value: str) -> None:
        if "/" not in key:
            close = _closest(key, ATTRIBUTE_NAMES)
            hint = f" (did you mean {OWN_PREFIX}{close}?)" if close else ""
            raise InvalidArgument(
                f"unknown volume attribute {quote(key)}{hint}; attributes are named "
                f"{OWN_PREFIX}<name> or {COMPAT_PREFIX}<name>",
                key,
            )
        prefix, _, name = key.partition("/")
        # A misspelt prefix must not turn a SAN into a harmless-looking annotation.
        ratio, ours = max(
            (difflib.SequenceMatcher(None, prefix.lower() + "/", p).ratio(), p)
            for p in (OWN_PREFIX, COMPAT_PREFIX)
        )
        if name.lower() in ATTRIBUTE_NAMES and ratio >= 0.8:
            raise InvalidArgument(
                f"unknown volume attribute {quote(key)} (did you mean {ours}{name.lower()}?)", key
            )
        if (
            len(prefix) > 253
            or not _K8S_SUBDOMAIN_RE.fullmatch(prefix)
            or len(name) > 63
            or not _K8S_NAME_PART_RE.fullmatch(name)
        ):
            raise InvalidArgument(
                f"{quote(key)} is not a valid annotation key (prefix/name: a DNS subdomain, '/', "
                "then at most 63 of A-Z, a-z, 0-9, '-', '_', '.'); attributes under other "
                "prefixes are passed on as CertificateRequest annotations",
                key,
            )
        self.annotations[key] = value

    # -- step 3: templating

    def expand(self, pod: PodInfo) -> None:
        """Expand templates; list attributes are split first and each entry expanded alone."""
        for name in TEMPLATED_ATTRIBUTES & set(self.attrs):
            attr = self.attrs[name]
            if name in _LIST_ATTRIBUTES:
                entries = self.attempt(
                    None, expand_entries, attr.raw, pod, attr.key, self.node_name
                )
                if entries is None:
                    del self.attrs[name]
                else:
                    self.attrs[name] = _Attr(name, attr.key, attr.raw, ",".join(entries), entries)
                continue
            escape = rfc4514_escape if name == "literal-subject" else None
            expanded = self.attempt(
                None, expand_template, attr.raw, pod, attr.key, self.node_name, escape
            )
            if expanded is None:
                del self.attrs[name]
            else:
                self.attrs[name] = _Attr(name, attr.key, attr.raw, expanded)

    # -- step 4: fields

    def dns_names(self) -> tuple[str, ...]:
        attr = self.attrs.get("dns-names")
        if attr is None:
            return ()
        return _dedupe(
            [
                _normalise_dns_name(attr, entry, allow_wildcard=True, what="DNS name")
                for entry in _split_list(attr)
            ]
        )

    def ip_addresses(self) -> tuple[str, ...]:
        attr = self.attrs.get("ip-sans")
        if attr is None:
            return ()
        result = []
        for entry in _split_list(attr):
            variable = entry[2:-1] if entry.startswith("${") and entry.endswith("}") else entry[1:]
            if entry.startswith("$") and variable in POD_IP_VARIABLES:
                # Filled in from the pod watch once the pod has an IP; "all" wins over "primary".
                if self.pod_ip_sans is not PodIPSans.ALL:
                    self.pod_ip_sans = PodIPSans(variable)
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
        return _dedupe(result)

    def uris(self) -> tuple[str, ...]:
        attr = self.attrs.get("uri-sans")
        if attr is None:
            return ()
        return _dedupe([_check_uri(attr, entry) for entry in _split_list(attr)])

    def emails(self) -> tuple[str, ...]:
        attr = self.attrs.get("email-sans")
        if attr is None:
            return ()
        result = []
        for entry in _split_list(attr):
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
        return _dedupe(result)

    def other_names(self) -> tuple[OtherName, ...]:
        attr = self.attrs.get("other-names")
        if attr is None:
            return ()
        result = []
        for entry in _split_list(attr):
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
            if _has_control(value):
                attr.fail(f"{quote(entry)} has control characters in its value")
            result.append(OtherName(oid=oid, value=value))
        return _dedupe(result)

    def subject(self) -> SubjectSpec:
        literal = self.attrs.get("literal-subject")
        common = self.attrs.get("common-name")
        serial = self.attrs.get("serialnumber")
        if literal is not None:
            others = [self.attrs[n] for n in ("common-name", *_SUBJECT_LISTS) if n in self.attrs]
            if serial is not None:
                others.append(serial)
            if others:
                literal.fail(
                    "cannot be combined with "
                    + ", ".join(a.key for a in others)
                    + "; put those fields into the literal subject instead"
                )
            return SubjectSpec(literal_subject=_check_literal_subject(literal))
        fields: dict[str, tuple[str, ...]] = {}
        for name, (field_name, limit) in _SUBJECT_LISTS.items():
            fields[field_name] = self.attempt(_NO_TEXT, self.subject_list, name, limit)
        common_name = None
        if common is not None:
            common_name = self.attempt(None, _check_text, common, common.value.strip(), 64)
        serial_number = None
        if serial is not None:
            serial_number = self.attempt(None, _check_serial, serial)
        return SubjectSpec(
            common_name=common_name,
            serial_number=serial_number,
            organizations=fields["organizations"],
            organizational_units=fields["organizational_units"],
            countries=fields["countries"],
            provinces=fields["provinces"],
            localities=fields["localities"],
            street_addresses=fields["street_addresses"],
            postal_codes=fields["postal_codes"],
        )

    def subject_list(self, name: str, limit: int) -> tuple[str, ...]:
        attr = self.attrs.get(name)
        if attr is None:
            return ()
        entries = _split_list(attr)
        if name == "countries":
            for entry in entries:
                if len(entry) != 2 or not entry.isascii() or not entry.isalpha():
                    attr.fail(f"{quote(entry)} is not a country: use ISO 3166 two-letter codes")
            return tuple(entry.upper() for entry in entries)
        return tuple(_check_text(attr, entry, limit) for entry in entries)

    def duration(self) -> int | None:
        attr = self.attrs.get("duration")
        return None if attr is None else _whole_seconds(attr, "duration")

    def renew_before(self, duration: int | None) -> int | None:
        attr = self.attrs.get("renew-before")
        if attr is None:
            return None
        seconds = _whole_seconds(attr, "renew-before")
        limit = duration if duration is not None else DEFAULT_DURATION_SECONDS
        if seconds >= limit:
            against = (
                f"{self.key_for('duration')} ({self.attrs['duration'].value.strip()})"
                if "duration" in self.attrs
                else f"the default duration ({DEFAULT_DURATION_SECONDS // 3600}h)"
            )
            attr.fail(f"{quote(attr.value)} must be shorter than {against}")
        return seconds

    def issuer(self) -> IssuerRef:
        name_attr = self.attrs.get("issuer-name")
        kind_attr = self.attrs.get("issuer-kind")
        group_attr = self.attrs.get("issuer-group")
        if name_attr is None:
            for attr in (kind_attr, group_attr):
                if attr is not None:
                    attr.fail(
                        f"{attr.name} needs {self.key_for('issuer-name')}; without an issuer "
                        "name the agent's own issuer signs"
                    )
            return IssuerRef()
        name = name_attr.value.strip()
        if len(name) > 253 or not _K8S_SUBDOMAIN_RE.fullmatch(name):
            name_attr.fail(
                f"{quote(name_attr.value)} is not a valid Kubernetes object name: at most 253 "
                "characters of a-z, 0-9, '-' and '.', starting and ending with a letter or digit"
            )
        group = "cert-manager.io"
        if group_attr is not None:
            group = group_attr.value.strip()
            if len(group) > 253 or not _K8S_SUBDOMAIN_RE.fullmatch(group):
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

    def key(self) -> KeySpec:
        alg_attr = self.attrs.get("key-algorithm")
        algorithm = KeyAlgorithm.RSA
        if alg_attr is not None:
            by_lower = {a.value.lower(): a for a in KeyAlgorithm}
            found = by_lower.get(alg_attr.value.strip().lower())
            if found is None:
                alg_attr.fail(
                    f"{quote(alg_attr.value)} is not supported: use RSA, ECDSA or Ed25519"
                )
            algorithm = found
        size_attr = self.attrs.get("key-size")
        size: int | None
        if algorithm is KeyAlgorithm.ED25519:
            if size_attr is not None:
                size_attr.fail("must not be set when the key algorithm is Ed25519")
            size = None
        elif algorithm is KeyAlgorithm.ECDSA:
            size = 256
            if size_attr is not None:
                text = size_attr.value.strip()
                if text not in ("256", "384", "521"):
                    size_attr.fail(f"{quote(text)} is not an ECDSA key size: use 256, 384 or 521")
                size = int(text)
        else:
            size = 2048
            if size_attr is not None:
                text = size_attr.value.strip()
                if alg_attr is None and text in ("256", "384", "521"):
                    size_attr.fail(
                        f"{quote(text)} is not an RSA key size (2048 to 8192); the key algorithm "
                        f"defaults to RSA: set {self.key_for('key-algorithm')}: ECDSA"
                    )
                size = _parse_int(size_attr, 2048, 8192, "RSA key size")
        enc_attr = self.attrs.get("key-encoding")
        encoding = KeyEncoding.PKCS1 if algorithm is KeyAlgorithm.RSA else KeyEncoding.PKCS8
        if enc_attr is not None:
            by_upper = {e.value: e for e in KeyEncoding}
            found_enc = by_upper.get(enc_attr.value.strip().upper())
            if found_enc is None:
                enc_attr.fail(f"{quote(enc_attr.value)} is not supported: use PKCS1 or PKCS8")
            if found_enc is KeyEncoding.PKCS1 and algorithm is not KeyAlgorithm.RSA:
                enc_attr.fail(f"PKCS1 holds only RSA keys; use PKCS8 for {algorithm.value} keys")
            encoding = found_enc
        reuse = _parse_bool(self.attrs.get("reuse-private-key"))
        return KeySpec(algorithm=algorithm, size=size, encoding=encoding, reuse=reuse)

    def key_usages(self) -> tuple[str, ...]:
        attr = self.attrs.get("key-usages")
        if attr is None:
            return DEFAULT_KEY_USAGES
        result = []
        for entry in _split_list(attr):
            usage = " ".join(entry.lower().split())
            if usage not in KEY_USAGES:
                close = _closest(usage, KEY_USAGES)
                hint = f" (did you mean {quote(close)}?)" if close else ""
                attr.fail(
                    f"{quote(entry)} is not a key usage{hint}; accepted: "
                    + ", ".join(sorted(KEY_USAGES))
                )
            result.append(usage)
        return _dedupe(result)

    def fs_group(self) -> int | None:
        attr = self.attrs.get("fs-group")
        return None if attr is None else _parse_int(attr, 1, MAX_GROUP_ID, "group id")

    def files_and_pkcs12(self) -> tuple[FileNames, Pkcs12Spec | None]:
        enable_attr = self.attrs.get("pkcs12-enable")
        enabled = self.attempt(False, _parse_bool, enable_attr)
        names: dict[str, str] = {}
        defaults = {
            "certificate-file": "tls.crt",
            "ca-file": "ca.crt",
            "privatekey-file": "tls.key",
            "pkcs12-filename": "keystore.p12",
        }
        for name, default in defaults.items():
            attr = self.attrs.get(name)
            names[name] = default if attr is None else self.attempt("", _file_name, attr)
        bundle_attr = self.attrs.get("credential-bundle-file")
        if bundle_attr is not None:
            names["credential-bundle-file"] = self.attempt("", _file_name, bundle_attr)
        pkcs12 = None
        enable_key = self.key_for("pkcs12-enable")
        if enabled:
            if "pkcs12-password" not in self.attrs:
                self.errors.append(
                    InvalidArgument(
                        f"{self.key_for('pkcs12-password')} is required when {enable_key} is true",
                        self.key_for("pkcs12-password"),
                    )
                )
            else:
                password = self.attrs["pkcs12-password"].raw
                pkcs12 = Pkcs12Spec(filename=names["pkcs12-filename"], password=password)
        else:
            del names["pkcs12-filename"]
            for name in ("pkcs12-password", "pkcs12-filename"):
                if name in self.attrs:
                    self.errors.append(
                        InvalidArgument(
                            f"{self.key_for(name)} is set but {enable_key} is not true; "
                            f'set {enable_key}: "true" or remove it',
                            self.key_for(name),
                        )
                    )
        by_file: dict[str, list[str]] = {}
        for name, file_name in names.items():
            if file_name:  # an invalid one is already reported
                by_file.setdefault(file_name, []).append(name)
        for file_name, users in by_file.items():
            if len(users) < 2:
                continue
            # Blame an attribute the user wrote, not a default.
            blamed = next((n for n in users if n in self.attrs), users[0])
            others = [
                self.key_for(n) if n in self.attrs else f"{n} (default)"
                for n in users
                if n != blamed
            ]
            self.errors.append(
                InvalidArgument(
                    f"{self.key_for(blamed)}: {quote(file_name)} is also used by "
                    f"{', '.join(others)}; every file in the volume needs its own name",
                    self.key_for(blamed),
                )
            )
        files = FileNames(
            certificate=names["certificate-file"],
            ca=names["ca-file"],
            private_key=names["privatekey-file"],
            credential_bundle=names.get("credential-bundle-file") or None,
        )
        return files, pkcs12

    def trust_bundle(self) -> TrustBundleRef | None:
        given = {n: (a.key, a.value) for n, a in self.attrs.items() if n in TRUST_ATTRIBUTES}
        return parse_trust_bundle(given)

    def require_identity(self, ip_addresses: tuple[str, ...]) -> None:
        others = [n for n in _IDENTITY_ATTRIBUTES if n in self.attrs and n != "ip-sans"]
        if self.pod_ip_sans is not PodIPSans.NONE and not ip_addresses and not others:
            # The first certificate is issued before the pod has an IP: it needs another name.
            raise InvalidArgument(
                f"{self.key_for('ip-sans')}: the pod has no IP yet when the volume is mounted, "
                f"so the first certificate needs another name: set "
                f"{self.key_for('common-name')} or {self.key_for('dns-names')} too",
                self.key_for("ip-sans"),
            )
        if not any(name in self.attrs for name in _IDENTITY_ATTRIBUTES):
            keys = ", ".join(self.key_for(name) for name in _IDENTITY_ATTRIBUTES)
            raise InvalidArgument(
                f"the certificate would identify nothing: set at least one of {keys}"
            )

    def build(self) -> CertificateSpec:
        issuer = self.attempt(IssuerRef(), self.issuer)
        subject = self.attempt(SubjectSpec(), self.subject)
        dns_names = self.attempt(_NO_TEXT, self.dns_names)
        ip_addresses = self.attempt(_NO_TEXT, self.ip_addresses)
        uris = self.attempt(_NO_TEXT, self.uris)
        emails = self.attempt(_NO_TEXT, self.emails)
        other_names = self.attempt(_NO_OTHER_NAMES, self.other_names)
        duration = self.attempt(None, self.duration)
        duration_ok = "duration" not in self.attrs or duration is not None
        renew_before = self.attempt(None, self.renew_before, duration) if duration_ok else None
        key = self.attempt(KeySpec(), self.key)
        key_usages = self.attempt(DEFAULT_KEY_USAGES, self.key_usages)
        is_ca = self.attempt(False, _parse_bool, self.attrs.get("is-ca"))
        fs_group = self.attempt(None, self.fs_group)
        files, pkcs12 = self.files_and_pkcs12()
        trust_bundle = self.attempt(None, self.trust_bundle)
        if not self.errors:  # otherwise it is most likely a consequence of those errors
            self.attempt(None, self.require_identity, ip_addresses)
        self.raise_collected()
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
            annotations=tuple(sorted(self.annotations.items())),
            pod_ip_sans=self.pod_ip_sans,
            trust_bundle=trust_bundle,
        )


def _check_pod_value(key: str, value: str) -> str:
    """A pod-info value as Kubernetes allows it, or InvalidArgument naming the key and rule."""
    if key.endswith("pod.uid"):
        ok, rule = (
            bool(_UUID_RE.fullmatch(value)),
            "a UUID such as 0c5e5e0e-3b1f-4c55-9c6a-1f2f0b7c9d11",
        )
    elif key.endswith("pod.namespace"):
        ok = len(value) <= 63 and bool(_LABEL_RE.fullmatch(value))
        rule = "a DNS-1123 label: at most 63 of a-z, 0-9 and '-', starting and ending alphanumeric"
    else:
        ok = len(value) <= 253 and bool(_K8S_SUBDOMAIN_RE.fullmatch(value))
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


def _check_text(attr: _Attr, text: str, limit: int) -> str:
    if len(text) > limit:
        attr.fail(f"{quote(text)} is {len(text)} characters long; at most {limit} are allowed")
    if _has_control(text):
        attr.fail(f"{quote(text)} contains control characters")
    return text


def _check_serial(attr: _Attr) -> str:
    text = attr.value.strip()
    if len(text) > 64 or not _PRINTABLE_RE.fullmatch(text):
        attr.fail(
            f"{quote(attr.value)} is not a valid subject serial number: at most 64 of A-Z, a-z, "
            "0-9, space and '()+,-./:=?"
        )
    return text


def _check_literal_subject(attr: _Attr) -> str:
    text = attr.value.strip()
    rule = "use an RFC 4514 distinguished name such as CN=my-app,O=Example,C=DE"
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        reason = f" ({exc})" if str(exc) else ""
        attr.fail(f"{quote(text)} is not a valid subject{reason}: {rule}")
    if len(name) == 0:
        attr.fail(f"{quote(text)} names no subject attributes: {rule}")
    try:
        name.public_bytes()  # the CSR builder must be able to encode it
    except ValueError as exc:
        attr.fail(f"{quote(text)} cannot be encoded ({exc}): {rule}")
    for attribute in name:
        # cryptography keeps a #hex value as raw DER bytes in a str; its tag byte is a control
        # character, so this check also refuses the hex form we cannot encode faithfully.
        if not isinstance(attribute.value, str) or _has_control(attribute.value):
            attr.fail(
                f"{quote(text)} contains control characters or a hex-encoded (#...) value, "
                "which are not supported"
            )
    return text


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


def _check_uri(attr: _Attr, entry: str) -> str:
    rule = "use an absolute URI such as spiffe://cluster.local/ns/default/sa/app"
    if not entry.isascii():
        attr.fail(f"{quote(entry)} is not a valid URI: percent-encode non-ASCII characters")
    if any(ch.isspace() or _has_control(ch) for ch in entry):
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


def _whole_seconds(attr: _Attr, what: str) -> int:
    text = attr.value.strip()
    try:
        nanoseconds = parse_go_duration_ns(text)
    except ValueError as exc:
        attr.fail(f"{exc}; write a Go duration such as 2160h, 90m or 1h30m")
    if nanoseconds < 1_000_000_000:
        attr.fail(f"{quote(text)} is too short: the {what} must be at least 1s")
    return nanoseconds // 1_000_000_000


def _file_name(attr: _Attr) -> str:
    name = attr.value
    problem = None
    if "/" in name:
        problem = "contains '/'"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif name != name.strip():
        problem = "has leading or trailing spaces"
    elif _has_control(name):
        problem = "contains control characters"
    elif len(name.encode("utf-8")) > 255:
        problem = "is longer than 255 bytes"
    if problem is not None:
        attr.fail(
            f"{quote(name)} is not a plain file name: it {problem}; use a name such as tls.crt"
        )
    return name


def parse_volume_context(
    volume_context: Mapping[str, str], node_name: str = ""
) -> tuple[CertificateSpec, PodInfo]:
    """Validate ``volume_context`` and return what the volume asks for and whose pod it is.

    ``node_name`` is the value of ``${NODE_NAME}`` (the agent's --node-id). Raises
    InvalidArgument (never anything else for string input) naming the offending key.
    """
    parser = _Parser(volume_context, node_name)
    parser.check_sizes()
    pod = parser.pod_info()
    parser.classify()
    parser.expand(pod)
    return parser.build(), pod
