"""Typed, validated descriptions of what a volume asks for.

``agent.spec.attributes.parse_volume_context`` builds these from a CSI ``volume_context``; the key
generator, CSR builder, issuers and store consume them. All are immutable and JSON-round-trippable
(``to_dict`` / ``from_dict``) so the volume metadata can hold them across agent restarts.
None of them holds key material.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from agent import AGENT_ISSUER_GROUP

DEFAULT_DURATION_SECONDS = 2160 * 3600  # 90 days, as cert-manager's csi-driver
DEFAULT_KEY_USAGES: tuple[str, ...] = ("digital signature", "key encipherment")


@dataclass(frozen=True)
class PodInfo:
    """The pod a volume belongs to, from the ``csi.storage.k8s.io/*`` keys kubelet adds."""

    name: str
    namespace: str
    uid: str
    service_account: str


class KeyAlgorithm(enum.StrEnum):
    RSA = "RSA"
    ECDSA = "ECDSA"
    ED25519 = "Ed25519"


class KeyEncoding(enum.StrEnum):
    PKCS1 = "PKCS1"
    PKCS8 = "PKCS8"


@dataclass(frozen=True)
class KeySpec:
    algorithm: KeyAlgorithm = KeyAlgorithm.RSA
    # Bits for RSA (2048..8192), curve size for ECDSA (256/384/521), None for Ed25519.
    size: int | None = 2048
    encoding: KeyEncoding = KeyEncoding.PKCS1
    reuse: bool = False


@dataclass(frozen=True)
class IssuerRef:
    """Which issuer signs. ``name is None`` means the agent's default (local CA) issuer."""

    name: str | None = None
    kind: str = "Issuer"
    group: str = "cert-manager.io"

    @property
    def is_local(self) -> bool:
        return self.name is None or self.group == AGENT_ISSUER_GROUP

    def describe(self) -> str:
        """A short label for logs, metrics and messages: ``local`` or ``Kind name (group)``,
        e.g. ``ClusterIssuer ca (cert-manager.io)`` (``Kind/name.group`` read like a host)."""
        if self.is_local:
            return "local"  # there is one local CA, however a volume names it
        return f"{self.kind} {self.name} ({self.group})"


@dataclass(frozen=True)
class OtherName:
    """An otherName SAN whose value is a UTF8String (ECK: OID 2.5.4.3)."""

    oid: str
    value: str


@dataclass(frozen=True)
class SubjectSpec:
    common_name: str | None = None
    # An RFC 4514 string; when set it replaces every other subject field but common_name
    # is still rejected alongside it (cert-manager's rule).
    literal_subject: str | None = None
    organizations: tuple[str, ...] = ()
    organizational_units: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    provinces: tuple[str, ...] = ()
    localities: tuple[str, ...] = ()
    street_addresses: tuple[str, ...] = ()
    postal_codes: tuple[str, ...] = ()
    serial_number: str | None = None


@dataclass(frozen=True)
class FileNames:
    certificate: str = "tls.crt"
    ca: str = "ca.crt"
    private_key: str = "tls.key"
    # credential-bundle-file: the key followed by the chain in one PEM file (podCertificate's
    # credentialBundlePath layout), so a reader never pairs a key and a certificate of two
    # different generations.
    credential_bundle: str | None = None


@dataclass(frozen=True)
class Pkcs12Spec:
    filename: str = "keystore.p12"
    # Treated as a secret: never logged, never part of a metrics label or an error message.
    password: str = field(default="", repr=False)


class PodIPSans(enum.StrEnum):
    """Which of the pod's own IPs ip-sans asks for (they are known only once the pod runs)."""

    NONE = ""
    PRIMARY = "POD_IP"  # status.podIPs[0]
    ALL = "POD_IPS"  # every entry of status.podIPs (IPv4 and IPv6)


class TrustBundleKind(enum.StrEnum):
    CONFIGMAP = "configmap"  # a key of a ConfigMap in the pod's namespace (trust-manager targets)
    SIGNER = "signer"  # every ClusterTrustBundle of a signer (and label selector)
    CLUSTER = "cluster"  # one ClusterTrustBundle by name


@dataclass(frozen=True)
class TrustBundleRef:
    """Where ca.crt comes from instead of the issuer's CA."""

    kind: TrustBundleKind
    name: str = ""  # ConfigMap or ClusterTrustBundle name
    key: str = ""  # ConfigMap key
    signer_name: str = ""
    label_selector: str = ""  # only with SIGNER; empty selects every bundle of the signer
    include_issuer: bool = False  # add the issuing CA to the bundle

    def describe(self, namespace: str) -> str:
        """How messages, logs and metrics name the source."""
        if self.kind is TrustBundleKind.CONFIGMAP:
            return f"ConfigMap {namespace}/{self.name} key {self.key}"
        if self.kind is TrustBundleKind.CLUSTER:
            return f"ClusterTrustBundle {self.name}"
        selector = f" with labels {self.label_selector}" if self.label_selector else ""
        return f"ClusterTrustBundles of signer {self.signer_name}{selector}"


@dataclass(frozen=True)
class CertificateSpec:
    """Everything a volume asks for, after templating and validation."""

    issuer: IssuerRef = IssuerRef()
    subject: SubjectSpec = SubjectSpec()
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()  # normalised text form (ipaddress.ip_address(x).compressed)
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    other_names: tuple[OtherName, ...] = ()
    # None: the issuer's default (DEFAULT_DURATION_SECONDS, capped by the issuer's maximum).
    duration_seconds: int | None = None
    # None: one third of the issued certificate's lifetime.
    renew_before_seconds: int | None = None
    key: KeySpec = KeySpec()
    key_usages: tuple[str, ...] = DEFAULT_KEY_USAGES  # cert-manager names, lower case
    is_ca: bool = False
    files: FileNames = FileNames()
    fs_group: int | None = None  # from fs-group; the publisher falls back to volume_mount_group
    pkcs12: Pkcs12Spec | None = None
    # Attributes under foreign prefixes, passed to cert-manager as CertificateRequest annotations.
    annotations: tuple[tuple[str, str], ...] = ()
    pod_ip_sans: PodIPSans = PodIPSans.NONE
    trust_bundle: TrustBundleRef | None = None

    @property
    def wants_pod_ips(self) -> bool:
        return self.pod_ip_sans is not PodIPSans.NONE

    def with_pod_ips(self, pod_ips: tuple[str, ...]) -> CertificateSpec:
        """This spec with the pod's own IPs (from the pod watch, primary first) as IP SANs.

        The IPs only ever come from the pod's status as the API server reports it, never from
        the volume attributes, so a pod cannot claim an address it does not hold.
        """
        chosen = pod_ips[:1] if self.pod_ip_sans is PodIPSans.PRIMARY else pod_ips
        if not self.wants_pod_ips or not chosen:
            return self
        addresses = tuple(dict.fromkeys((*self.ip_addresses, *chosen)))
        return replace(self, ip_addresses=addresses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CertificateSpec:
        key = data["key"]
        return cls(
            issuer=IssuerRef(**data["issuer"]),
            subject=SubjectSpec(**{k: _tuple_if_list(v) for k, v in data["subject"].items()}),
            dns_names=tuple(data["dns_names"]),
            ip_addresses=tuple(data["ip_addresses"]),
            uris=tuple(data["uris"]),
            emails=tuple(data["emails"]),
            other_names=tuple(OtherName(**o) for o in data["other_names"]),
            duration_seconds=data["duration_seconds"],
            renew_before_seconds=data["renew_before_seconds"],
            key=KeySpec(
                algorithm=KeyAlgorithm(key["algorithm"]),
                size=key["size"],
                encoding=KeyEncoding(key["encoding"]),
                reuse=key["reuse"],
            ),
            key_usages=tuple(data["key_usages"]),
            is_ca=data["is_ca"],
            files=FileNames(**data["files"]),
            fs_group=data["fs_group"],
            pkcs12=Pkcs12Spec(**data["pkcs12"]) if data["pkcs12"] else None,
            annotations=tuple((k, v) for k, v in data["annotations"]),
            pod_ip_sans=PodIPSans(data.get("pod_ip_sans", "")),
            trust_bundle=_trust_bundle_from_dict(data.get("trust_bundle")),
        )


def _trust_bundle_from_dict(data: dict[str, Any] | None) -> TrustBundleRef | None:
    if not data:
        return None
    return TrustBundleRef(**{**data, "kind": TrustBundleKind(data["kind"])})


def _tuple_if_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
