"""A real Prometheus server scrapes a running agent; PromQL sees the certificate's expiry."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import RunningAgent, free_port

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="needs the prometheus server: apt-get install prometheus"
    ),
]


@pytest.fixture
def prometheus(tmp_path: Path, agent: RunningAgent) -> Iterator[str]:
    assert agent.agent.health is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: cert-agent\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{agent.agent.health.port}']\n"
    )
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "prometheus.log").read_text())
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def query(url: str, promql: str) -> list[dict[str, object]]:
    address = url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(address, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def wait_for_result(url: str, promql: str, timeout: float = 30) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(url, promql)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no result for {promql}")


def test_prometheus_sees_the_certificate_expiry(agent: RunningAgent, prometheus: str) -> None:
    pod = agent.pod("es-0", namespace="elastic")
    target = agent.publish(pod, {"csi.cert-agent.io/dns-names": "es-0.elastic.svc"})
    not_after = x509.load_pem_x509_certificate(
        (target / "tls.crt").read_bytes()
    ).not_valid_after_utc.timestamp()

    result = wait_for_result(
        prometheus, 'cert_agent_certificate_expiry_timestamp_seconds{pod="es-0"}'
    )
    assert len(result) == 1
    series = result[0]
    labels = series["metric"]
    assert labels["namespace"] == "elastic"  # type: ignore[index]
    assert labels["volume_id"] == pod.volume_id  # type: ignore[index]
    assert labels["issuer"] == "local"  # type: ignore[index]
    assert float(series["value"][1]) == not_after  # type: ignore[index]

    up = wait_for_result(prometheus, 'up{job="cert-agent"}')
    assert up[0]["value"][1] == "1"  # type: ignore[index]
    managed = wait_for_result(prometheus, "cert_agent_managed_volumes == 1")
    assert managed

    # Unpublish: the per-volume series go away from the agent's exposition, so they go stale.
    agent.client.unpublish(pod.volume_id, str(target))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not query(prometheus, 'cert_agent_certificate_expiry_timestamp_seconds{pod="es-0"}'):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the series of an unpublished volume did not go away")
