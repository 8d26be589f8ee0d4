"""API-server validation for the core kinds the fake serves besides Secrets.

Pods (with the ``status`` subresource), ConfigMaps and ``certificates.k8s.io/v1beta1``
ClusterTrustBundles are checked against the real Kubernetes OpenAPI schemas of their kind
(``kubernetes-validate``, strict: unknown fields rejected like everywhere else in the fake), then
by the semantic rules of the API server's validation for these kinds (ConfigMap keys, the shape
of podIPs, trustBundle PEM, the signer-name prefix of a bundle's name).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import serialization

Obj = dict[str, Any]
Problem = tuple[str, str, str]  # field, reason, message

# The Kubernetes release whose OpenAPI schemas (strict: unknown fields rejected) the fake enforces.
KUBERNETES_VERSION = "1.37.0"


def schema_problems(obj: Obj) -> list[Problem]:
    """The object against the real Kubernetes schema of its kind (kubernetes-validate)."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "<root>"
        return [(where, "FieldValueInvalid", f"Invalid value: {where}: {exc.message}")]
    return []


_CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_MAX_CONFIGMAP_BYTES = 1024 * 1024
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_BUNDLE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.:]*[a-z0-9])?$")


def validate_pod(obj: Obj) -> list[Problem]:
    """podIPs: valid addresses, at most one per family, podIP equal to the first of them."""
    status = obj.get("status") or {}
    problems: list[Problem] = []
    ips = [entry.get("ip", "") for entry in status.get("podIPs") or []]
    families = []
    for i, ip in enumerate(ips):
        try:
            families.append(ipaddress.ip_address(ip).version)
        except ValueError:
            problems.append(
                (
                    f"status.podIPs[{i}].ip",
                    "FieldValueInvalid",
                    f'Invalid value: "{ip}": must be a valid IP address',
                )
            )
    if len(ips) > 2 or len(set(families)) != len(families):
        problems.append(
            (
                "status.podIPs",
                "FieldValueInvalid",
                "may specify no more than one IP for each IP family",
            )
        )
    if ips and status.get("podIP") not in (None, ips[0]):
        problems.append(
            ("status.podIP", "FieldValueInvalid", "must match the first element of podIPs")
        )
    return problems


def validate_configmap(obj: Obj) -> list[Problem]:
    problems: list[Problem] = []
    data, binary = obj.get("data") or {}, obj.get("binaryData") or {}
    for field, values in (("data", data), ("binaryData", binary)):
        for key in values:
            if len(key) > 253 or not _CONFIGMAP_KEY.match(key):
                problems.append(
                    (
                        f"{field}[{key}]",
                        "FieldValueInvalid",
                        f'Invalid value: "{key}": a valid config key must consist of alphanumeric '
                        "characters, '-', '_' or '.'",
                    )
                )
            if key in data and field == "binaryData":
                problems.append(
                    (f"binaryData[{key}]", "FieldValueInvalid", "duplicate of key present in data")
                )
    size = sum(len(k) + len(str(v)) for v in (data, binary) for k, v in v.items())
    if size > _MAX_CONFIGMAP_BYTES:
        problems.append(
            ("", "FieldValueTooLong", f"Too long: must have at most {_MAX_CONFIGMAP_BYTES} bytes")
        )
    return problems


def validate_cluster_trust_bundle(obj: Obj) -> list[Problem]:
    """The API server's rules: name prefix by signer, and a PEM bundle of distinct CA certs."""
    problems: list[Problem] = []
    name = (obj.get("metadata") or {}).get("name", "")
    spec = obj.get("spec") or {}
    signer = spec.get("signerName") or ""
    if name and (len(name) > 253 or not _BUNDLE_NAME.match(name)):
        problems.append(("metadata.name", "FieldValueInvalid", f'Invalid value: "{name}"'))
    if signer:
        prefix = signer.replace("/", ":") + ":"
        if not name.startswith(prefix):
            problems.append(
                (
                    "metadata.name",
                    "FieldValueInvalid",
                    f'Invalid value: "{name}": ClusterTrustBundle for signerName {signer} must be '
                    f"named with prefix {prefix}",
                )
            )
    elif ":" in name:
        problems.append(
            (
                "metadata.name",
                "FieldValueInvalid",
                f'Invalid value: "{name}": ClusterTrustBundle without signer name must not '
                'have ":" in its name',
            )
        )
    text = spec.get("trustBundle")
    if isinstance(text, str):
        problems += _trust_bundle_problems(text)
    return problems


def _trust_bundle_problems(text: str) -> list[Problem]:
    field = "spec.trustBundle"
    blocks = list(_PEM_BLOCK.finditer(text))
    if not blocks:
        return [
            (
                field,
                "FieldValueInvalid",
                'Invalid value: "<value omitted>": at least one trust anchor must be provided',
            )
        ]
    seen: set[bytes] = set()
    for index, block in enumerate(blocks):
        if block.group(1) != "CERTIFICATE":
            return [
                (
                    field,
                    "FieldValueInvalid",
                    f'Invalid value: "<value omitted>": entry {index} has bad block type: '
                    f"{block.group(1)}",
                )
            ]
        if ":" in block.group(2).split("\n", 1)[0]:
            return [
                (
                    field,
                    "FieldValueInvalid",
                    f'Invalid value: "<value omitted>": entry {index} has PEM block headers',
                )
            ]
        try:
            cert = x509.load_pem_x509_certificate(block.group(0).encode())
        except ValueError:
            return [
                (
                    field,
                    "FieldValueInvalid",
                    f'Invalid value: "<value omitted>": entry {index} does not parse as X.509',
                )
            ]
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            return [
                (
                    field,
                    "FieldValueInvalid",
                    f'Invalid value: "<value omitted>": entry {index} does not have the CA bit set',
                )
            ]
        der = cert.public_bytes(serialization.Encoding.DER)
        if der in seen:
            return [
                (
                    field,
                    "FieldValueInvalid",
                    f'Invalid value: "<value omitted>": duplicate trust anchor (indices [{index}])',
                )
            ]
        seen.add(der)
    return []
