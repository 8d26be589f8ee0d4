"""deploy/grafana/: the dashboard is what dashboard.py generates, fits the Grafana Foundation SDK's
dashboard model, ships in a ConfigMap the Grafana sidecar finds, and every panel's PromQL returns
data from a real Prometheus scraping a real agent with volumes, renewals and failures."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml

from agent.config import NodeCAConfig
from agent.pki.name_constraints import PermittedNames
from tests.conftest import REPO, RunningAgent, free_port
from tests.fakekube import FakeKube, FakeSigner
from tests.test_deploy import render

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "cert-agent.json"
PROMETHEUS = shutil.which("prometheus")
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval is for a 1 s scrape interval


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cert_agent_dashboard", GRAFANA / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_committed_json_is_what_the_generator_builds() -> None:
    assert DASHBOARD.read_text() == generator().render(), "run `make dashboard`"


def missing_from(ours: Any, model: Any, path: str = "") -> list[str]:
    """Paths in ``ours`` that the model's re-encoding lost or changed."""
    if isinstance(ours, dict):
        if not isinstance(model, dict):
            return [path]
        return [p for k, v in ours.items() for p in missing_from(v, model.get(k), f"{path}.{k}")]
    if isinstance(ours, list):
        if not isinstance(model, list) or len(model) != len(ours):
            return [path]
        return [p for i, v in enumerate(ours) for p in missing_from(v, model[i], f"{path}[{i}]")]
    return [] if ours == model else [path]


def test_the_dashboard_fits_the_sdks_dashboard_model() -> None:
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()
    board = dashboard()
    parsed = json.loads(JSONEncoder().encode(Dashboard.from_json(board)))
    # Every field we ship is one the model knows (it drops unknown ones), with the same value.
    assert missing_from(board, parsed) == []
    typo = json.loads(json.dumps(board))
    typo["panels"][1]["fieldConfg"] = {}
    assert missing_from(typo, json.loads(JSONEncoder().encode(Dashboard.from_json(typo)))) == [
        ".panels[1].fieldConfg"
    ]

    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel.get("targets"), panel["title"]
    [variable] = board["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    titles = " | ".join(p["title"] for p in panels)
    for wanted in (
        "closest to expiry",
        "Time left, distribution",
        "failures by reason",
        "Issue latency by issuer",
        "gRPC latency by method",
        "gRPC errors by method",
        "Managed volumes per node",
        "CA expires",
        "Node CA expires in, per node",
        "Node CA requests by outcome",
        "Pod certificate requests by signer and outcome",
        "Pod certificate signing latency by signer",
        "Events on pods by result",
    ):
        assert wanted in titles


def test_the_configmap_carries_the_sidecar_label_and_the_json() -> None:
    docs = render(GRAFANA)
    [configmap] = docs
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["name"] == "cert-agent-dashboard"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "namespace" not in configmap["metadata"]  # `kubectl apply -n <grafana's namespace>`
    assert configmap["data"] == {"cert-agent.json": DASHBOARD.read_text()}
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(configmap, "1.29.0", strict=True)
    # Not part of the default install (it belongs in Grafana's namespace).
    assert (
        "grafana"
        not in yaml.safe_load((REPO / "deploy" / "kustomization.yaml").read_text())["resources"]
    )


# ------------------------------------------------------------------------- the real Prometheus


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, agent_port: int) -> Iterator[str]:
    assert PROMETHEUS is not None
    config = tmp_path / "prometheus.yml"
    # The node label as the PodMonitor's relabeling sets it in a cluster.
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: cert-agent\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{agent_port}']\n"
        "        labels: {node: node-1}\n"
    )
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, "up == 1")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def api(url: str, path: str, **params: str) -> list[dict[str, Any]]:
    address = f"{url}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(address, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def wait_for(url: str, promql: str, timeout: float = 60) -> None:
    """Until Prometheus has scraped what ``promql`` selects (it scrapes every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if api(url, "query", query=promql):
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"Prometheus never saw {promql}")


@pytest.mark.prometheus
def test_every_panel_query_returns_data_from_a_real_agent(
    agent_factory: Any, tmp_path: Path
) -> None:
    if PROMETHEUS is None:
        pytest.skip("needs the prometheus server (Debian package)")
    agent: RunningAgent = agent_factory(allowed_namespaces=frozenset({"web"}))
    assert agent.agent.health is not None
    with running_prometheus(tmp_path, agent.agent.health.port) as prometheus:
        check_every_panel(agent, prometheus)


@pytest.mark.prometheus
def test_node_ca_panels_return_data_from_a_node_ca_agent(
    agent_factory: Any,
    fake: FakeKube,
    signer: FakeSigner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if PROMETHEUS is None:
        pytest.skip("needs the prometheus server (Debian package)")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    agent: RunningAgent = agent_factory(
        standalone=False,
        kubeconfig=str(fake.write_kubeconfig(tmp_path / "kubeconfig")),
        node_ca=NodeCAConfig(
            issuer_name="ca-cluster-issuer",
            issuer_kind="ClusterIssuer",
            namespace="cert-agent",
            permitted=PermittedNames.parse(dns=["svc.cluster.local"], uri_hosts=[]),
        ),
        pod_name="cert-agent-x7k2p",
        pod_uid="7d3c4b2a-1e0f-4a9b-8c7d-6e5f4a3b2c1d",
        pod_namespace="cert-agent",
    )
    assert agent.agent.health is not None
    agent.agent.node_ca.wait_for_attempts(1)
    with running_prometheus(tmp_path, agent.agent.health.port) as prometheus:
        wait_for(prometheus, 'cert_agent_node_ca_requests_total{outcome="issued"} == 1')
        wait_for(prometheus, "count_over_time(cert_agent_node_ca_requests_total[1m]) >= 2")
        node_ca = [(title, expr) for title, expr in targets(dashboard()) if "node_ca" in expr]
        assert len(node_ca) == 2
        assert_data(prometheus, node_ca)


def check_every_panel(agent: RunningAgent, prometheus: str) -> None:
    wait_for(prometheus, "cert_agent_managed_volumes == 0")

    def refused(name: str) -> None:
        with pytest.raises(grpc.RpcError) as info:  # not an allowed namespace: a failed issue
            agent.publish(
                agent.pod(name, namespace="batch"), {"csi.cert-agent.io/common-name": "x"}
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Each step waits until Prometheus has scraped it, so every counter and histogram has a
    # sample before and after an increase: rate() and histogram_quantile() have data.
    denied = 'cert_agent_grpc_requests_total{code="PERMISSION_DENIED"}'
    app0 = agent.pod("app-0", namespace="web")
    agent.publish(app0, {"csi.cert-agent.io/dns-names": "app-0.web.svc"})
    refused("job-0")
    wait_for(prometheus, f"{denied} == 1")

    agent.publish(
        agent.pod("app-1", namespace="web"),
        {
            "csi.cert-agent.io/dns-names": "app-1.web.svc",
            "csi.cert-agent.io/key-algorithm": "ECDSA",
        },
    )
    refused("job-1")
    agent.agent.scheduler.schedule(app0.volume_id, 0.0)  # a renewal, now
    wait_for(prometheus, f"{denied} == 2")
    wait_for(prometheus, 'cert_agent_issue_attempts_total{operation="renew"} == 1')
    wait_for(prometheus, "cert_agent_managed_volumes == 2")

    board = dashboard()
    local = [(title, expr) for title, expr in targets(board) if not mode_only(expr)]
    assert len(local) >= 12
    assert_data(prometheus, local)


def mode_only(expr: str) -> bool:
    """Panels of node CA mode and the PCR signer: tested against agents in those modes."""
    return "node_ca" in expr or "_pcr_" in expr


def assert_data(prometheus: str, queries: list[tuple[str, str]]) -> None:
    """Each query, as Grafana would run it over the recent past, has a non-NaN value."""
    start = time.time() - 120
    empty = []
    for title, expr in queries:
        promql = expr.replace("$__rate_interval", RATE_INTERVAL)
        # Evaluated every second up to now (end - k * step): the last point follows the
        # last sample, so rate() over it sees the increases the steps above made.
        end = time.time()
        result = api(
            prometheus,
            "query_range",
            query=promql,
            start=f"{end - (end - start) // 1:.3f}",
            end=f"{end:.3f}",
            step="1",
        )
        values = [float(v) for series in result for _t, v in series["values"]]
        if not any(not math.isnan(v) for v in values):
            empty.append(f"{title}: {promql}")
    assert empty == [], "\n".join(empty)


@pytest.mark.prometheus
def test_pcr_panels_return_data_from_a_pcr_signing_agent(
    node_agent: Any, fake: FakeKube, tmp_path: Path
) -> None:
    if PROMETHEUS is None:
        pytest.skip("needs the prometheus server (Debian package)")
    from agent.spec.pcr import parse_signers
    from tests.fake_pcr import PCRS, condition, install, pcr_body

    signer = "cert-agent.io/pod-identity"
    install(fake)
    agent: RunningAgent = node_agent(pcr_signers=parse_signers([signer], None))
    assert agent.agent.health is not None

    def sign(name: str) -> None:
        pod = fake.put_pod("apps", name, "node-1")
        made = fake.create(PCRS, "apps", pcr_body(name=f"{name}-pcr", pod=pod, signer=signer).body)
        pcr = made["metadata"]["name"]
        fake.wait_until(lambda: condition(fake.get(PCRS, "apps", pcr)) is not None)

    count = "cert_agent_pcr_sign_latency_seconds_count"
    with running_prometheus(tmp_path, agent.agent.health.port) as prometheus:
        sign("web-0")
        wait_for(prometheus, f"{count} == 1")
        sign("web-1")  # a second sample after an increase: rate() has data
        wait_for(prometheus, f"{count} == 2")
        pcr = [(title, expr) for title, expr in targets(dashboard()) if "_pcr_" in expr]
        assert len(pcr) == 3
        assert_data(prometheus, pcr)
