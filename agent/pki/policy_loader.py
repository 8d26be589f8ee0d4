"""Reading an issuance policy from YAML (the format is documented in docs/policy.md).

``load_policy_text`` validates the whole document and raises PolicyError naming the place of
the first problem (``rules[1].dns-names[0]: ...``), so a broken file is refused as a whole and
never half-applied. The built-in default policy is written in the same format
(``DEFAULT_POLICY_YAML``) and loaded by the same code.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.pki.policy import (
    DEFAULT_KEYS,
    SUBJECT_FIELDS,
    IPNetwork,
    KeyRule,
    Policy,
    Rule,
)
from agent.pki.policy_patterns import Kind, Pattern, PatternError, compile_pattern
from agent.spec.durations import parse_go_duration
from agent.spec.model import KeyAlgorithm

DEFAULT_SOURCE = "built-in default"
POD_IPS_KEYWORD = "pod-ips"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
DEFAULT_TRUST_DOMAIN = "cluster.local"

# The policy in force when no file is given: a pod gets DNS names in its own namespace's
# Service zone and its own name in the pod zone (the PCR signer's default), the SPIFFE ID of its
# own service account, and nothing else.
DEFAULT_POLICY_YAML = """\
rules:
  - name: default
    namespaces: ["*"]
    dns-names:
      - "**.${POD_NAMESPACE}.svc"
      - "**.${POD_NAMESPACE}.svc.${CLUSTER_DOMAIN}"
      - "${POD_NAME}.${POD_NAMESPACE}.pod.${CLUSTER_DOMAIN}"
    uri-sans:
      - "spiffe://${TRUST_DOMAIN}/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}"
    subject:
      common-name:
        - "**.${POD_NAMESPACE}.svc"
        - "**.${POD_NAMESPACE}.svc.${CLUSTER_DOMAIN}"
"""

# What DEFAULT_POLICY_YAML parses to (tests/test_policy.py holds the two equal).
_DEFAULT_POLICY_DOCUMENT: dict[str, Any] = {
    "rules": [
        {
            "name": "default",
            "namespaces": ["*"],
            "dns-names": [
                "**.${POD_NAMESPACE}.svc",
                "**.${POD_NAMESPACE}.svc.${CLUSTER_DOMAIN}",
                "${POD_NAME}.${POD_NAMESPACE}.pod.${CLUSTER_DOMAIN}",
            ],
            "uri-sans": ["spiffe://${TRUST_DOMAIN}/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}"],
            "subject": {
                "common-name": [
                    "**.${POD_NAMESPACE}.svc",
                    "**.${POD_NAMESPACE}.svc.${CLUSTER_DOMAIN}",
                ]
            },
        }
    ]
}

_RULE_KEYS = frozenset(
    {
        "name",
        "namespaces",
        "dns-names",
        "uri-sans",
        "email-sans",
        "ip-sans",
        "other-names",
        "subject",
        "max-duration",
        "keys",
        "is-ca",
    }
)
_KEY_MINIMUMS = {KeyAlgorithm.RSA: 2048, KeyAlgorithm.ECDSA: 256}
_OID_RE = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


class PolicyError(ValueError):
    """The policy document is invalid; the message names where and why."""


def settings_values(cluster_domain: str, trust_domain: str) -> dict[str, str]:
    for flag, value in (("--cluster-domain", cluster_domain), ("--trust-domain", trust_domain)):
        if len(value) > 253 or not _DOMAIN_RE.fullmatch(value):
            raise PolicyError(
                f"{flag} {value!r} must be a lower-case DNS name such as cluster.local"
            )
    return {"CLUSTER_DOMAIN": cluster_domain, "TRUST_DOMAIN": trust_domain}


def default_policy(
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN, trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> Policy:
    # From the document DEFAULT_POLICY_YAML parses to (a test holds them equal): every start
    # loads the default policy, and importing yaml for it was a few percent of the start.
    return _policy_from_document(
        _DEFAULT_POLICY_DOCUMENT,
        DEFAULT_POLICY_YAML.encode("utf-8"),
        DEFAULT_SOURCE,
        settings_values(cluster_domain, trust_domain),
    )


def load_policy_file(
    path: Path,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> Policy:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror}") from exc
    return load_policy_text(text, str(path), cluster_domain, trust_domain)


def load_policy_text(
    text: str | bytes,
    source: str,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> Policy:
    import yaml  # a policy file only: the default policy needs no YAML parser

    raw = text.encode("utf-8") if isinstance(text, str) else text
    settings = settings_values(cluster_domain, trust_domain)
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source} is not valid YAML: {exc}") from exc
    return _policy_from_document(document, raw, source, settings)


def _policy_from_document(
    document: Any, raw: bytes, source: str, settings: dict[str, str]
) -> Policy:
    if not isinstance(document, dict):
        raise PolicyError(f"{source} must be a mapping with a 'rules' list")
    unknown = sorted(str(k) for k in document if k not in ("rules", "version"))
    if unknown:
        raise PolicyError(f"{source}: unknown top-level key {unknown[0]!r} (known: rules, version)")
    if document.get("version", 1) != 1:
        raise PolicyError(f"{source}: version {document['version']!r} is not supported (use 1)")
    rules_doc = document.get("rules")
    if not isinstance(rules_doc, list) or not rules_doc:
        raise PolicyError(f"{source}: 'rules' must be a non-empty list")
    rules: list[Rule] = []
    for index, rule_doc in enumerate(rules_doc):
        rule = _rule(rule_doc, f"rules[{index}]", index)
        if any(r.name == rule.name for r in rules):
            raise PolicyError(f"{source}: rules[{index}]: the name {rule.name!r} is used twice")
        rules.append(rule)
    return Policy(
        rules=tuple(rules),
        source=source,
        sha256=hashlib.sha256(raw).hexdigest(),
        settings=settings,
    )


def _rule(doc: Any, where: str, index: int) -> Rule:
    if not isinstance(doc, dict):
        raise PolicyError(f"{where} must be a mapping")
    unknown = sorted(str(k) for k in doc if k not in _RULE_KEYS)
    if unknown:
        raise PolicyError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_RULE_KEYS))})"
        )
    name = doc.get("name", f"rules[{index}]")
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{where}.name must be a non-empty string")
    if "namespaces" not in doc:
        raise PolicyError(f"{where}: 'namespaces' is required (use [\"*\"] for every namespace)")
    other_names: dict[str, tuple[Pattern, ...]] = {}
    for oid, patterns in _mapping(doc, "other-names", where).items():
        if not _OID_RE.fullmatch(str(oid)):
            raise PolicyError(f"{where}.other-names: {oid!r} is not a dotted OID such as 2.5.4.3")
        other_names[str(oid)] = _patterns(patterns, Kind.TEXT, f"{where}.other-names.{oid}")
    subject: dict[str, tuple[Pattern, ...]] = {}
    for subject_field, patterns in _mapping(doc, "subject", where).items():
        key = str(subject_field)
        if key not in SUBJECT_FIELDS and not _OID_RE.fullmatch(key):
            known = ", ".join(SUBJECT_FIELDS)
            raise PolicyError(
                f"{where}.subject: unknown field {key!r} (known: {known}, or a dotted OID)"
            )
        subject[key] = _patterns(patterns, Kind.TEXT, f"{where}.subject.{key}")
    return Rule(
        name=name.strip(),
        namespaces=_patterns(doc["namespaces"], Kind.NAME, f"{where}.namespaces", variables=False),
        dns_names=_patterns(doc.get("dns-names", []), Kind.NAME, f"{where}.dns-names"),
        uris=_patterns(doc.get("uri-sans", []), Kind.URI, f"{where}.uri-sans"),
        emails=_patterns(doc.get("email-sans", []), Kind.EMAIL, f"{where}.email-sans"),
        ip_ranges=_ip_ranges(doc.get("ip-sans", []), f"{where}.ip-sans"),
        pod_ips=POD_IPS_KEYWORD in (doc.get("ip-sans") or []),
        other_names=other_names,
        subject=subject,
        max_duration_seconds=_max_duration(doc.get("max-duration"), f"{where}.max-duration"),
        keys=_keys(doc["keys"], f"{where}.keys") if "keys" in doc else DEFAULT_KEYS,
        is_ca=_bool(doc.get("is-ca", False), f"{where}.is-ca"),
    )


def _mapping(doc: Mapping[str, Any], key: str, where: str) -> Mapping[Any, Any]:
    value = doc.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError(f"{where}.{key} must be a mapping")
    return value


def _patterns(value: Any, kind: Kind, where: str, *, variables: bool = True) -> tuple[Pattern, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list of patterns")
    result = []
    for i, text in enumerate(value):
        try:
            result.append(compile_pattern(text, kind, variables=variables))
        except PatternError as exc:
            raise PolicyError(f"{where}[{i}]: {exc}") from None
    return tuple(result)


def _ip_ranges(value: Any, where: str) -> tuple[IPNetwork, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list of CIDRs")
    result: list[IPNetwork] = []
    for i, text in enumerate(value):
        if text == POD_IPS_KEYWORD:
            continue  # the pod's own addresses, see Rule.pod_ips
        try:
            result.append(ipaddress.ip_network(str(text), strict=True))
        except ValueError as exc:
            raise PolicyError(
                f"{where}[{i}]: {text!r} is not a CIDR such as 10.0.0.0/8 or fd00::/8 ({exc}), "
                f"nor {POD_IPS_KEYWORD} (the pod's own addresses)"
            ) from None
    return tuple(result)


def _max_duration(value: Any, where: str) -> int | None:
    if value is None:
        return None
    try:
        seconds = int(parse_go_duration(str(value)))
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}; write a Go duration such as 720h") from None
    if seconds <= 0:
        raise PolicyError(f"{where}: {value!r} must be positive")
    return seconds


def _keys(value: Any, where: str) -> tuple[KeyRule, ...]:
    if not isinstance(value, list) or not value:
        raise PolicyError(f"{where} must be a non-empty list of {{algorithm, min-size}}")
    by_lower = {a.value.lower(): a for a in KeyAlgorithm}
    result = []
    for i, entry in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"algorithm", "min-size"}:
            raise PolicyError(f"{here} must be a mapping with 'algorithm' and optional 'min-size'")
        algorithm = by_lower.get(str(entry.get("algorithm", "")).lower())
        if algorithm is None:
            raise PolicyError(f"{here}.algorithm must be RSA, ECDSA or Ed25519")
        min_size = entry.get("min-size")
        if algorithm is KeyAlgorithm.ED25519:
            if min_size is not None:
                raise PolicyError(f"{here}.min-size: Ed25519 keys have no size")
        elif min_size is None:
            min_size = _KEY_MINIMUMS[algorithm]
        elif not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 1:
            raise PolicyError(f"{here}.min-size must be a positive integer")
        result.append(KeyRule(algorithm, min_size))
    return tuple(result)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{where} must be true or false")
    return value
