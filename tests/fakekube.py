"""An in-process fake Kubernetes API server and a fake cert-manager CA signer, for tests.

``FakeKube`` speaks the real REST protocol over HTTP (or HTTPS with client-certificate
authentication: ``start(tls=...)``) on 127.0.0.1, so the agent's client (kube/rest.py), configured
from a kubeconfig file, talks to it unchanged, for:

- ``/apis/cert-manager.io/v1/namespaces/{ns}/certificaterequests`` and
  ``/api/v1/namespaces/{ns}/secrets``: create (``generateName`` too), get, list and watch
  (``labelSelector``, ``fieldSelector``, ``resourceVersion``, ``timeoutSeconds``), delete, update,
  and ``/status`` update and merge-patch;
- ``/apis/events.k8s.io/v1/namespaces/{ns}/events``: create and merge-patch, validated against
  the Event's OpenAPI schema shipped by kubernetes-validate (strict) plus the API server's own
  ValidateEventCreate/Update rules (eventTime, reportingController/Instance, action, reason, type,
  the 1 KiB note, series, immutable fields), so a malformed Event gets the real 422;
- ``/api``, ``/apis`` and ``/version`` discovery, minimal;
- Status objects in the real shape for 401/403/404/409/410/422/429/500.

Every created or updated CertificateRequest is validated against cert-manager's CRD schema (the
project's copy of its fields, types, enums and required lists in ``tests/schemas/``, see
``tests/crds.py``; its metadata against ObjectMeta rules) and rejected with 422 like the real API
server. One deliberate difference: unknown fields are rejected (the real server prunes them
with a warning), so a typo in what the agent sends cannot pass unnoticed.

Fault injection: ``fail_next`` (429 with Retry-After, 500, ...), ``drop_watches`` (a watch is cut
mid-stream after K events), ``forbid`` (RBAC 403), ``expire_history`` (old resourceVersions get
410 Gone). ``FakeSigner`` behaves like cert-manager's approver plus its CA issuer, using the
condition shapes cert-manager writes; it can also deny, fail, hold requests, or go slow.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import datetime as dt
import functools
import json
import queue
import random
import re
import socket
import ssl
import string
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.crds import CERTIFICATE_REQUESTS, SCHEMA_DIR, load_crd, storage_version
from tests.fakekube_core import (
    schema_problems,
    validate_cluster_trust_bundle,
    validate_configmap,
    validate_pod,
)

CM_GROUP = "cert-manager.io"
CR_PLURAL = "certificaterequests"
AGENT_TOKEN = "agent-token"
AGENT_USER = "system:serviceaccount:cert-agent:cert-agent"

Obj = dict[str, Any]


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    schema: Obj | None = None  # openAPIV3Schema for custom resources
    status_subresource: bool = False
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def kind_qualified(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


def load_crd_resource(filename: str, directory: Path = SCHEMA_DIR) -> Resource:
    crd = load_crd(filename, directory)
    spec = crd["spec"]
    version = storage_version(crd)
    return Resource(
        group=spec["group"],
        version=version["name"],
        plural=spec["names"]["plural"],
        kind=spec["names"]["kind"],
        schema=version["schema"]["openAPIV3Schema"],
        status_subresource="status" in (version.get("subresources") or {}),
    )


SECRETS = Resource("", "v1", "secrets", "Secret")
PODS = Resource("", "v1", "pods", "Pod", status_subresource=True)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
CLUSTER_TRUST_BUNDLES = Resource(
    "certificates.k8s.io", "v1beta1", "clustertrustbundles", "ClusterTrustBundle", namespaced=False
)
# Field selectors the real API server supports per kind (besides metadata.name/namespace).
_EXTRA_FIELDS: dict[str, dict[str, Callable[[Obj], str]]] = {
    "secrets": {"type": lambda o: o.get("type", "Opaque")},
    "pods": {
        "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
        "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
    },
    "clustertrustbundles": {
        "spec.signerName": lambda o: (o.get("spec") or {}).get("signerName", "")
    },
}
_CORE_VALIDATORS: dict[str, Callable[[Obj], list[tuple[str, str, str]]]] = {
    "pods": validate_pod,
    "configmaps": validate_configmap,
    "clustertrustbundles": validate_cluster_trust_bundle,
}
EVENTS = Resource("events.k8s.io", "v1", "events", "Event")


# --------------------------------------------------------------------------- validation

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass
class Cause:
    field: str
    reason: str  # FieldValueRequired, FieldValueInvalid, FieldValueNotSupported, FieldValueTooLong
    message: str


def _qualified_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
            "and end with an alphanumeric character, at most 63 characters"
        )
    return None


def validate_object_meta(meta: Any, *, namespaced: bool = True) -> list[Cause]:
    """The ObjectMeta rules the API server enforces for every object."""
    causes: list[Cause] = []
    if not isinstance(meta, dict):
        return [Cause("metadata", "FieldValueRequired", "Required value")]
    name = meta.get("name")
    if name is not None and (len(name) > 253 or not _DNS_SUBDOMAIN.match(name)):
        causes.append(
            Cause(
                "metadata.name",
                "FieldValueInvalid",
                f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower '
                "case alphanumeric characters, '-' or '.'",
            )
        )
    for key, value in (meta.get("labels") or {}).items():
        problem = _qualified_key_problem(key)
        if problem:
            causes.append(
                Cause("metadata.labels", "FieldValueInvalid", f'Invalid value: "{key}": {problem}')
            )
        if not isinstance(value, str):
            causes.append(Cause(f"metadata.labels[{key}]", "FieldValueInvalid", "must be a string"))
        elif len(value) > 63:
            causes.append(
                Cause(
                    "metadata.labels",
                    "FieldValueInvalid",
                    f'Invalid value: "{value}": must be no more than 63 characters',
                )
            )
        elif not _LABEL_VALUE.match(value):
            causes.append(
                Cause(
                    "metadata.labels",
                    "FieldValueInvalid",
                    f'Invalid value: "{value}": a valid label must be an empty string or consist '
                    "of alphanumeric characters, '-', '_' or '.'",
                )
            )
    annotations = meta.get("annotations") or {}
    total = 0
    for key, value in annotations.items():
        problem = _qualified_key_problem(key.lower())
        if problem:
            causes.append(
                Cause("metadata.annotations", "FieldValueInvalid", f'Invalid value: "{key}"')
            )
        if not isinstance(value, str):
            causes.append(
                Cause(f"metadata.annotations[{key}]", "FieldValueInvalid", "must be a string")
            )
            continue
        total += len(key) + len(value)
    if total > 256 * 1024:
        causes.append(
            Cause("metadata.annotations", "FieldValueTooLong", "Too long: must have at most 262144")
        )
    controllers = 0
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for required in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(required):
                causes.append(
                    Cause(
                        f"metadata.ownerReferences[{i}].{required}",
                        "FieldValueRequired",
                        "Required value",
                    )
                )
        controllers += bool(ref.get("controller"))
    if controllers > 1:
        causes.append(
            Cause(
                "metadata.ownerReferences",
                "FieldValueInvalid",
                "Only one reference can have Controller set to true",
            )
        )
    return causes


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def validate_schema(value: Any, schema: Obj, path: str = "") -> list[Cause]:
    """The subset of structural OpenAPI v3 the cert-manager CRDs use."""
    causes: list[Cause] = []
    where = path or "<root>"
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind in _TYPES:
        ok = isinstance(value, _TYPES[kind])
    else:
        ok = True
    if not ok:
        shown = type(value).__name__
        return [
            Cause(
                where,
                "FieldValueInvalid",
                f'Invalid value: "{shown}": {where} in body must be of type {kind}: "{shown}"',
            )
        ]
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(f'"{v}"' for v in schema["enum"])
        causes.append(
            Cause(
                where,
                "FieldValueNotSupported",
                f'Unsupported value: "{value}": supported values: {supported}',
            )
        )
    fmt = schema.get("format")
    if isinstance(value, str) and fmt == "byte":
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            causes.append(
                Cause(where, "FieldValueInvalid", f"Invalid value: {where} in body must be base64")
            )
    if isinstance(value, str) and fmt == "date-time":
        try:
            dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            causes.append(
                Cause(where, "FieldValueInvalid", f"Invalid value: {where} must be date-time")
            )
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for req in schema.get("required") or []:
            if req not in value:
                causes.append(Cause(_join(path, req), "FieldValueRequired", "Required value"))
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                if path == "" and key == "metadata":
                    continue  # ObjectMeta is validated by its own rules
                causes.extend(validate_schema(sub, props[key], _join(path, key)))
            elif isinstance(extra, dict):
                causes.extend(validate_schema(sub, extra, f"{where}[{key}]"))
            elif props and not schema.get("x-kubernetes-preserve-unknown-fields"):
                causes.append(
                    Cause(_join(path, key), "FieldValueInvalid", f'unknown field "{key}"')
                )
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            causes.extend(validate_schema(item, schema["items"], f"{where}[{i}]"))
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                causes.append(Cause(where, "FieldValueDuplicate", "Duplicate value"))
    return causes


# k8s.io/kubernetes/pkg/apis/core/validation/events.go
EVENT_NOTE_LIMIT = 1024
EVENT_FIELD_LIMIT = 128
_EVENT_IMMUTABLE = (
    "regarding",
    "related",
    "reason",
    "note",
    "type",
    "eventTime",
    "action",
    "reportingController",
    "reportingInstance",
)


def _micro_time_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a MicroTime string"
    if not re.fullmatch(
        r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", value
    ):
        return f'Invalid value: "{value}": must be RFC 3339 with microseconds (MicroTime)'
    return None


@functools.cache
def _event_validator() -> Any:
    """The events.k8s.io/v1 Event JSON schema (strict: unknown fields are errors) that
    kubernetes-validate ships for the newest Kubernetes it knows, compiled once."""
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry
    from referencing import Resource as SchemaResource

    version = kubernetes_validate.latest_version()
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = schema_contents(f"{folder}/event-events-v1.json", version)
    definitions = schema_contents(f"{folder}/_definitions.json", version)
    registry = SchemaResource.from_contents(definitions) @ (
        SchemaResource.from_contents(schema) @ Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_event_schema(obj: Obj) -> list[Cause]:
    causes = []
    for error in _event_validator().iter_errors(obj):
        where = ".".join(str(p) for p in error.path) or "<root>"
        causes.append(Cause(where, "FieldValueInvalid", f"Invalid value: {error.message}"))
    return causes


def validate_event_create(obj: Obj, namespace: str) -> list[Cause]:
    """ValidateEventCreate for the events.k8s.io/v1 API (strict validation of new Events)."""
    causes = validate_event_schema(obj)
    if not obj.get("eventTime"):
        causes.append(Cause("eventTime", "FieldValueRequired", "Required value"))
    else:
        problem = _micro_time_problem(obj["eventTime"])
        if problem:
            causes.append(Cause("eventTime", "FieldValueInvalid", problem))
    if obj.get("type") not in ("Normal", "Warning"):
        causes.append(
            Cause("type", "FieldValueInvalid", f"has invalid value: {obj.get('type') or ''}")
        )
    for deprecated in ("deprecatedFirstTimestamp", "deprecatedLastTimestamp", "deprecatedCount"):
        if obj.get(deprecated):
            causes.append(Cause(deprecated, "FieldValueInvalid", "needs to be unset"))
    regarding = obj.get("regarding") or {}
    ref_ns = regarding.get("namespace", "")
    if ref_ns and ref_ns != namespace:
        causes.append(
            Cause("regarding.namespace", "FieldValueInvalid", "does not match event.namespace")
        )
    if not ref_ns and namespace not in ("default", "kube-system"):
        causes.append(
            Cause("regarding.namespace", "FieldValueInvalid", "does not match event.namespace")
        )
    controller = obj.get("reportingController") or ""
    if not controller:
        causes.append(Cause("reportingController", "FieldValueRequired", "Required value"))
    elif _qualified_key_problem(controller):
        causes.append(
            Cause(
                "reportingController", "FieldValueInvalid", str(_qualified_key_problem(controller))
            )
        )
    for name in ("reportingInstance", "action", "reason"):
        value = obj.get(name) or ""
        if not value:
            causes.append(Cause(name, "FieldValueRequired", "Required value"))
        elif len(value) > EVENT_FIELD_LIMIT:
            causes.append(
                Cause(name, "FieldValueInvalid", f"can have at most {EVENT_FIELD_LIMIT} characters")
            )
    if len((obj.get("note") or "").encode()) > EVENT_NOTE_LIMIT:
        # Go's len(): bytes, not characters.
        causes.append(
            Cause("note", "FieldValueInvalid", f"can have at most {EVENT_NOTE_LIMIT} characters")
        )
    causes += _validate_event_series(obj)
    return causes


def _validate_event_series(obj: Obj) -> list[Cause]:
    series = obj.get("series")
    if series is None:
        return []
    causes = []
    if not isinstance(series.get("count"), int) or series["count"] < 2:
        causes.append(Cause("series.count", "FieldValueInvalid", "should be at least 2"))
    if not series.get("lastObservedTime"):
        causes.append(Cause("series.lastObservedTime", "FieldValueRequired", "Required value"))
    elif _micro_time_problem(series["lastObservedTime"]):
        causes.append(
            Cause(
                "series.lastObservedTime",
                "FieldValueInvalid",
                str(_micro_time_problem(series["lastObservedTime"])),
            )
        )
    return causes


def validate_event_update(new: Obj, old: Obj) -> list[Cause]:
    """ValidateEventUpdate: the schema, a changed series is valid, everything else immutable."""
    causes = validate_event_schema(new)
    if new.get("series") != old.get("series"):
        causes += _validate_event_series(new)
    for name in _EVENT_IMMUTABLE:
        if new.get(name) != old.get(name):
            causes.append(Cause(name, "FieldValueInvalid", "field is immutable"))
    return causes


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- statuses


class ApiError(Exception):
    def __init__(
        self, code: int, reason: str, message: str, details: Obj | None = None, **headers: str
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{res.qualified} "{name}" not found',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def invalid(res: Resource, name: str, causes: list[Cause]) -> ApiError:
    parts = [f"{c.field}: {c.message}" for c in causes]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    return ApiError(
        422,
        "Invalid",
        f'{res.kind_qualified} "{name}" is invalid: {joined}',
        {
            "name": name,
            "group": res.group,
            "kind": res.kind,
            "causes": [
                {"reason": c.reason, "message": c.message, "field": c.field} for c in causes
            ],
        },
    )


def rfc3339(when: dt.datetime | None = None) -> str:
    return (when or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- selectors

_SET_EXPR = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in _split_selector(selector):
        term = term.strip()
        m = _SET_EXPR.match(term)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            inside = labels.get(m.group(1)) in values
            if inside != (m.group(2) == "in"):
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(res: Resource, selector: str, obj: Obj) -> bool:
    fields = {
        "metadata.name": obj["metadata"]["name"],
        "metadata.namespace": obj["metadata"].get("namespace", ""),
    }
    for field_name, getter in _EXTRA_FIELDS.get(res.plural, {}).items():
        fields[field_name] = getter(obj)
    for term in _split_selector(selector):
        negate = "!=" in term
        key, value = (s.strip() for s in re.split(r"!=|==|=", term, maxsplit=1))
        if key not in fields:
            raise ApiError(
                400,
                "BadRequest",
                f'"{key}" is not a known field selector: only '
                + ", ".join(f'"{k}"' for k in fields),
            )
        if (fields[key] == value) == negate:
            return False
    return True


# --------------------------------------------------------------------------- the store


@dataclass
class Event:
    rv: int
    res: Resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj


@dataclass
class Fault:
    status: int
    remaining: int
    retry_after: int | None
    method: str | None
    path_contains: str | None
    watch: bool | None

    def matches(self, method: str, path: str, is_watch: bool) -> bool:
        return (
            (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in path)
            and (self.watch is None or self.watch == is_watch)
        )


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    user: str | None
    body: Obj | None = None
    headers: dict[str, str] = field(default_factory=dict)
    client_cert: str | None = None  # the CN of the TLS client certificate, if one was presented


@dataclass
class WatchDrop:
    after_events: int
    remaining: int


class FakeKube:
    """The fake API server: an object store, an event history, and the HTTP front end."""

    def __init__(self) -> None:
        self.certificate_requests = load_crd_resource(CERTIFICATE_REQUESTS)
        self.resources = {
            (r.group, r.plural): r
            for r in (
                self.certificate_requests,
                SECRETS,
                PODS,
                CONFIGMAPS,
                CLUSTER_TRUST_BUNDLES,
                EVENTS,
            )
        }
        self.users: dict[str, str] = {AGENT_TOKEN: AGENT_USER}
        # Over TLS (start(tls=...)): a client certificate's CN -> user, as x509 authentication.
        self.cert_users: dict[str, str] = {}
        self._tls = False
        # plural -> an object with on_create(res, obj) and on_update(res, old, new, status_only)
        # that default and validate like the real API server (tests/fake_pcr.py: PCRs).
        self.kind_hooks: dict[str, Any] = {}
        self.requests: list[RequestRecord] = []
        self._objects: dict[tuple[str, str, str, str], Obj] = {}
        self._history: list[Event] = []
        self._compacted = 0
        self._rv = 100
        self._cond = threading.Condition()
        self._faults: list[Fault] = []
        self._drops: list[WatchDrop] = []
        self._forbidden: set[tuple[str, str]] = set()
        self._listeners: list[Callable[[Event], None]] = []
        self._active_watches: list[RequestRecord] = []
        self._stopping = False
        self._cut_generation = 0
        self._gone = 0
        self._hang: list[str] = []
        self._gone_path = ""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self, tls: ssl.SSLContext | None = None) -> FakeKube:
        """Serve plain HTTP, or HTTPS with ``tls`` (a server context; ask for client
        certificates with ``verify_mode = CERT_OPTIONAL`` and the client CA loaded)."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        if tls is not None:
            # The handshake runs on the handler's first read, in its own thread.
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
            self._tls = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{'https' if self._tls else 'http'}://{host!s}:{port}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def write_kubeconfig(self, path: Path, token: str = AGENT_TOKEN) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # ---- fault injection

    def fail_next(
        self,
        count: int,
        status: int,
        *,
        retry_after: int | None = None,
        method: str | None = None,
        path_contains: str | None = None,
        watch: bool | None = None,
    ) -> None:
        """The next ``count`` matching requests answer ``status`` (a Status object)."""
        with self._cond:
            self._faults.append(Fault(status, count, retry_after, method, path_contains, watch))

    def hang(self, path_contains: str) -> None:
        """Matching requests are read, recorded, and then never answered (an API server that
        accepts connections but is stuck) until ``release_hung`` or ``stop``."""
        with self._cond:
            self._hang.append(path_contains)

    def release_hung(self) -> None:
        with self._cond:
            self._hang.clear()
            self._cond.notify_all()

    def _wait_if_hung(self, path: str) -> bool:
        """Block while ``path`` is held; True if it was (the request then goes unanswered)."""
        held = False
        with self._cond:
            while not self._stopping and any(part in path for part in self._hang):
                held = True
                self._cond.wait()
        return held

    def clear_faults(self) -> None:
        """The API answers normally again (the outage is over)."""
        with self._cond:
            self._faults.clear()

    def drop_watches(self, after_events: int, count: int = 1) -> None:
        """The next ``count`` watches are cut (connection reset mid-stream) after K events."""
        with self._cond:
            self._drops.append(WatchDrop(after_events, count))

    def forbid(self, verb: str, plural: str) -> None:
        """RBAC: ``verb`` (create, get, list, watch, delete, update, patch) on ``plural`` → 403."""
        with self._cond:
            self._forbidden.add((verb, plural))

    def cut_watches(self) -> None:
        """Cut every open watch now, as an API server restart does."""
        with self._cond:
            self._cut_generation += 1
            self._cond.notify_all()

    def gone_next_watches(self, count: int = 1, path_contains: str = "") -> None:
        """The next ``count`` watches (on matching paths) answer 410 Gone (an ERROR event),
        whatever their version."""
        with self._cond:
            self._gone += count
            self._gone_path = path_contains

    @property
    def gone_pending(self) -> int:
        with self._cond:
            return self._gone

    def expire_history(self) -> None:
        """Compact: watches from any resourceVersion up to now answer 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._history.clear()

    # ---- in-process access (tests and the signer)

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        with self._cond:
            self._listeners.append(listener)

    def get(self, res: Resource, namespace: str, name: str) -> Obj:
        with self._cond:
            obj = self._objects.get((res.group, res.plural, namespace, name))
            if obj is None:
                raise not_found(res, name)
            return copy.deepcopy(obj)

    def list(self, res: Resource, namespace: str | None = None) -> list[Obj]:
        with self._cond:
            return [
                copy.deepcopy(o)
                for (g, p, ns, _), o in sorted(self._objects.items())
                if (g, p) == (res.group, res.plural) and namespace in (None, ns)
            ]

    def list_crs(self, namespace: str | None = None) -> list[Obj]:
        return self.list(self.certificate_requests, namespace)

    def list_events(self, namespace: str | None = None) -> list[Obj]:
        return self.list(EVENTS, namespace)

    def create(self, res: Resource, namespace: str, obj: Obj, user: str | None = None) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise invalid(res, "", [Cause("metadata", "FieldValueInvalid", "must be an object")])
        if obj.get("apiVersion") != res.api_version or obj.get("kind") != res.kind:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({obj.get('apiVersion')}) does not match the "
                f"expected API version ({res.api_version})",
            )
        if not res.namespaced:
            namespace = ""
            meta.pop("namespace", None)
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        with self._cond:
            if not meta.get("name"):
                prefix = meta.get("generateName")
                if not prefix:
                    raise invalid(
                        res,
                        "",
                        [
                            Cause(
                                "metadata.name",
                                "FieldValueRequired",
                                "Required value: name or generateName is required",
                            )
                        ],
                    )
                alphabet = "bcdfghjklmnpqrstvwxz2456789"
                meta["name"] = prefix[:58] + "".join(random.choice(alphabet) for _ in range(5))
            name = meta["name"]
            if res.status_subresource:
                obj.pop("status", None)  # status is set through /status only
            if res is self.certificate_requests and user is not None:
                # What cert-manager's webhook does: record who created the request.
                obj.setdefault("spec", {})["username"] = user
            self._validate(res, obj)
            if res.plural in self.kind_hooks:  # admission of kinds added by other modules
                self.kind_hooks[res.plural].on_create(res, obj)
            if res is EVENTS:
                causes = validate_event_create(obj, namespace)
                if causes:
                    raise invalid(res, name, causes)
            key = (res.group, res.plural, namespace, name)
            if key in self._objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{res.qualified} "{name}" already exists',
                    {"name": name, "group": res.group, "kind": res.plural},
                )
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=rfc3339(), generation=1)
            if res.namespaced:
                meta["namespace"] = namespace
            return self._commit(res, key, obj, "ADDED")

    def update(self, res: Resource, namespace: str, obj: Obj, *, status_only: bool = False) -> Obj:
        """PUT semantics: optimistic concurrency when metadata.resourceVersion is set."""
        with self._cond:
            name = obj.get("metadata", {}).get("name", "")
            key = (res.group, res.plural, namespace, name)
            current = self._objects.get(key)
            if current is None:
                raise not_found(res, name)
            rv = obj.get("metadata", {}).get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {res.qualified} "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                    {"name": name, "group": res.group, "kind": res.plural},
                )
            new = copy.deepcopy(current)
            if status_only:
                new["status"] = copy.deepcopy(obj.get("status", {}))
            else:
                for k, v in obj.items():
                    if k not in ("metadata", "status"):
                        new[k] = copy.deepcopy(v)
                for k in ("labels", "annotations", "ownerReferences"):
                    if k in obj.get("metadata", {}):
                        new["metadata"][k] = copy.deepcopy(obj["metadata"][k])
                if not res.status_subresource and "status" in obj:
                    new["status"] = copy.deepcopy(obj["status"])
            self._validate(res, new)
            if res.plural in self.kind_hooks:
                self.kind_hooks[res.plural].on_update(res, current, new, status_only)
            if res is EVENTS:
                causes = validate_event_update(new, current)
                if causes:
                    raise invalid(res, name, causes)
            return self._commit(res, key, new, "MODIFIED")

    def patch_status(self, res: Resource, namespace: str, name: str, patch: Obj) -> Obj:
        with self._cond:
            current = self.get(res, namespace, name)
            merged = _merge_patch(current, {"status": patch.get("status", {})})
            merged["metadata"].pop("resourceVersion", None)
            return self.update(res, namespace, merged, status_only=True)

    def delete(self, res: Resource, namespace: str, name: str) -> Obj:
        with self._cond:
            key = (res.group, res.plural, namespace, name)
            obj = self._objects.pop(key, None)
            if obj is None:
                raise not_found(res, name)
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._publish(Event(self._rv, res, "DELETED", obj))
            return copy.deepcopy(obj)

    def put_secret(self, namespace: str, name: str, data: dict[str, bytes]) -> Obj:
        """Create or replace a Secret (as ``kubectl apply`` would)."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        with self._cond:
            if (SECRETS.group, SECRETS.plural, namespace, name) in self._objects:
                return self.update(SECRETS, namespace, body)
            return self.create(SECRETS, namespace, body)

    def put_pod(self, namespace: str, name: str, node: str) -> Obj:
        """Create a pod scheduled to ``node``, Pending without an IP (as when kubelet mounts its
        volumes); tests publish its volume with the returned ``metadata.uid``."""
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
        }
        with self._cond:
            self.create(PODS, namespace, body)
            return self.patch_status(PODS, namespace, name, {"status": {"phase": "Pending"}})

    def set_pod_ips(self, namespace: str, name: str, ips: list[str]) -> Obj:
        """What kubelet does once the sandbox has its network: status.podIP(s), Running."""
        status: Obj = {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]}
        status["podIP"] = ips[0] if ips else None
        return self.patch_status(PODS, namespace, name, {"status": status})

    def put_configmap(self, namespace: str, name: str, data: dict[str, str]) -> Obj:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        with self._cond:
            if (CONFIGMAPS.group, CONFIGMAPS.plural, namespace, name) in self._objects:
                return self.update(CONFIGMAPS, namespace, body)
            return self.create(CONFIGMAPS, namespace, body)

    def put_cluster_trust_bundle(
        self, name: str, pem_text: str, signer: str = "", labels: dict[str, str] | None = None
    ) -> Obj:
        spec: Obj = {"trustBundle": pem_text}
        if signer:
            spec["signerName"] = signer
        body = {
            "apiVersion": f"{CLUSTER_TRUST_BUNDLES.group}/{CLUSTER_TRUST_BUNDLES.version}",
            "kind": "ClusterTrustBundle",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": spec,
        }
        with self._cond:
            key = (CLUSTER_TRUST_BUNDLES.group, CLUSTER_TRUST_BUNDLES.plural, "", name)
            if key in self._objects:
                return self.update(CLUSTER_TRUST_BUNDLES, "", body)
            return self.create(CLUSTER_TRUST_BUNDLES, "", body)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        """Block until ``predicate()`` (checked on every request and change) or fail."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("fake API server: condition not reached in time")
                self._cond.wait(min(remaining, 0.2))

    def wait_for_watch(self, number: int, path_contains: str = "", timeout: float = 10) -> None:
        """Block until the ``number``-th watch request (1-based) on matching paths is streaming."""

        def streaming() -> bool:
            watches = [
                r
                for r in self.requests
                if r.method == "GET"
                and path_contains in r.path
                and r.query.get("watch") in ("true", "1")
            ]
            return len(watches) >= number and watches[number - 1] in self._active_watches

        self.wait_until(streaming, timeout)

    def active_watches(self, path_contains: str = "") -> list[RequestRecord]:
        with self._cond:
            return [w for w in self._active_watches if path_contains in w.path]

    def count(self, method: str, path_contains: str = "", *, watch: bool = False) -> int:
        with self._cond:
            return sum(
                1
                for r in self.requests
                if r.method == method
                and path_contains in r.path
                and (r.query.get("watch") in ("true", "1")) == watch
            )

    # ---- internals

    def _validate(self, res: Resource, obj: Obj) -> None:
        meta = obj.get("metadata")
        if res is CLUSTER_TRUST_BUNDLES and isinstance(meta, dict):
            # Bundle names carry the signer with ':' (validate_cluster_trust_bundle checks them).
            meta = {k: v for k, v in meta.items() if k != "name"}
        causes = validate_object_meta(meta)
        validator = _CORE_VALIDATORS.get(res.plural)
        if validator is not None:
            problems = schema_problems(obj) or validator(obj)
            causes += [Cause(*problem) for problem in problems]
        if res.schema is not None:
            causes += validate_schema(obj, res.schema)
        if res is SECRETS:
            for k, v in (obj.get("data") or {}).items():
                try:
                    base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError, TypeError):
                    causes.append(Cause(f"data[{k}]", "FieldValueInvalid", "must be base64"))
        if causes:
            raise invalid(res, obj.get("metadata", {}).get("name", ""), causes)

    def _commit(self, res: Resource, key: tuple[str, str, str, str], obj: Obj, kind: str) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key] = obj
        self._publish(Event(self._rv, res, kind, copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    def _publish(self, event: Event) -> None:
        self._history.append(event)
        self._cond.notify_all()
        for listener in self._listeners:
            listener(event)

    def _record(self, record: RequestRecord) -> None:
        with self._cond:
            self.requests.append(record)
            self._cond.notify_all()

    def _take_fault(self, method: str, path: str, is_watch: bool) -> Fault | None:
        with self._cond:
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(method, path, is_watch):
                    fault.remaining -= 1
                    return fault
        return None

    def _take_gone(self, path: str) -> bool:
        with self._cond:
            if self._gone > 0 and self._gone_path in path:
                self._gone -= 1
                self._cond.notify_all()
                return True
        return False

    def _take_drop(self) -> int | None:
        with self._cond:
            for drop in self._drops:
                if drop.remaining > 0:
                    drop.remaining -= 1
                    return drop.after_events
        return None

    def _watch_events(
        self, res: Resource, namespace: str | None, since: int, deadline: float, generation: int
    ) -> Iterator[Event | str]:
        """Events after ``since`` in order, then ``"end"`` (deadline, shutdown) or ``"cut"``
        (when ``cut_watches`` ran after the watch registered at ``generation``)."""
        with self._cond:
            if since < self._compacted:
                raise ApiError(
                    410, "Expired", f"too old resource version: {since} ({self._compacted})"
                )
        while True:
            outcome = None
            with self._cond:
                batch: list[Event] = []
                while True:
                    if self._cut_generation != generation:
                        outcome = "cut"
                        break
                    batch = [e for e in self._history if e.rv > since]
                    remaining = deadline - time.monotonic()
                    if batch:
                        break
                    if remaining <= 0 or self._stopping:
                        outcome = "end"
                        break
                    self._cond.wait(min(remaining, 0.5))
            if outcome is not None:
                yield outcome
                return
            for event in batch:
                since = event.rv
                event_ns = event.obj["metadata"].get("namespace") or ""
                if event.res is res and namespace in (None, event_ns):
                    yield event


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------- HTTP front end

_PATH = re.compile(
    r"^/(?:api/(?P<core_version>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)
# Cluster-scoped kinds, and list/watch of a namespaced kind across all namespaces.
_CLUSTER_PATH = re.compile(
    r"^/(?:api/(?P<core_version>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)

_VERBS = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ssl.SSLError):
            return  # a client refusing our certificate (a test of exactly that) is no failure
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKube
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle and the client's
    # delayed ACK add ~40 ms to every response (no real API server does that).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest captures enough

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes: without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every response on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ---- dispatch

    def _handle(self, method: str) -> None:
        fake = self.fake
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        body = self._read_body()
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        cert_cn = self._client_cert_cn()
        # As kube-apiserver: a bearer token, else the client certificate, identifies the user.
        user = fake.users.get(token) if token else fake.cert_users.get(cert_cn or "")
        is_watch = method == "GET" and query.get("watch") in ("true", "1")
        record = RequestRecord(
            method,
            parts.path,
            query,
            user,
            body if isinstance(body, dict) else None,
            dict(self.headers.items()),
            cert_cn,
        )
        fake._record(record)
        if fake._wait_if_hung(parts.path):
            self.close_connection = True
            return
        try:
            if user is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            fault = fake._take_fault(method, parts.path, is_watch)
            if fault is not None:
                raise _fault_error(fault)
            if parts.path in ("/api", "/apis", "/version"):
                self._send_json(200, _discovery(parts.path))
                return
            m = _PATH.match(parts.path) or _CLUSTER_PATH.match(parts.path)
            res = None
            if m:
                group = m.group("group") or ""
                version = m.group("version") or m.group("core_version")
                res = fake.resources.get((group, m.group("plural")))
                if res is not None and res.version != version:
                    res = None
            if m is None or res is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            ns: str | None = m.groupdict().get("ns")
            name, sub = m.group("name"), m.group("sub")
            if not res.namespaced:
                if ns is not None:
                    raise ApiError(
                        404, "NotFound", "the server could not find the requested resource"
                    )
                ns = ""
            elif ns is None and (method != "GET" or name is not None):
                # A namespaced kind without a namespace: only list and watch across all of them.
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            verb = _VERBS.get(method) or ("watch" if is_watch else "get" if name else "list")
            if (verb, res.plural) in fake._forbidden:
                raise _forbidden(user, verb, res, ns)
            self._route(method, res, ns, name, sub, query, body, user, record, is_watch)
        except ApiError as err:
            self._send_json(err.code, err.status(), err.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(
        self,
        method: str,
        res: Resource,
        ns: str | None,
        name: str | None,
        sub: str | None,
        query: dict[str, str],
        body: Any,
        user: str,
        record: RequestRecord,
        is_watch: bool,
    ) -> None:
        fake = self.fake
        if sub == "status" and not res.status_subresource:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if name is None:
            if method == "GET" and is_watch:
                self._watch(res, ns, query, record)
            elif method == "GET":
                self._send_json(200, self._list(res, ns, query))
            elif method == "POST":
                self._send_json(201, fake.create(res, ns or "", _require_object(body), user))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
            return
        ns = ns or ""
        if method == "GET":
            self._send_json(200, fake.get(res, ns, name))
        elif method == "DELETE":
            self._send_json(200, fake.delete(res, ns, name))
        elif method == "PUT":
            obj = _require_object(body)
            if obj.get("metadata", {}).get("name") != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
            self._send_json(200, fake.update(res, ns, obj, status_only=sub == "status"))
        elif method == "PATCH":
            ctype = self.headers.get("Content-Type", "")
            if "merge-patch" not in ctype:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown "
                    f"format - accepted media types include: application/merge-patch+json "
                    f"(got {ctype})",
                )
            patch = _require_object(body)
            if sub == "status":
                self._send_json(200, fake.patch_status(res, ns, name, patch))
            else:
                current = fake.get(res, ns, name)
                merged = _merge_patch(current, patch)
                merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self._send_json(200, fake.update(res, ns, merged))
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _list(self, res: Resource, ns: str | None, query: dict[str, str]) -> Obj:
        fake = self.fake
        with fake._cond:
            items = [
                o
                for o in fake.list(res, ns)
                if _selected(res, o, query.get("labelSelector"), query.get("fieldSelector"))
            ]
            rv = str(fake._rv)
        return {
            "apiVersion": res.api_version,
            "kind": f"{res.kind}List",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    def _watch(
        self, res: Resource, ns: str | None, query: dict[str, str], record: RequestRecord
    ) -> None:
        fake = self.fake
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        labels, fields = query.get("labelSelector"), query.get("fieldSelector")
        rv_param = query.get("resourceVersion")
        drop_after = fake._take_drop()
        initial: list[Obj] = []
        with fake._cond:
            if rv_param in (None, "", "0"):
                initial = [o for o in fake.list(res, ns) if _selected(res, o, labels, fields)]
                since = fake._rv
            else:
                since = int(rv_param)
            fake._active_watches.append(record)
            generation = fake._cut_generation
            fake._cond.notify_all()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            if drop_after == 0:
                self._abort()
                return
            events: Iterator[Event | str]
            try:
                if fake._take_gone(record.path):
                    raise ApiError(410, "Expired", f"too old resource version: {since} ({since})")
                events = fake._watch_events(res, ns, since, deadline, generation)
                pending = [{"type": "ADDED", "object": o} for o in initial]
                for item in pending:
                    self._chunk(item)
                    sent += 1
                    if drop_after is not None and sent >= drop_after:
                        self._abort()
                        return
                for event in events:
                    if event == "cut":
                        self._abort()
                        return
                    if isinstance(event, str):
                        break
                    if not _selected(res, event.obj, labels, fields):
                        continue
                    self._chunk({"type": event.type, "object": event.obj})
                    sent += 1
                    if drop_after is not None and sent >= drop_after:
                        self._abort()
                        return
            except ApiError as err:
                # The real server answers an expired resourceVersion inside the stream.
                self._chunk({"type": "ERROR", "object": err.status()})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            with fake._cond:
                if record in fake._active_watches:
                    fake._active_watches.remove(record)
                fake._cond.notify_all()

    # ---- HTTP helpers

    def _client_cert_cn(self) -> str | None:
        connection = self.connection
        if not isinstance(connection, ssl.SSLSocket):
            return None
        der = connection.getpeercert(binary_form=True)
        if not der:
            return None
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
        return str(names[0].value) if names else None

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def _send_json(self, code: int, body: Obj, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _chunk(self, item: Obj) -> None:
        line = json.dumps(item).encode() + b"\n"
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()

    def _abort(self) -> None:
        """Cut the stream the way a dying API server or load balancer does."""
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _selected(res: Resource, obj: Obj, labels: str | None, fields: str | None) -> bool:
    if labels and not label_selector_matches(labels, obj["metadata"].get("labels") or {}):
        return False
    return not fields or field_selector_matches(res, fields, obj)


def _require_object(body: Any) -> Obj:
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the request body is not a JSON object")
    return body


def _fault_error(fault: Fault) -> ApiError:
    headers = {}
    details: Obj | None = None
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
        details = {"retryAfterSeconds": fault.retry_after}
    if fault.status == 429:
        return ApiError(
            429,
            "TooManyRequests",
            "Too many requests, please try again later.",
            details,
            **headers,
        )
    if fault.status == 503:
        return ApiError(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
            details,
            **headers,
        )
    return ApiError(
        fault.status, "InternalError", "Internal error occurred: injected fault", details, **headers
    )


def _forbidden(user: str, verb: str, res: Resource, ns: str | None) -> ApiError:
    where = f'in the namespace "{ns}"' if ns else "at the cluster scope"
    return ApiError(
        403,
        "Forbidden",
        f'{res.qualified} is forbidden: User "{user}" cannot {verb} resource "{res.plural}" in '
        f'API group "{res.group}" {where}',
        {"group": res.group, "kind": res.plural},
    )


def _discovery(path: str) -> Obj:
    if path == "/version":
        return {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": CM_GROUP,
                "versions": [{"groupVersion": f"{CM_GROUP}/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": f"{CM_GROUP}/v1", "version": "v1"},
            }
        ],
    }


# --------------------------------------------------------------------------- the signer

_KEY_USAGE_FLAGS = {
    "digital signature": "digital_signature",
    "signing": "digital_signature",
    "content commitment": "content_commitment",
    "key encipherment": "key_encipherment",
    "key agreement": "key_agreement",
    "data encipherment": "data_encipherment",
    "cert sign": "key_cert_sign",
    "crl sign": "crl_sign",
    "encipher only": "encipher_only",
    "decipher only": "decipher_only",
}
_EXT_USAGES = {
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "s/mime": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timestamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp signing": ExtendedKeyUsageOID.OCSP_SIGNING,
}
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_go_duration(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text):
        total += float(number) * _GO_UNITS[unit]
    if not re.fullmatch(r"((\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+", text):
        raise ValueError(f"invalid duration {text!r}")
    return total


def make_test_ca(
    common_name: str = "fake cert-manager CA",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class FakeSigner:
    """cert-manager's approver and CA issuer, in one thread.

    ``mode``: ``issue`` (approve and sign), ``deny`` (an approval policy denies), ``fail`` (approve,
    then signing fails), ``hold`` (approve, then leave pending with Ready=False/Pending until
    ``release``), ``invalid`` (approve, then InvalidRequest). ``delay`` slows every step.
    Like cert-manager's CA issuer it signs ``isCA`` requests as CA:TRUE *without* a path length
    and copies the CSR's name constraints (``copy_name_constraints=False``: an issuer that drops
    them). ``clock`` gives "now" for notBefore (tests with an injected clock).
    ``issuers`` lists the ``(kind, name)`` it serves; other requests stay pending with the message
    cert-manager shows for a missing issuer.
    """

    fake: FakeKube
    mode: str = "issue"
    delay: float = 0.0
    include_ca: bool = True
    chain_includes_ca: bool = False
    copy_name_constraints: bool = True
    clock: Callable[[], dt.datetime] | None = None
    issuers: set[tuple[str, str]] = field(
        default_factory=lambda: {("Issuer", "ca-issuer"), ("ClusterIssuer", "ca-cluster-issuer")}
    )
    ca_key: ec.EllipticCurvePrivateKey = field(init=False)
    ca_cert: x509.Certificate = field(init=False)
    signed: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.ca_key, self.ca_cert = make_test_ca()
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._held: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FakeSigner:
        self.fake.subscribe(self._on_event)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    @property
    def ca_pem(self) -> bytes:
        return pem(self.ca_cert)

    def release(self, mode: str = "issue") -> None:
        """Process the held requests now with ``mode``."""
        with self._lock:
            self.mode = mode
            held, self._held = self._held, []
        for item in held:
            self._queue.put(item)

    def _on_event(self, event: Event) -> None:
        if event.res is self.fake.certificate_requests and event.type == "ADDED":
            meta = event.obj["metadata"]
            self._queue.put((meta["namespace"], meta["name"]))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            # ApiError: deleted meanwhile; cert-manager would drop it too.
            with contextlib.suppress(ApiError):
                self._process(*item)

    def _process(self, ns: str, name: str) -> None:
        fake, res = self.fake, self.fake.certificate_requests
        if self.delay:
            time.sleep(self.delay)
        obj = fake.get(res, ns, name)
        conditions = obj.get("status", {}).get("conditions", [])
        with self._lock:
            mode = self.mode
        now = rfc3339()
        if mode == "deny":
            status = {
                "conditions": [
                    _cond(
                        "Denied",
                        "True",
                        "policy.cert-manager.io",
                        "No policy approved this request: [example-policy: spec.allowed."
                        'dnsNames.values: Invalid value: "evil.example.com"]',
                        now,
                    ),
                    _cond(
                        "Ready",
                        "False",
                        "Denied",
                        "The CertificateRequest was denied by an approval controller",
                        now,
                    ),
                ],
                "failureTime": now,
            }
            fake.patch_status(res, ns, name, {"status": status})
            return
        if not any(c["type"] == "Approved" for c in conditions):
            conditions = [
                _cond(
                    "Approved",
                    "True",
                    "cert-manager.io",
                    "Certificate request has been approved by cert-manager.io",
                    now,
                )
            ]
            fake.patch_status(res, ns, name, {"status": {"conditions": conditions}})
        ref = obj["spec"]["issuerRef"]
        if (ref.get("kind", "Issuer"), ref["name"]) not in self.issuers:
            kind = ref.get("kind", "Issuer")
            msg = (
                f'Referenced "{kind}" not found: {kind.lower()}.cert-manager.io "{ref["name"]}" '
                "not found"
            )
            ready = _cond("Ready", "False", "Pending", msg, now)
            fake.patch_status(res, ns, name, {"status": {"conditions": _with(conditions, ready)}})
            return
        if mode == "hold":
            ready = _cond(
                "Ready", "False", "Pending", "Waiting on certificate issuance from the fake CA", now
            )
            fake.patch_status(res, ns, name, {"status": {"conditions": _with(conditions, ready)}})
            with self._lock:
                self._held.append((ns, name))
            return
        if self.delay:
            time.sleep(self.delay)
        if mode == "fail":
            ready = _cond(
                "Ready",
                "False",
                "Failed",
                "Error signing certificate: the CA key pair is not usable",
                now,
            )
            fake.patch_status(
                res,
                ns,
                name,
                {"status": {"conditions": _with(conditions, ready), "failureTime": now}},
            )
            return
        try:
            csr_pem = base64.b64decode(obj["spec"]["request"])
            csr = x509.load_pem_x509_csr(csr_pem)
            if not csr.is_signature_valid:
                raise ValueError("CSR signature is invalid")
            if mode == "invalid":
                raise ValueError("injected invalid request")
        except ValueError as exc:
            inv = _cond(
                "InvalidRequest",
                "True",
                "RequestParsingError",
                f"Failed to decode CSR in spec.request: {exc}",
                now,
            )
            ready = _cond(
                "Ready", "False", "Failed", f"Failed to decode CSR in spec.request: {exc}", now
            )
            fake.patch_status(
                res,
                ns,
                name,
                {"status": {"conditions": _with(conditions, inv, ready), "failureTime": now}},
            )
            return
        leaf = self.sign(csr, obj["spec"])
        chain = pem(leaf) + (self.ca_pem if self.chain_includes_ca else b"")
        ready = _cond(
            "Ready", "True", "Issued", "Certificate fetched from issuer successfully", now
        )
        status: Obj = {"conditions": _with(conditions, ready), "certificate": b64(chain)}
        if self.include_ca:
            status["ca"] = b64(self.ca_pem)
        fake.patch_status(res, ns, name, {"status": status})
        self.signed.append(name)

    def sign(self, csr: x509.CertificateSigningRequest, spec: Obj) -> x509.Certificate:
        now = (self.clock() if self.clock else dt.datetime.now(dt.UTC)).replace(microsecond=0)
        lifetime = parse_go_duration(spec.get("duration", "2160h"))
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(seconds=lifetime))
        )
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            builder = builder.add_extension(san.value, critical=san.critical)
        except x509.ExtensionNotFound:
            pass
        is_ca = bool(spec.get("isCA"))
        usages = list(spec.get("usages") or ["digital signature", "key encipherment"])
        if is_ca and "cert sign" not in usages:
            usages.append("cert sign")
        flags = {v: False for v in set(_KEY_USAGE_FLAGS.values())}
        for usage in usages:
            if usage in _KEY_USAGE_FLAGS:
                flags[_KEY_USAGE_FLAGS[usage]] = True
        builder = builder.add_extension(x509.KeyUsage(**flags), critical=True)
        ext = [_EXT_USAGES[u] for u in usages if u in _EXT_USAGES]
        if ext:
            builder = builder.add_extension(x509.ExtendedKeyUsage(ext), critical=False)
        builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), True)
        if is_ca and self.copy_name_constraints:
            with contextlib.suppress(x509.ExtensionNotFound):
                nc = csr.extensions.get_extension_for_class(x509.NameConstraints)
                builder = builder.add_extension(nc.value, critical=True)
        # As Go's x509.CreateCertificate: a subject key id, and the issuer's as authority key id.
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
            critical=False,
        )
        return builder.sign(self.ca_key, hashes.SHA256())


def _with(conditions: list[Obj], *new: Obj) -> list[Obj]:
    """Set conditions by type, as cert-manager's apiutil.SetCertificateRequestCondition does."""
    kinds = {c["type"] for c in new}
    return [c for c in conditions if c["type"] not in kinds] + list(new)


def _cond(kind: str, status: str, reason: str, message: str, when: str) -> Obj:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }


class FakeClock:
    """Wall-clock time (epoch seconds) that moves only when a test moves it; whole seconds, as
    certificates count time."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def datetime(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.now, dt.UTC)

    def advance_to(self, moment: float) -> None:
        self.now = float(moment)


def random_name(prefix: str = "t") -> str:
    return prefix + "".join(random.choice(string.ascii_lowercase) for _ in range(6))
