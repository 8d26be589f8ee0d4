"""The metrics endpoint under a burst of scrapes: a real backlog, a bounded pool, no refusals."""

from __future__ import annotations

import http.client
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.observe.httpserver import LISTEN_BACKLOG, WORKERS, HealthServer


class ThreadRecorder(Collector):
    """A collector that notes which thread each scrape ran on."""

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.lock:
            self.threads.add(threading.current_thread().name)
        yield GaugeMetricFamily("test_scrapes", "a constant", value=1)


@pytest.fixture
def server() -> Iterator[tuple[HealthServer, ThreadRecorder]]:
    registry = CollectorRegistry()
    recorder = ThreadRecorder()
    registry.register(recorder)
    health = HealthServer("127.0.0.1:0", registry, lambda: (True, ""))
    health.start()
    yield health, recorder
    health.stop()


def listen_backlog(port: int) -> int:
    """The backlog of the listening socket on ``port``, as the kernel reports it (ss Send-Q)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[2])


def test_the_listen_backlog_holds_a_burst(server: tuple[HealthServer, ThreadRecorder]) -> None:
    health, _recorder = server
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    # main listened with socketserver's default of 5.
    assert listen_backlog(health.port) == min(LISTEN_BACKLOG, somaxconn)
    assert listen_backlog(health.port) >= 128


def scrape(port: int) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
        return response.status, body
    finally:
        connection.close()


def test_many_concurrent_scrapes_are_all_answered_by_a_bounded_pool(
    server: tuple[HealthServer, ThreadRecorder],
) -> None:
    health, recorder = server
    clients, per_client = 50, 10
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: scrape(health.port), range(clients * per_client)))
    # None refused or reset (an exception would have surfaced from map), every one complete.
    assert len(results) == clients * per_client
    assert all(status == 200 and "test_scrapes 1.0" in body for status, body in results)
    # main started a new thread per connection (500 here); the pool has WORKERS threads.
    assert 1 <= len(recorder.threads) <= WORKERS
    assert all(name.startswith("cert-agent-http") for name in recorder.threads)


def test_a_keep_alive_client_does_not_hold_a_worker(
    server: tuple[HealthServer, ThreadRecorder],
) -> None:
    # Every response closes its connection, so idle keep-alive clients (one per Prometheus
    # replica) cannot take the workers between scrapes.
    health, _recorder = server
    idle = []
    for _ in range(WORKERS + 2):
        connection = http.client.HTTPConnection("127.0.0.1", health.port, timeout=60)
        connection.request("GET", "/healthz", headers={"Connection": "keep-alive"})
        response = connection.getresponse()
        assert response.getheader("Connection") == "close"
        response.read()
        idle.append(connection)
    try:
        assert scrape(health.port)[0] == 200
    finally:
        for connection in idle:
            connection.close()
