"""The resolved configuration (``AgentConfig``) and the error every bad setting raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config_settings import DEFAULT_KUBELET_ROOT
from agent.pki.name_constraints import PermittedNames

if TYPE_CHECKING:  # only a PodCertificateRequest signer's start imports it
    from agent.spec.pcr import PcrSignerConfig


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the setting."""


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


def socket_path_from_endpoint(endpoint: str) -> Path:
    if not endpoint.startswith("unix://"):
        raise ConfigError(f"--endpoint {endpoint!r} must be unix:///absolute/path")
    path = endpoint[len("unix://") :]
    if not path.startswith("/"):
        raise ConfigError(f"--endpoint {endpoint!r} must name an absolute socket path")
    return Path(path)
