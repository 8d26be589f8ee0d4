"""The agent's configuration: flags, environment variables and a YAML file, in that precedence.

Every ``serve`` flag ``--some-flag`` is also read from ``CERT_AGENT_SOME_FLAG`` and from the key
``some-flag`` (or ``some_flag``) of the ``--config`` file, so a DaemonSet can set the node id from
the downward API and keep everything else in a ConfigMap.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent import DEFAULT_DRIVER_NAME
from agent.pki.name_constraints import ConstraintError, PermittedNames
from agent.spec.durations import parse_go_duration
from agent.spec.pcr import PcrConfigError, PcrSignerConfig, parse_signers

ENV_PREFIX = "CERT_AGENT_"
# CSI GetPluginInfo: at most 63 characters, alphanumeric at both ends, dashes and dots between.
_DRIVER_NAME_RE = re.compile(r"(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_METRICS_ADDRESS = ":9402"
DEFAULT_KUBELET_ROOT = "/var/lib/kubelet"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the setting."""


@dataclass(frozen=True)
class Setting:
    flag: str  # without the leading dashes
    help: str
    default: Any = None
    kind: str = "str"  # str | bool | int | float | duration | duration-or-zero | list | yaml


SETTINGS: tuple[Setting, ...] = (
    Setting("endpoint", "CSI endpoint, unix:///path/to/csi.sock", DEFAULT_ENDPOINT),
    Setting("node-id", "this node's id, as kubelet knows it (in a cluster: spec.nodeName)"),
    Setting("driver-name", "CSI driver name, as in the CSIDriver object", DEFAULT_DRIVER_NAME),
    Setting(
        "data-root",
        "state directory; volume payloads live on a tmpfs under it "
        "(default /var/lib/kubelet/plugins/<driver-name>/data)",
    ),
    Setting(
        "metrics-address", "host:port for /metrics, /healthz, /readyz", DEFAULT_METRICS_ADDRESS
    ),
    Setting("ca-cert-file", "PEM file of the local CA certificate (with --ca-key-file)"),
    Setting("ca-key-file", "PEM file of the local CA private key (with --ca-cert-file)"),
    Setting("ca-dir", "directory holding ca.crt and ca.key, such as a mounted Secret"),
    Setting("ca-secret", "NAMESPACE/NAME of a Secret with ca.crt and ca.key, watched for changes"),
    Setting(
        "ca-overlap",
        "how long a CA replaced in the --ca-secret Secret stays in every volume's ca.crt "
        "(default: --max-duration; never past that CA's own notAfter; 0s: until every volume "
        "here is reissued)",
        None,
        "duration-or-zero",
    ),
    # Node CA mode: the local CA is this node's own intermediate, issued by cert-manager.
    Setting(
        "node-ca-issuer-name",
        "cert-manager issuer that signs this node's intermediate CA (turns on node CA mode)",
    ),
    Setting("node-ca-issuer-kind", "Issuer or ClusterIssuer", "Issuer"),
    Setting("node-ca-issuer-group", "API group of the node CA issuer", "cert-manager.io"),
    Setting(
        "node-ca-namespace",
        "namespace of the node CA's CertificateRequest (default: the agent's own, --pod-namespace)",
    ),
    Setting("node-ca-duration", "lifetime asked for the node CA", "24h", "duration"),
    Setting(
        "node-ca-renew-before",
        "renew the node CA this long before it expires (default: a third of its lifetime)",
        None,
        "duration",
    ),
    Setting(
        "node-ca-permitted-dns",
        "DNS name constraints of the node CA, comma-separated (default: svc.<cluster-domain>)",
        None,
        "list",
    ),
    Setting(
        "node-ca-permitted-uri",
        "URI host name constraints of the node CA (default: <cluster-domain>, the SPIFFE trust "
        "domain)",
        None,
        "list",
    ),
    Setting("node-ca-permitted-email", "email name constraints of the node CA", None, "list"),
    Setting(
        "node-ca-permitted-ip",
        "IP networks the node CA may sign (default: none, every IP address is excluded)",
        None,
        "list",
    ),
    Setting(
        "node-ca-require-name-constraints",
        "refuse a node CA whose issuer dropped the name constraints (default: enforce them in "
        "the agent)",
        False,
        "bool",
    ),
    Setting(
        "cluster-domain",
        "the cluster's DNS domain (node CA constraints; ${CLUSTER_DOMAIN} in the policy)",
        "cluster.local",
    ),
    Setting("pod-name", "the agent's own Pod name (downward API metadata.name)"),
    Setting("pod-uid", "the agent's own Pod uid (downward API metadata.uid)"),
    Setting("pod-namespace", "the agent's own namespace (downward API metadata.namespace)"),
    Setting("max-duration", "longest certificate lifetime the local CA signs", "2160h", "duration"),
    Setting("allow-ca", "let volumes ask the local CA for CA certificates (is-ca)", False, "bool"),
    Setting(
        "allowed-namespaces",
        "comma-separated namespaces that may use the local CA (default: all)",
        None,
        "list",
    ),
    Setting(
        "policy",
        "YAML issuance policy (docs/policy.md), reloaded when it changes "
        "(default: the built-in policy: names in the pod's own namespace only)",
    ),
    Setting(
        "policy-for-cert-manager",
        "also check cert-manager requests against the policy before sending them",
        False,
        "bool",
    ),
    Setting("trust-domain", "SPIFFE trust domain, ${TRUST_DOMAIN} in the policy", "cluster.local"),
    Setting(
        "standalone",
        "run without Kubernetes: self-signed local CA under the data root",
        False,
        "bool",
    ),
    Setting("kubeconfig", "kubeconfig file (default: in-cluster configuration)"),
    Setting("kube-qps", "client-side rate limit for Kubernetes API requests", 20.0, "float"),
    Setting("kube-burst", "burst for the Kubernetes API rate limit", 40, "int"),
    Setting("issue-timeout", "how long a publish waits for an issuer", "60s", "duration"),
    Setting("renewal-workers", "renewals that may run at once", 2, "int"),
    Setting("grpc-workers", "gRPC requests that may run at once", 8, "int"),
    Setting("tmpfs-size", "size of the tmpfs that holds volume payloads, in MiB", 64, "int"),
    Setting(
        "min-duration",
        "shortest certificate lifetime a new volume may ask for (lower only for demos and tests)",
        "1h",
        "duration",
    ),
    Setting(
        "min-renewal-interval",
        "a volume never renews more often than this, whatever its attributes or issuer say",
        "30s",
        "duration",
    ),
    Setting("keygen-workers", "private keys generated at once (publishes and renewals)", 2, "int"),
    Setting(
        "tmpfs-reserve",
        "MiB of the tmpfs kept free for renewals of existing volumes: new volumes are refused "
        "(RESOURCE_EXHAUSTED) below it",
        2,
        "int",
    ),
    Setting("log-level", "debug, info, warning or error", "info"),
    Setting("log-format", "auto (JSON unless on a terminal), json or text", "auto"),
    Setting(
        "pod-watch",
        "watch this node's pods for ${POD_IP}/${POD_IPS} SANs: auto (from the first volume that "
        "uses them), on (from start), off (refuse those volumes)",
        "auto",
    ),
    Setting(
        "pcr-signer-name",
        "sign Kubernetes PodCertificateRequests of this node for these signer names "
        "(comma-separated, e.g. cert-agent.io/pod-identity; docs/pod-certificates.md)",
        None,
        "list",
    ),
    Setting(
        "pcr-signers",
        "per-signer SAN templates, lifetime cap and key types, as a YAML/JSON mapping "
        "(docs/pod-certificates.md)",
        None,
        "yaml",
    ),
    Setting(
        "pcr-publish-trust-bundle",
        "keep a ClusterTrustBundle <signer>:primary holding the local CA for each PCR signer",
        False,
        "bool",
    ),
    Setting(
        "kubelet-root",
        "kubelet's root directory (--root-dir); every target_path must be "
        "<kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount",
        DEFAULT_KUBELET_ROOT,
    ),
    Setting(
        "relaxed-target-paths",
        "accept any target_path below --kubelet-root, not only kubelet's "
        "pods/<uid>/volumes/kubernetes.io~csi/<name>/mount shape (non-standard kubelets)",
        False,
        "bool",
    ),
)


@dataclass(frozen=True)
class NodeCAConfig:
    """Node CA mode: which issuer signs the node's intermediate CA, and what it may vouch for."""

    issuer_name: str
    issuer_kind: str = "Issuer"
    issuer_group: str = "cert-manager.io"
    namespace: str = ""
    duration_seconds: int = 24 * 3600
    renew_before_seconds: int | None = None
    permitted: PermittedNames = field(default_factory=PermittedNames)
    require_name_constraints: bool = False


@dataclass(frozen=True)
class AgentConfig:
    endpoint: str
    node_id: str
    driver_name: str
    data_root: Path
    metrics_address: str
    ca_cert_file: Path | None
    ca_key_file: Path | None
    ca_dir: Path | None
    ca_secret: tuple[str, str] | None
    max_duration_seconds: int
    allow_ca: bool
    allowed_namespaces: frozenset[str] | None
    standalone: bool
    kubeconfig: str | None
    kube_qps: float
    kube_burst: int
    issue_timeout_seconds: float
    renewal_workers: int
    grpc_workers: int
    tmpfs_size_bytes: int
    log_level: str
    log_format: str
    node_ca: NodeCAConfig | None = None
    cluster_domain: str = "cluster.local"
    pod_name: str | None = None
    pod_uid: str | None = None
    pod_namespace: str | None = None
    ca_overlap_seconds: float | None = None  # None: --max-duration
    pod_watch: str = "auto"
    pcr_signers: tuple[PcrSignerConfig, ...] = ()
    pcr_publish_trust_bundle: bool = False
    min_duration_seconds: int = 3600
    min_renewal_interval_seconds: float = 30.0
    keygen_workers: int = 2
    tmpfs_reserve_bytes: int = 2 * 1024 * 1024
    kubelet_root: Path = Path(DEFAULT_KUBELET_ROOT)
    relaxed_target_paths: bool = False
    policy_file: Path | None = None
    policy_for_cert_manager: bool = False
    trust_domain: str = "cluster.local"

    @property
    def socket_path(self) -> Path:
        return socket_path_from_endpoint(self.endpoint)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every setting as a flag whose default is None, so unset flags fall through."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of these settings")
    for setting in SETTINGS:
        default = f" (default: {setting.default})" if setting.default not in (None, False) else ""
        env = f" [env {env_name(setting.flag)}]"
        if setting.kind == "bool":
            parser.add_argument(
                f"--{setting.flag}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=setting.help + env,
            )
        elif setting.kind == "list":
            # Repeatable, and each value may itself be comma-separated.
            parser.add_argument(
                f"--{setting.flag}", action="append", default=None, help=setting.help + env
            )
        else:
            parser.add_argument(
                f"--{setting.flag}", default=None, help=setting.help + default + env
            )


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Merge flags over environment over the config file over defaults, then validate."""
    environ = os.environ if environ is None else environ
    file_values = _read_config_file(
        getattr(args, "config", None) or environ.get("CERT_AGENT_CONFIG")
    )
    raw: dict[str, Any] = {}
    for setting in SETTINGS:
        attr = setting.flag.replace("-", "_")
        value = getattr(args, attr, None)
        source = f"--{setting.flag}"
        if value is None and env_name(setting.flag) in environ:
            value, source = environ[env_name(setting.flag)], env_name(setting.flag)
        if value is None:
            for key in (setting.flag, attr):
                if key in file_values:
                    value, source = file_values[key], f"config key {setting.flag!r}"
                    break
        if value is None:
            value, source = setting.default, f"default of --{setting.flag}"
        raw[setting.flag] = _convert(setting, value, source)
    return _build(raw)


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config file {path} must hold a mapping of setting: value")
    known = {s.flag for s in SETTINGS} | {s.flag.replace("-", "_") for s in SETTINGS}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"--config file {path} has unknown settings: {', '.join(unknown)}")
    return data


def _convert(setting: Setting, value: Any, source: str) -> Any:
    if value is None:
        return None
    try:
        if setting.kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if setting.kind == "int":
            return int(value)
        if setting.kind == "float":
            return float(value)
        if setting.kind in ("duration", "duration-or-zero"):
            seconds = parse_go_duration(str(value))
            if seconds < 0 or (seconds == 0 and setting.kind == "duration"):
                raise ValueError("must be positive")
            return seconds
        if setting.kind == "yaml":
            # A mapping from the config file as is; from a flag or env as YAML (or JSON) text.
            return yaml.safe_load(value) if isinstance(value, str) else value
        if setting.kind == "list":
            items = value if isinstance(value, list) else [value]
            parts = [p for i in items for p in str(i).split(",")]
            return [p.strip() for p in parts if p.strip()]
        return str(value)
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: invalid value {value!r}: {exc}") from exc


def socket_path_from_endpoint(endpoint: str) -> Path:
    if not endpoint.startswith("unix://"):
        raise ConfigError(f"--endpoint {endpoint!r} must be unix:///absolute/path")
    path = endpoint[len("unix://") :]
    if not path.startswith("/"):
        raise ConfigError(f"--endpoint {endpoint!r} must name an absolute socket path")
    return Path(path)


def _build(raw: dict[str, Any]) -> AgentConfig:
    standalone = bool(raw["standalone"])
    node_id = raw["node-id"]
    if not node_id:
        if not standalone:
            raise ConfigError(
                "--node-id is required (in a DaemonSet set CERT_AGENT_NODE_ID from spec.nodeName)"
            )
        node_id = os.uname().nodename
    driver_name = raw["driver-name"]
    if not _DRIVER_NAME_RE.fullmatch(driver_name):
        raise ConfigError(
            f"--driver-name {driver_name!r} must be a domain-style name of at most 63 characters "
            "that starts and ends with a letter or digit (CSI spec), such as csi.cert-agent.io"
        )
    kubelet_root = Path(raw["kubelet-root"])
    if not kubelet_root.is_absolute():
        kubelet_root = kubelet_root.resolve()
    data_root = Path(raw["data-root"] or f"{kubelet_root}/plugins/{driver_name}/data")
    if not data_root.is_absolute():
        data_root = data_root.resolve()
    socket_path_from_endpoint(raw["endpoint"])
    cert_file, key_file = raw["ca-cert-file"], raw["ca-key-file"]
    if bool(cert_file) != bool(key_file):
        raise ConfigError("--ca-cert-file and --ca-key-file must be given together")
    sources = [
        name
        for name, given in (
            ("--ca-cert-file/--ca-key-file", cert_file),
            ("--ca-dir", raw["ca-dir"]),
            ("--ca-secret", raw["ca-secret"]),
            ("--node-ca-issuer-name", raw["node-ca-issuer-name"]),
        )
        if given
    ]
    if len(sources) > 1:
        raise ConfigError(f"choose one CA source, not {' and '.join(sources)}")
    if not sources and not standalone:
        raise ConfigError(
            "no local CA configured: give --node-ca-issuer-name (node CA mode, recommended), "
            "--ca-secret NAMESPACE/NAME, --ca-dir, or --ca-cert-file/--ca-key-file (or "
            "--standalone for a self-signed CA)"
        )
    if standalone and raw["allow-ca"] and not sources:
        raise ConfigError(
            "--allow-ca does not work with the self-signed CA of --standalone: it has "
            "pathLenConstraint 0, so no CA certificate it signed would verify. Give a CA that may "
            "sign CAs (--ca-dir or --ca-cert-file/--ca-key-file) or drop --allow-ca"
        )
    ca_secret = None
    if raw["ca-secret"]:
        parts = raw["ca-secret"].split("/")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--ca-secret {raw['ca-secret']!r} must be NAMESPACE/NAME")
        ca_secret = (parts[0], parts[1])
    pod_watch = str(raw["pod-watch"]).strip().lower()
    pod_watch = {"true": "on", "false": "off"}.get(pod_watch, pod_watch)
    if pod_watch not in ("auto", "on", "off"):
        raise ConfigError(f"--pod-watch {raw['pod-watch']!r} must be auto, on or off")
    if raw["log-format"] not in ("auto", "json", "text"):
        raise ConfigError(f"--log-format {raw['log-format']!r} must be auto, json or text")
    for flag in ("renewal-workers", "grpc-workers", "tmpfs-size", "kube-burst", "keygen-workers"):
        if raw[flag] < 1:
            raise ConfigError(f"--{flag} must be at least 1")
    for flag in ("cluster-domain", "trust-domain"):
        if len(raw[flag]) > 253 or not _DOMAIN_RE.fullmatch(raw[flag]):
            raise ConfigError(
                f"--{flag} {raw[flag]!r} must be a lower-case DNS name such as cluster.local"
            )
    node_ca = _node_ca(raw, standalone)
    try:
        pcr_signers = parse_signers(
            raw["pcr-signer-name"] or [],
            raw["pcr-signers"],
            raw["cluster-domain"].strip(".").lower(),
            raw["trust-domain"],
        )
    except PcrConfigError as exc:
        raise ConfigError(str(exc)) from exc
    if pcr_signers and standalone:
        raise ConfigError("--pcr-signer-name needs Kubernetes access; drop --standalone")
    if raw["pcr-publish-trust-bundle"] and not pcr_signers:
        raise ConfigError("--pcr-publish-trust-bundle needs at least one --pcr-signer-name")
    if raw["min-duration"] > raw["max-duration"]:
        raise ConfigError("--min-duration must not be longer than --max-duration")
    if not 0 <= raw["tmpfs-reserve"] < raw["tmpfs-size"]:
        raise ConfigError("--tmpfs-reserve must be at least 0 and less than --tmpfs-size")
    return AgentConfig(
        endpoint=raw["endpoint"],
        node_id=node_id,
        driver_name=driver_name,
        data_root=data_root,
        metrics_address=raw["metrics-address"],
        ca_cert_file=Path(cert_file) if cert_file else None,
        ca_key_file=Path(key_file) if key_file else None,
        ca_dir=Path(raw["ca-dir"]) if raw["ca-dir"] else None,
        ca_secret=ca_secret,
        max_duration_seconds=int(raw["max-duration"]),
        allow_ca=bool(raw["allow-ca"]),
        allowed_namespaces=frozenset(raw["allowed-namespaces"])
        if raw["allowed-namespaces"]
        else None,
        standalone=standalone,
        kubeconfig=raw["kubeconfig"],
        kube_qps=raw["kube-qps"],
        kube_burst=raw["kube-burst"],
        issue_timeout_seconds=raw["issue-timeout"],
        renewal_workers=raw["renewal-workers"],
        grpc_workers=raw["grpc-workers"],
        tmpfs_size_bytes=raw["tmpfs-size"] * 1024 * 1024,
        log_level=raw["log-level"],
        log_format=raw["log-format"],
        node_ca=node_ca,
        cluster_domain=raw["cluster-domain"],
        pod_name=raw["pod-name"],
        pod_uid=raw["pod-uid"],
        pod_namespace=raw["pod-namespace"],
        ca_overlap_seconds=raw["ca-overlap"],
        pod_watch=pod_watch,
        pcr_signers=pcr_signers,
        pcr_publish_trust_bundle=bool(raw["pcr-publish-trust-bundle"]),
        min_duration_seconds=int(raw["min-duration"]),
        min_renewal_interval_seconds=float(raw["min-renewal-interval"]),
        keygen_workers=raw["keygen-workers"],
        tmpfs_reserve_bytes=raw["tmpfs-reserve"] * 1024 * 1024,
        kubelet_root=kubelet_root,
        relaxed_target_paths=bool(raw["relaxed-target-paths"]),
        policy_file=Path(raw["policy"]) if raw["policy"] else None,
        policy_for_cert_manager=bool(raw["policy-for-cert-manager"]),
        trust_domain=raw["trust-domain"],
    )


_NODE_CA_FLAGS = (
    "node-ca-namespace",
    "node-ca-renew-before",
    "node-ca-permitted-dns",
    "node-ca-permitted-uri",
    "node-ca-permitted-email",
    "node-ca-permitted-ip",
)


def _node_ca(raw: dict[str, Any], standalone: bool) -> NodeCAConfig | None:
    name = raw["node-ca-issuer-name"]
    if not name:
        stray = [f"--{flag}" for flag in _NODE_CA_FLAGS if raw[flag] is not None]
        if raw["node-ca-require-name-constraints"]:
            stray.append("--node-ca-require-name-constraints")
        if stray:
            raise ConfigError(f"{', '.join(stray)} only apply with --node-ca-issuer-name")
        return None
    if standalone:
        raise ConfigError("--node-ca-issuer-name needs Kubernetes access; drop --standalone")
    if raw["allow-ca"]:
        raise ConfigError(
            "--allow-ca cannot be used with --node-ca-issuer-name: the node CA signs leaf "
            "certificates only (its issuer sets no path length, so a CA below it would be trusted)"
        )
    kind = raw["node-ca-issuer-kind"]
    if kind not in ("Issuer", "ClusterIssuer"):
        raise ConfigError(f"--node-ca-issuer-kind {kind!r} must be Issuer or ClusterIssuer")
    namespace = raw["node-ca-namespace"] or raw["pod-namespace"]
    if not namespace:
        raise ConfigError(
            "--node-ca-namespace is required unless --pod-namespace names the agent's namespace "
            "(in a DaemonSet set CERT_AGENT_POD_NAMESPACE from metadata.namespace)"
        )
    duration, renew_before = raw["node-ca-duration"], raw["node-ca-renew-before"]
    if renew_before is not None and renew_before >= duration:
        raise ConfigError(
            f"--node-ca-renew-before must be shorter than --node-ca-duration ({duration}s)"
        )
    domain = raw["cluster-domain"].strip(".").lower()
    defaults = {
        "node-ca-permitted-dns": [f"svc.{domain}"],
        "node-ca-permitted-uri": [domain],
        "node-ca-permitted-email": [],
        "node-ca-permitted-ip": [],
    }
    fields = {
        "node-ca-permitted-dns": "dns",
        "node-ca-permitted-uri": "uri_hosts",
        "node-ca-permitted-email": "emails",
        "node-ca-permitted-ip": "ip_networks",
    }
    values: dict[str, list[str]] = {}
    for flag, name_field in fields.items():
        values[name_field] = defaults[flag] if raw[flag] is None else raw[flag]
        try:
            PermittedNames.parse(**{name_field: values[name_field]})
        except ConstraintError as exc:
            raise ConfigError(f"--{flag}: {exc}") from exc
    permitted = PermittedNames.parse(**values)
    return NodeCAConfig(
        issuer_name=name,
        issuer_kind=kind,
        issuer_group=raw["node-ca-issuer-group"],
        namespace=namespace,
        duration_seconds=int(duration),
        renew_before_seconds=None if renew_before is None else int(renew_before),
        permitted=permitted,
        require_name_constraints=bool(raw["node-ca-require-name-constraints"]),
    )
