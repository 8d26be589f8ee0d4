"""The settings table: every ``serve`` flag with its help, default and kind (``agent/config``).

A new setting is a row here (at the end of its group), an ``AgentConfig`` field
(``config_model``) and, if it needs a rule, a check in ``config_checks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent import DEFAULT_DRIVER_NAME

ENV_PREFIX = "CERT_AGENT_"
DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_METRICS_ADDRESS = ":9402"
DEFAULT_KUBELET_ROOT = "/var/lib/kubelet"


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


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")
