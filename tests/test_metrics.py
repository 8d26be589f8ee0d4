"""Agent metrics and the HTTP endpoint that serves them, scraped over real HTTP."""

from __future__ import annotations

import gzip
import http.client
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

import agent
from agent.observe.httpserver import HealthServer, parse_address
from agent.observe.metrics import KNOWN_FAILURE_REASONS, AgentMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(metrics: AgentMetrics) -> Samples:
    return samples(generate_latest(metrics.registry).decode())


def volume_series(found: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in found.items() if n == name}


EXPIRY = "cert_agent_certificate_expiry_timestamp_seconds"
RENEWAL = "cert_agent_certificate_renewal_timestamp_seconds"


def key(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs))


def vlabels(ns: str, pod: str, vid: str, issuer: str) -> tuple[tuple[str, str], ...]:
    return (("issuer", issuer), ("namespace", ns), ("pod", pod), ("volume_id", vid))


def test_uses_its_own_registry_not_the_global_one() -> None:
    first, second = AgentMetrics(), AgentMetrics()  # the global registry would refuse duplicates
    assert first.registry is not second.registry
    registry = CollectorRegistry()
    assert AgentMetrics(registry=registry).registry is registry


def test_build_info_and_initial_series() -> None:
    found = scrape(AgentMetrics(version="9.9.9"))
    assert found[("cert_agent_build_info", (("version", "9.9.9"),))] == 1
    assert found[("cert_agent_managed_volumes", ())] == 0
    assert found[("cert_agent_ca_expiry_timestamp_seconds", ())] == 0
    # Counters of the local issuer exist at zero before anything happened, so rate() works.
    for operation in ("issue", "renew"):
        key = (("issuer", "local"), ("operation", operation))
        assert found[("cert_agent_issue_attempts_total", key)] == 0
        assert found[("cert_agent_issue_duration_seconds_count", key)] == 0
        for reason in KNOWN_FAILURE_REASONS:
            labels = tuple(sorted((*key, ("reason", reason))))
            assert found[("cert_agent_issue_failures_total", labels)] == 0
    assert volume_series(found, EXPIRY) == {}
    assert (
        AgentMetrics().registry.get_sample_value(
            "cert_agent_build_info", {"version": agent.__version__}
        )
        == 1
    )


def test_volume_series_are_set_replaced_and_removed() -> None:
    metrics = AgentMetrics()
    metrics.set_volume("vol-1", "es", "es-0", "local", 2000.0, 1500.0)
    metrics.set_volume("vol-2", "es", "es-1", "local", 3000.0, 2500.0)
    found = scrape(metrics)
    assert volume_series(found, EXPIRY) == {
        vlabels("es", "es-0", "vol-1", "local"): 2000.0,
        vlabels("es", "es-1", "vol-2", "local"): 3000.0,
    }
    assert volume_series(found, RENEWAL) == {
        vlabels("es", "es-0", "vol-1", "local"): 1500.0,
        vlabels("es", "es-1", "vol-2", "local"): 2500.0,
    }

    # Renewed by another issuer: the old label set goes, only the new one remains.
    metrics.set_volume("vol-1", "es", "es-0", "ClusterIssuer ca (cert-manager.io)", 4000.0, 3500.0)
    found = scrape(metrics)
    assert volume_series(found, EXPIRY) == {
        vlabels("es", "es-0", "vol-1", "ClusterIssuer ca (cert-manager.io)"): 4000.0,
        vlabels("es", "es-1", "vol-2", "local"): 3000.0,
    }
    assert (
        volume_series(found, RENEWAL)[
            vlabels("es", "es-0", "vol-1", "ClusterIssuer ca (cert-manager.io)")
        ]
        == 3500.0
    )

    metrics.remove_volume("vol-1")
    metrics.remove_volume("vol-1")  # idempotent
    metrics.remove_volume("never-seen")
    found = scrape(metrics)
    assert volume_series(found, EXPIRY) == {vlabels("es", "es-1", "vol-2", "local"): 3000.0}
    assert volume_series(found, RENEWAL) == {vlabels("es", "es-1", "vol-2", "local"): 2500.0}
    metrics.remove_volume("vol-2")
    found = scrape(metrics)
    assert volume_series(found, EXPIRY) == {} and volume_series(found, RENEWAL) == {}


def test_issue_attempts_failures_and_latency() -> None:
    metrics = AgentMetrics()
    metrics.issue_started("local", "issue")
    metrics.issue_finished("local", "issue", 0.004, None)
    for _ in range(2):
        metrics.issue_started("Issuer ca (cert-manager.io)", "renew")
        metrics.issue_finished("Issuer ca (cert-manager.io)", "renew", 45.0, "deadline_exceeded")
    found = scrape(metrics)
    local = (("issuer", "local"), ("operation", "issue"))
    assert found[("cert_agent_issue_attempts_total", local)] == 1
    assert found[("cert_agent_issue_duration_seconds_count", local)] == 1
    assert found[("cert_agent_issue_duration_seconds_bucket", key(*local, ("le", "0.001")))] == 0
    assert found[("cert_agent_issue_duration_seconds_bucket", key(*local, ("le", "0.005")))] == 1
    assert ("cert_agent_issue_duration_seconds_bucket", key(*local, ("le", "120.0"))) in found

    cm = (("issuer", "Issuer ca (cert-manager.io)"), ("operation", "renew"))
    failed = (*cm, ("reason", "deadline_exceeded"))
    assert found[("cert_agent_issue_attempts_total", cm)] == 2
    assert found[("cert_agent_issue_failures_total", failed)] == 2
    assert found[("cert_agent_issue_duration_seconds_sum", cm)] == 90.0
    # A newly seen issuer gets its zero series too (its other reasons, its issue operation).
    assert found[("cert_agent_issue_failures_total", (*cm, ("reason", "unavailable")))] == 0
    cm_issue = (("issuer", "Issuer ca (cert-manager.io)"), ("operation", "issue"))
    assert found[("cert_agent_issue_attempts_total", cm_issue)] == 0

    with pytest.raises(ValueError, match="operation"):
        metrics.issue_started("local", "reissue")


def test_grpc_managed_volumes_and_ca_expiry() -> None:
    metrics = AgentMetrics()
    metrics.observe_grpc("NodePublishVolume", "OK", 0.02)
    metrics.observe_grpc("NodePublishVolume", "INVALID_ARGUMENT", 0.001)
    metrics.observe_grpc("NodePublishVolume", "OK", 0.03)
    metrics.set_managed_volumes(3)
    metrics.set_ca_expiry(1_900_000_000.0)
    found = scrape(metrics)
    ok = (("code", "OK"), ("method", "NodePublishVolume"))
    bad = (("code", "INVALID_ARGUMENT"), ("method", "NodePublishVolume"))
    assert found[("cert_agent_grpc_requests_total", ok)] == 2
    assert found[("cert_agent_grpc_requests_total", bad)] == 1
    method = (("method", "NodePublishVolume"),)
    assert found[("cert_agent_grpc_request_duration_seconds_count", method)] == 3
    assert found[("cert_agent_managed_volumes", ())] == 3
    assert found[("cert_agent_ca_expiry_timestamp_seconds", ())] == 1_900_000_000.0


def test_concurrent_updates_keep_one_series_per_volume() -> None:
    metrics = AgentMetrics()

    def churn(worker: int) -> None:
        for i in range(200):
            metrics.set_volume("shared", "ns", f"pod-{worker}-{i % 3}", "local", i, i)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found = scrape(metrics)
    assert len(volume_series(found, EXPIRY)) == 1
    assert len(volume_series(found, RENEWAL)) == 1


# --------------------------------------------------------------------------- HTTP


class Ready:
    def __init__(self) -> None:
        self.state: tuple[bool, str] = (True, "")
        self.raise_error = False

    def __call__(self) -> tuple[bool, str]:
        if self.raise_error:
            raise RuntimeError("issuer check exploded")
        return self.state


@pytest.fixture
def served() -> Iterator[tuple[HealthServer, AgentMetrics, Ready]]:
    metrics = AgentMetrics()
    ready = Ready()
    server = HealthServer("127.0.0.1:0", metrics.registry, ready)
    server.start()
    yield server, metrics, ready
    server.stop()


def get(
    port: int, path: str, headers: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_metrics_endpoint_serves_prometheus_text(
    served: tuple[HealthServer, AgentMetrics, Ready],
) -> None:
    server, metrics, _ = served
    assert server.port != 0
    metrics.set_volume("vol-1", "es", "es-0", "local", 2000.0, 1500.0)
    status, headers, body = get(server.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    found = samples(body.decode())
    assert found[(EXPIRY, vlabels("es", "es-0", "vol-1", "local"))] == 2000.0

    metrics.remove_volume("vol-1")
    _, _, body = get(server.port, "/metrics")
    assert volume_series(samples(body.decode()), EXPIRY) == {}


def test_metrics_endpoint_speaks_openmetrics_and_gzip(
    served: tuple[HealthServer, AgentMetrics, Ready],
) -> None:
    server, metrics, _ = served
    metrics.set_managed_volumes(2)
    status, headers, body = get(
        server.port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}  # type: ignore[no-untyped-call]
    assert families["cert_agent_managed_volumes"].samples[0].value == 2
    assert families["cert_agent_issue_attempts"].type == "counter"

    status, headers, body = get(server.port, "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert samples(gzip.decompress(body).decode())[("cert_agent_managed_volumes", ())] == 2


def test_healthz_readyz_and_unknown_paths(
    served: tuple[HealthServer, AgentMetrics, Ready],
) -> None:
    server, _, ready = served
    assert get(server.port, "/healthz")[::2] == (200, b"ok\n")
    assert get(server.port, "/readyz")[::2] == (200, b"ok\n")

    ready.state = (False, "CSI socket not serving yet")
    assert get(server.port, "/readyz")[::2] == (503, b"CSI socket not serving yet\n")
    assert get(server.port, "/healthz")[0] == 200  # alive even when not ready

    ready.raise_error = True
    status, _, body = get(server.port, "/readyz")
    assert status == 503 and b"issuer check exploded" in body

    assert get(server.port, "/")[0] == 404
    assert get(server.port, "/metricsx")[0] == 404
    assert get(server.port, "/healthz?verbose=1")[0] == 200


def test_stop_releases_the_port() -> None:
    server = HealthServer("127.0.0.1:0", CollectorRegistry(), lambda: (True, ""))
    server.start()
    port = server.port
    server.stop()
    server.stop()  # idempotent
    again = HealthServer(f"127.0.0.1:{port}", CollectorRegistry(), lambda: (True, ""))
    again.start()
    try:
        assert again.port == port
        assert get(port, "/healthz")[0] == 200
    finally:
        again.stop()


def test_all_interfaces_address() -> None:
    metrics = AgentMetrics()
    server = HealthServer(":0", metrics.registry, lambda: (True, ""))
    server.start()
    try:
        assert get(server.port, "/healthz", host="127.0.0.1")[0] == 200
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (":9402", ("", 9402)),
        ("0.0.0.0:9402", ("0.0.0.0", 9402)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9402", ("::1", 9402)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9402", "host:", "host:http", ":70000", "::1:9402"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError, match="metrics address"):
        parse_address(address)
