"""What the agent signs for Kubernetes PodCertificateRequests: per-signer configuration.

Pure: parses and validates the ``pcr-signers`` setting (docs/pod-certificates.md) and expands
its SAN templates for one pod. A pod never chooses its names here (a PCR carries only a public
key): the signer's template decides them, from the pod's verified identity.

Shape of ``pcr-signers`` (YAML; a mapping from signer name to its settings, all optional)::

    cert-agent.io/pod-identity:
      uris: ["spiffe://${TRUST_DOMAIN}/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}"]
      dns-names: ["${POD_NAME}.${POD_NAMESPACE}.pod.${CLUSTER_DOMAIN}"]
      common-name: ""            # none by default
      max-duration: 24h          # the signer's own cap (spec.maxExpirationSeconds caps too)
      key-types: [ECDSAP256, ECDSAP384, ECDSAP521, ED25519, RSA3072, RSA4096]
      trust-domain: <--trust-domain>
      cluster-domain: <--cluster-domain>
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.spec.durations import parse_go_duration

# The key types the PodCertificateRequest API allows (kube-apiserver refuses others at creation).
KEY_TYPES = ("ECDSAP256", "ECDSAP384", "ECDSAP521", "ED25519", "RSA3072", "RSA4096")
TEMPLATE_VARIABLES = (
    "POD_NAME",
    "POD_NAMESPACE",
    "POD_UID",
    "SERVICE_ACCOUNT_NAME",
    "NODE_NAME",
    "TRUST_DOMAIN",
    "CLUSTER_DOMAIN",
)
DEFAULT_URIS = ("spiffe://${TRUST_DOMAIN}/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}",)
DEFAULT_DNS_NAMES = ("${POD_NAME}.${POD_NAMESPACE}.pod.${CLUSTER_DOMAIN}",)
DEFAULT_MAX_DURATION_SECONDS = 24 * 3600
# The API's bounds on a PCR certificate's lifetime (certificates.k8s.io validation).
MIN_LIFETIME_SECONDS = 3600
MAX_LIFETIME_SECONDS = 91 * 24 * 3600

_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_KEYS = {
    "uris",
    "dns-names",
    "common-name",
    "max-duration",
    "key-types",
    "trust-domain",
    "cluster-domain",
}


class PcrConfigError(ValueError):
    """A ``pcr-signer-name`` / ``pcr-signers`` value is wrong; the message names it."""


@dataclass(frozen=True)
class PcrSignerConfig:
    signer_name: str
    uris: tuple[str, ...] = DEFAULT_URIS
    dns_names: tuple[str, ...] = DEFAULT_DNS_NAMES
    common_name: str = ""
    max_duration_seconds: int = DEFAULT_MAX_DURATION_SECONDS
    key_types: frozenset[str] = field(default_factory=lambda: frozenset(KEY_TYPES))
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"


@dataclass(frozen=True)
class PcrIdentity:
    """The verified pod a certificate is for (from the PCR, checked against the pod)."""

    namespace: str
    pod_name: str
    pod_uid: str
    service_account: str
    node_name: str


@dataclass(frozen=True)
class PcrNames:
    """The names one certificate carries, templates expanded."""

    common_name: str
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]


def signer_name_problem(name: str) -> str | None:
    """Why ``name`` is not a signer name the API accepts for a custom signer, or None.

    ``example.com/path``: a domain of at least two DNS labels, one '/', a path of DNS subdomains
    (certificates.k8s.io ValidateSignerName); ``kubernetes.io`` names are reserved.
    """
    domain, slash, path = name.partition("/")
    if not slash or "/" in path or not path:
        return "must be a domain and a path such as cert-agent.io/pod-identity"
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 2:
        return "its domain part must have at least two labels, such as cert-agent.io"
    if not all(len(label) <= 63 and _DNS_LABEL.fullmatch(label) for label in labels):
        return "its domain part must be lower-case DNS labels"
    if not all(len(p) <= 253 and _DOMAIN.fullmatch(p) for p in path.split(".")):
        return "its path must be lower-case letters, digits, '-' and '.'"
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        return "kubernetes.io signer names are reserved for Kubernetes itself"
    return None


def parse_signers(
    names: list[str],
    raw: Any,
    cluster_domain: str = "cluster.local",
    trust_domain: str = "cluster.local",
) -> tuple[PcrSignerConfig, ...]:
    """One config per name in ``names``, from the ``pcr-signers`` mapping (or defaults);
    ``--cluster-domain`` and ``--trust-domain`` are the defaults of a signer's domains."""
    for name in names:
        problem = signer_name_problem(name)
        if problem:
            raise PcrConfigError(f"--pcr-signer-name {name!r}: {problem}")
    if len(set(names)) != len(names):
        raise PcrConfigError("--pcr-signer-name lists a signer twice")
    if raw in (None, ""):
        raw = {}
    if not isinstance(raw, Mapping):
        raise PcrConfigError("--pcr-signers must be a mapping of signer name to its settings")
    unknown = sorted(str(k) for k in raw if k not in names)
    if unknown:
        raise PcrConfigError(
            f"--pcr-signers configures {', '.join(unknown)}, which --pcr-signer-name does not "
            "list; add it there or remove its settings"
        )
    defaults = {"cluster-domain": cluster_domain, "trust-domain": trust_domain}
    return tuple(_one(name, raw.get(name) or {}, defaults) for name in names)


def _one(name: str, raw: Any, defaults: dict[str, str]) -> PcrSignerConfig:
    where = f"--pcr-signers[{name}]"
    if not isinstance(raw, Mapping):
        raise PcrConfigError(f"{where} must be a mapping")
    unknown = sorted(str(k) for k in raw if str(k).replace("_", "-") not in _KEYS)
    if unknown:
        raise PcrConfigError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}"
        )
    values = {str(k).replace("_", "-"): v for k, v in raw.items()}
    config = PcrSignerConfig(signer_name=name)
    uris = _strings(values, "uris", where, config.uris)
    dns_names = _strings(values, "dns-names", where, config.dns_names)
    common_name = str(values.get("common-name") or "")
    for template in (*uris, *dns_names, common_name):
        _check_template(template, where)
    if not uris and not dns_names and not common_name:
        raise PcrConfigError(f"{where}: a certificate needs at least one URI, DNS name or CN")
    max_duration = config.max_duration_seconds
    if "max-duration" in values:
        try:
            max_duration = int(parse_go_duration(str(values["max-duration"])))
        except ValueError as exc:
            raise PcrConfigError(f"{where}.max-duration: {exc}") from exc
        if not MIN_LIFETIME_SECONDS <= max_duration <= MAX_LIFETIME_SECONDS:
            raise PcrConfigError(
                f"{where}.max-duration must be between 1h and 2184h (91 days), the API's bounds"
            )
    key_types = frozenset(_strings(values, "key-types", where, tuple(config.key_types)))
    bad = sorted(k for k in key_types if k not in KEY_TYPES)
    if bad or not key_types:
        raise PcrConfigError(
            f"{where}.key-types: {', '.join(bad) or 'empty'}; choose from {', '.join(KEY_TYPES)}"
        )
    domains = {}
    for key in ("trust-domain", "cluster-domain"):
        value = str(values.get(key) or defaults[key])
        if len(value) > 253 or not _DOMAIN.fullmatch(value):
            raise PcrConfigError(f"{where}.{key} {value!r} must be a lower-case DNS name")
        domains[key] = value
    return PcrSignerConfig(
        signer_name=name,
        uris=uris,
        dns_names=dns_names,
        common_name=common_name,
        max_duration_seconds=max_duration,
        key_types=key_types,
        trust_domain=domains["trust-domain"],
        cluster_domain=domains["cluster-domain"],
    )


def _strings(values: Mapping[str, Any], key: str, where: str, default: tuple[str, ...]) -> Any:
    if key not in values:
        return default
    value = values[key]
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PcrConfigError(f"{where}.{key} must be a list of strings")
    return tuple(v.strip() for v in value if v.strip())


def _check_template(template: str, where: str) -> None:
    for name in _VARIABLE.findall(template):
        if name not in TEMPLATE_VARIABLES:
            known = ", ".join("${" + v + "}" for v in TEMPLATE_VARIABLES)
            raise PcrConfigError(f"{where}: unknown variable ${{{name}}} in {template!r}; {known}")


def expand(config: PcrSignerConfig, identity: PcrIdentity) -> PcrNames:
    """The signer's templates for this pod."""
    values = {
        "POD_NAME": identity.pod_name,
        "POD_NAMESPACE": identity.namespace,
        "POD_UID": identity.pod_uid,
        "SERVICE_ACCOUNT_NAME": identity.service_account,
        "NODE_NAME": identity.node_name,
        "TRUST_DOMAIN": config.trust_domain,
        "CLUSTER_DOMAIN": config.cluster_domain,
    }

    def one(template: str) -> str:
        return _VARIABLE.sub(lambda m: values[m.group(1)], template)

    return PcrNames(
        common_name=one(config.common_name),
        dns_names=tuple(one(t) for t in config.dns_names),
        uris=tuple(one(t) for t in config.uris),
    )


def dns_name_problem(name: str) -> str | None:
    """Why an expanded DNS SAN is not a valid DNS name (a pod name can make it too long)."""
    if len(name) > 253:
        return "longer than 253 characters"
    if not all(len(label) <= 63 and _DNS_LABEL.fullmatch(label) for label in name.split(".")):
        return "not lower-case DNS labels of at most 63 characters"
    return None
