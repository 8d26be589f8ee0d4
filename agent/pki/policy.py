"""The issuance policy: which pod may get which names, keys, lifetimes and CA flags.

One narrow entry point, ``Policy.check(PolicyRequest) -> PolicyDecision``, shared by every path
that signs or asks for a signature: the volume manager (local CA, and cert-manager with
``--policy-for-cert-manager``), the node-CA issuer, and ``cert-agent policy check``. A request
is built from the pod's identity and what it asks for (``PolicyRequest.from_spec``), never from a
key or CSR, so the decision is made before any key exists.

Combining rules (docs/policy.md): the rules whose ``namespaces`` select the pod's namespace are
the candidates; the request is allowed when at least one candidate allows ALL of it, and the
first such rule (in file order) is the one reported. Rules never add up value by value, so a
rule that allows ``is-ca`` for one name cannot lend that flag to another rule's names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.errors import PermissionDenied
from agent.pki.policy_patterns import Pattern
from agent.spec.model import CertificateSpec, KeyAlgorithm, OtherName, PodInfo, SubjectSpec
from agent.spec.templating import quote

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Subject field names, as the volume attributes name them, and the OIDs of a literal subject.
SUBJECT_FIELDS: dict[str, x509.ObjectIdentifier] = {
    "common-name": NameOID.COMMON_NAME,
    "organizations": NameOID.ORGANIZATION_NAME,
    "organizationalunits": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "countries": NameOID.COUNTRY_NAME,
    "provinces": NameOID.STATE_OR_PROVINCE_NAME,
    "localities": NameOID.LOCALITY_NAME,
    "streetaddresses": NameOID.STREET_ADDRESS,
    "postalcodes": NameOID.POSTAL_CODE,
    "serialnumber": NameOID.SERIAL_NUMBER,
}
_FIELD_BY_OID = {oid.dotted_string: name for name, oid in SUBJECT_FIELDS.items()}
_MAX_SHOWN_PATTERNS = 4


class PolicyViolation(PermissionDenied):
    """The issuance policy forbids the request. ``rule`` names the rule that decided (or None)."""

    def __init__(self, message: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule

    @property
    def reason(self) -> str:
        return "policy"


@dataclass(frozen=True)
class PolicyRequest:
    """What a pod asks to have signed, in the terms the policy speaks (no key material)."""

    namespace: str
    pod_name: str
    service_account: str = ""
    pod_uid: str = ""
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    other_names: tuple[OtherName, ...] = ()
    # (field, value) pairs: field is a SUBJECT_FIELDS name, or a dotted OID for other attributes.
    subject: tuple[tuple[str, str], ...] = ()
    key_algorithm: KeyAlgorithm = KeyAlgorithm.RSA
    key_size: int | None = 2048
    duration_seconds: int | None = None  # None: the issuer's default
    is_ca: bool = False
    # ${POD_IP}/${POD_IPS} in ip-sans: the pod's own addresses, filled in from the pod's status
    # by the agent (never by the pod), so the policy decides only whether they may appear.
    pod_ips: bool = False

    @classmethod
    def from_spec(cls, pod: PodInfo, spec: CertificateSpec) -> PolicyRequest:
        return cls(
            namespace=pod.namespace,
            pod_name=pod.name,
            service_account=pod.service_account,
            pod_uid=pod.uid,
            dns_names=spec.dns_names,
            ip_addresses=spec.ip_addresses,
            uris=spec.uris,
            emails=spec.emails,
            other_names=spec.other_names,
            subject=subject_pairs(spec.subject),
            key_algorithm=spec.key.algorithm,
            key_size=spec.key.size,
            duration_seconds=spec.duration_seconds,
            is_ca=spec.is_ca,
            pod_ips=spec.wants_pod_ips,
        )


def subject_pairs(subject: SubjectSpec) -> tuple[tuple[str, str], ...]:
    """The subject as (field, value) pairs; a literal subject is split into its attributes."""
    if subject.literal_subject is not None:
        name = x509.Name.from_rfc4514_string(subject.literal_subject)
        pairs = []
        for attribute in name:
            oid = attribute.oid.dotted_string
            value = attribute.value
            text = value if isinstance(value, str) else value.decode("utf-8", "replace")
            pairs.append((_FIELD_BY_OID.get(oid, oid), text))
        return tuple(pairs)
    pairs = []
    if subject.common_name is not None:
        pairs.append(("common-name", subject.common_name))
    for field_name, values in (
        ("organizations", subject.organizations),
        ("organizationalunits", subject.organizational_units),
        ("countries", subject.countries),
        ("provinces", subject.provinces),
        ("localities", subject.localities),
        ("streetaddresses", subject.street_addresses),
        ("postalcodes", subject.postal_codes),
    ):
        pairs.extend((field_name, value) for value in values)
    if subject.serial_number is not None:
        pairs.append(("serialnumber", subject.serial_number))
    return tuple(pairs)


@dataclass(frozen=True)
class PolicyDecision:
    """An allowed request: the rule that allowed it and the lifetime cap it sets (if any)."""

    rule: str
    max_duration_seconds: int | None = None


class PolicyChecker(Protocol):
    """The narrow interface every signing path calls before it makes a key.

    ``Policy`` implements it, and so does ``policy_reload.PolicySource`` (whichever policy is in
    force). Callers build the request with ``PolicyRequest.from_spec`` (or field by field, as a
    PodCertificateRequest signer would) and treat PolicyViolation as PERMISSION_DENIED.
    """

    def check(self, request: PolicyRequest) -> PolicyDecision: ...


@dataclass(frozen=True)
class KeyRule:
    algorithm: KeyAlgorithm
    min_size: int | None = None  # bits for RSA, curve size for ECDSA, None for Ed25519


DEFAULT_KEYS: tuple[KeyRule, ...] = (
    KeyRule(KeyAlgorithm.RSA, 2048),
    KeyRule(KeyAlgorithm.ECDSA, 256),
    KeyRule(KeyAlgorithm.ED25519),
)


@dataclass(frozen=True)
class Rule:
    """One rule of the policy. Empty pattern lists allow nothing of that kind."""

    name: str
    namespaces: tuple[Pattern, ...]
    dns_names: tuple[Pattern, ...] = ()
    uris: tuple[Pattern, ...] = ()
    emails: tuple[Pattern, ...] = ()
    ip_ranges: tuple[IPNetwork, ...] = ()
    other_names: Mapping[str, tuple[Pattern, ...]] = field(default_factory=dict)
    subject: Mapping[str, tuple[Pattern, ...]] = field(default_factory=dict)
    max_duration_seconds: int | None = None
    keys: tuple[KeyRule, ...] = DEFAULT_KEYS
    is_ca: bool = False
    pod_ips: bool = False  # "pod-ips" in ip-sans: the pod's own addresses (${POD_IP}, ${POD_IPS})

    def selects(self, namespace: str) -> bool:
        return any(p.matches(namespace, {}) for p in self.namespaces)

    def violation(self, request: PolicyRequest, values: Mapping[str, str]) -> str | None:
        """Why this rule does not allow ``request`` (the first problem found), or None."""
        checks: list[tuple[str, tuple[str, ...], Sequence[Pattern]]] = [
            ("DNS name", request.dns_names, self.dns_names),
            ("URI", request.uris, self.uris),
            ("email address", request.emails, self.emails),
        ]
        for what, requested, patterns in checks:
            for value in requested:
                if not any(p.matches(value, values) for p in patterns):
                    return _not_allowed(what, value, patterns, values)
        for address in request.ip_addresses:
            ip = ipaddress.ip_address(address)
            if not any(ip.version == net.version and ip in net for net in self.ip_ranges):
                if not self.ip_ranges:
                    return f"does not allow any IP address (requested {quote(address)})"
                allowed = ", ".join(str(n) for n in self.ip_ranges)
                return f"does not allow IP address {quote(address)} (allowed: {allowed})"
        if request.pod_ips and not self.pod_ips:
            return (
                "does not allow the pod's own IP addresses (${POD_IP}/${POD_IPS} in ip-sans; "
                "a rule allows them with pod-ips in its ip-sans)"
            )
        for other in request.other_names:
            patterns = self.other_names.get(other.oid, ())
            if not any(p.matches(other.value, values) for p in patterns):
                what = f"otherName {other.oid}"
                return _not_allowed(what, other.value, patterns, values)
        for subject_field, value in request.subject:
            patterns = self.subject.get(subject_field, ())
            if not any(p.matches(value, values) for p in patterns):
                return _not_allowed(f"subject {subject_field}", value, patterns, values)
        return self._key_duration_ca_violation(request)

    def _key_duration_ca_violation(self, request: PolicyRequest) -> str | None:
        key = next((k for k in self.keys if k.algorithm is request.key_algorithm), None)
        if key is None:
            allowed = ", ".join(k.algorithm.value for k in self.keys) or "none"
            return f"does not allow {request.key_algorithm.value} keys (allowed: {allowed})"
        if key.min_size is not None and (request.key_size or 0) < key.min_size:
            return (
                f"requires {key.algorithm.value} keys of at least {key.min_size} "
                f"(requested {request.key_size})"
            )
        limit, requested = self.max_duration_seconds, request.duration_seconds
        if limit is not None and requested is not None and requested > limit:
            shown = f"{_duration(limit)} (requested {_duration(requested)})"
            return f"allows a duration of at most {shown}"
        if request.is_ca and not self.is_ca:
            return "does not allow CA certificates (is-ca)"
        return None


@dataclass(frozen=True)
class Policy:
    """A loaded policy: its rules, where it came from, and the agent-wide pattern values."""

    rules: tuple[Rule, ...]
    source: str  # a file path, or "built-in default"
    sha256: str
    settings: Mapping[str, str] = field(default_factory=dict)  # CLUSTER_DOMAIN, TRUST_DOMAIN

    def check(self, request: PolicyRequest) -> PolicyDecision:
        """Allow ``request`` (returning the deciding rule) or raise PolicyViolation."""
        candidates = [rule for rule in self.rules if rule.selects(request.namespace)]
        if not candidates:
            raise PolicyViolation(
                f"the issuance policy ({self.source}) has no rule for namespace "
                f"{quote(request.namespace)}; ask the cluster admin to add one"
            )
        values = {
            **self.settings,
            "POD_NAME": request.pod_name,
            "POD_NAMESPACE": request.namespace,
            "POD_UID": request.pod_uid,
            "SERVICE_ACCOUNT_NAME": request.service_account,
        }
        problems: list[tuple[str, str]] = []
        for rule in candidates:
            problem = rule.violation(request, values)
            if problem is None:
                return PolicyDecision(rule.name, rule.max_duration_seconds)
            problems.append((rule.name, problem))
        shown = "; ".join(f"rule {quote(name)} {problem}" for name, problem in problems[:3])
        if len(problems) > 3:
            shown += f"; and {len(problems) - 3} more rules"
        raise PolicyViolation(
            f"denied by the issuance policy ({self.source}): {shown}", rule=problems[0][0]
        )


def _not_allowed(
    what: str, value: str, patterns: Sequence[Pattern], values: Mapping[str, str]
) -> str:
    if not patterns:
        return f"does not allow any {what} (requested {quote(value)})"
    expanded = [p.expand(values) or p.text for p in patterns]
    shown = ", ".join(quote(p) for p in expanded[:_MAX_SHOWN_PATTERNS])
    if len(expanded) > _MAX_SHOWN_PATTERNS:
        shown += f" and {len(expanded) - _MAX_SHOWN_PATTERNS} more"
    return f"does not allow {what} {quote(value)} (allowed for this pod: {shown})"


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return "".join(parts) or "0s"
