"""The rules across settings: required ones, one CA source, modes that exclude each other.

``build_config`` turns the merged raw values (``agent/config.resolve``) into an ``AgentConfig``
or raises a ``ConfigError`` that names the flag and says what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config_model import AgentConfig, ConfigError, NodeCAConfig, socket_path_from_endpoint
from agent.pki.name_constraints import ConstraintError, PermittedNames

if TYPE_CHECKING:
    from agent.spec.pcr import PcrSignerConfig

# CSI GetPluginInfo: at most 63 characters, alphanumeric at both ends, dashes and dots between.
_DRIVER_NAME_RE = re.compile(r"(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def build_config(raw: dict[str, Any]) -> AgentConfig:
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
    pcr_signers = _pcr_signers(raw)
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


def _pcr_signers(raw: dict[str, Any]) -> tuple[PcrSignerConfig, ...]:
    if not raw["pcr-signer-name"] and raw["pcr-signers"] in (None, "", {}):
        return ()  # without a signer, its modules are not imported (a share of the start)
    from agent.spec.pcr import PcrConfigError, parse_signers

    try:
        return parse_signers(
            raw["pcr-signer-name"] or [],
            raw["pcr-signers"],
            raw["cluster-domain"].strip(".").lower(),
            raw["trust-domain"],
        )
    except PcrConfigError as exc:
        raise ConfigError(str(exc)) from exc


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
