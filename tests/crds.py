"""The custom resource schemas the tests check against: the project's own subset, or upstream's.

``tests/schemas/`` holds, as the project's test data, the part of the upstream CustomResource
definitions the tests need: the storage version's ``openAPIV3Schema`` with its field names, types,
formats, patterns, enums and required lists, and without the prose descriptions.

- ``cert-manager.io_certificaterequests.yaml``: the whole schema (the fake API server validates
  every CertificateRequest the agent and the fake signer write, issuerRef and conditions included).
- ``monitoring.coreos.com_podmonitors.yaml``, ``monitoring.coreos.com_prometheusrules.yaml``: the
  branches our manifests in ``deploy/base/`` use, in full; every other field keeps its type only.

The files are derived from upstream by ``subset_crd`` below, never edited by hand. The full upstream
definitions are not part of the repository. When the setting ``CERT_AGENT_CRDS_DIR`` names a
directory holding them (CI sets it), ``tests/test_upstream_crds.py`` checks that the subset is
exactly what ``subset_crd`` makes of them, and validates the manifests against them in full.
Refresh the subset after an upstream update or a manifest change with
``CERT_AGENT_CRDS_DIR=/path/to/crds python -m tests.crds``.

This module is the only place that reads a path outside the repository, and only the one that
setting names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
CRDS_DIR_SETTING = "CERT_AGENT_CRDS_DIR"

CERTIFICATE_REQUESTS = "cert-manager.io_certificaterequests.yaml"
POD_MONITORS = "monitoring.coreos.com_podmonitors.yaml"
PROMETHEUS_RULES = "monitoring.coreos.com_prometheusrules.yaml"

# file -> manifests whose used branches the subset keeps in full (None: the whole schema).
SUBSETS: dict[str, tuple[str, ...] | None] = {
    CERTIFICATE_REQUESTS: None,
    POD_MONITORS: ("deploy/base/podmonitor.yaml",),
    PROMETHEUS_RULES: ("deploy/base/prometheusrule.yaml",),
}

# What a field not used by any manifest keeps: facts about its own value, not its children.
_LEAF_KEYWORDS = (
    "type",
    "format",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "anyOf",
    "x-kubernetes-int-or-string",
)

_HEADER = """\
# Test data of csi-cert-agent: a subset of the upstream CustomResourceDefinition of
# {source} (Apache-2.0): field names, types, formats, patterns, enums and required
# lists of the storage version's schema, without descriptions.
# {scope}
# Made by `CERT_AGENT_CRDS_DIR=<dir> python -m tests.crds`: do not edit (see tests/crds.py).
"""

Obj = dict[str, Any]


def upstream_crds_dir() -> Path | None:
    """The directory of full upstream CRDs that ``CERT_AGENT_CRDS_DIR`` names, if it is set."""
    value = os.environ.get(CRDS_DIR_SETTING, "").strip()
    return Path(value).resolve() if value else None


def load_crd(filename: str, directory: Path = SCHEMA_DIR) -> Obj:
    crd = yaml.safe_load((directory / filename).read_text())
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{directory / filename} is not a CustomResourceDefinition")
    return crd


def storage_version(crd: Obj) -> Obj:
    return dict(next(v for v in crd["spec"]["versions"] if v.get("storage")))


def crd_schema(filename: str, directory: Path = SCHEMA_DIR) -> Obj:
    """The storage version's openAPIV3Schema of one CRD file."""
    return dict(storage_version(load_crd(filename, directory))["schema"]["openAPIV3Schema"])


def schema_for(kind: str, api_version: str, directory: Path = SCHEMA_DIR) -> Obj:
    """The schema of ``kind`` in ``api_version`` among the CRD files of ``directory``."""
    group, _, version = api_version.partition("/")
    for filename in sorted(SUBSETS):
        crd = load_crd(filename, directory)
        if crd["spec"]["names"]["kind"] != kind or crd["spec"]["group"] != group:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version and v.get("served", True):
                return dict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for {kind} {api_version} in {directory}")


# --------------------------------------------------------------------------- making the subset


def _strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def _leaf(schema: Obj) -> Obj:
    return {k: _strip_descriptions(schema[k]) for k in _LEAF_KEYWORDS if k in schema}


def _prune(schema: Obj, used: list[Any]) -> Obj:
    """Keep ``schema`` in full where the example values ``used`` reach, its leaf facts elsewhere."""
    if not used:
        return _leaf(schema)
    out: Obj = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key == "properties":
            dicts = [u for u in used if isinstance(u, dict)]
            out[key] = {
                name: _prune(sub, [d[name] for d in dicts if name in d])
                for name, sub in value.items()
            }
        elif key == "items" and isinstance(value, dict):
            out[key] = _prune(value, [item for u in used if isinstance(u, list) for item in u])
        elif key == "additionalProperties" and isinstance(value, dict):
            values = [v for u in used if isinstance(u, dict) for v in u.values()]
            out[key] = _prune(value, values)
        else:
            out[key] = _strip_descriptions(value)
    return out


def subset_crd(crd: Obj, examples: Iterable[Obj] | None) -> Obj:
    """The CRD reduced to what the tests need (see the module docstring)."""
    version = storage_version(crd)
    schema = version["schema"]["openAPIV3Schema"]
    kept = _strip_descriptions(schema) if examples is None else _prune(schema, list(examples))
    subset_version: Obj = {
        "name": version["name"],
        "served": version.get("served", True),
        "storage": True,
        "schema": {"openAPIV3Schema": kept},
    }
    if version.get("subresources"):
        subset_version["subresources"] = version["subresources"]
    names = crd["spec"]["names"]
    return {
        "apiVersion": crd["apiVersion"],
        "kind": "CustomResourceDefinition",
        "metadata": {"name": crd["metadata"]["name"]},
        "spec": {
            "group": crd["spec"]["group"],
            "names": {"kind": names["kind"], "plural": names["plural"]},
            "scope": crd["spec"]["scope"],
            "versions": [subset_version],
        },
    }


def subset_examples(filename: str) -> list[Obj] | None:
    manifests = SUBSETS[filename]
    if manifests is None:
        return None
    return [
        doc for path in manifests for doc in yaml.safe_load_all((REPO / path).read_text()) if doc
    ]


def render_subset(filename: str, upstream: Path) -> str:
    """The text of ``tests/schemas/<filename>`` as made from the upstream CRD in ``upstream``."""
    manifests = SUBSETS[filename]
    scope = (
        "The whole schema."
        if manifests is None
        else f"In full where {', '.join(manifests)} reach; elsewhere types only."
    )
    crd = load_crd(filename, upstream)
    source = f"{crd['spec']['group']} {crd['spec']['names']['kind']}"
    body = yaml.safe_dump(subset_crd(crd, subset_examples(filename)), sort_keys=False, width=100)
    return _HEADER.format(source=source, scope=scope) + body


def main() -> int:
    upstream = upstream_crds_dir()
    if upstream is None:
        print(f"set {CRDS_DIR_SETTING} to a directory of the upstream CRDs", file=sys.stderr)
        return 2
    SCHEMA_DIR.mkdir(exist_ok=True)
    for filename in sorted(SUBSETS):
        (SCHEMA_DIR / filename).write_text(render_subset(filename, upstream))
        print(f"wrote {SCHEMA_DIR / filename}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
