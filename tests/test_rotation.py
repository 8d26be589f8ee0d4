"""Renewal end to end: real agents, real mounts, certificates living for seconds."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import Unavailable
from agent.issuers.base import IssuedCertificate, Issuer, IssueRequest
from agent.pki.keys import load_private_key
from tests.conftest import FakeClock, RunningAgent, wait_for

SHORT_LIVED = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
    "csi.cert-agent.io/duration": "4s",
    "csi.cert-agent.io/renew-before": "2s",
}


def serial_of(target: Path) -> int:
    return x509.load_pem_x509_certificate((target / "tls.crt").read_bytes()).serial_number


def read_pair(target: Path) -> tuple[x509.Certificate, bytes]:
    """Read key and certificate the way a careful consumer does: resolve ..data once."""
    data = os.open(target / "..data", os.O_RDONLY | os.O_DIRECTORY)
    try:
        cert_fd = os.open("tls.crt", os.O_RDONLY, dir_fd=data)
        key_fd = os.open("tls.key", os.O_RDONLY, dir_fd=data)
    finally:
        os.close(data)
    with os.fdopen(cert_fd, "rb") as cert_file, os.fdopen(key_fd, "rb") as key_file:
        return x509.load_pem_x509_certificate(cert_file.read()), key_file.read()


def public_der(obj: object) -> bytes:
    return obj.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_rotation_never_shows_a_mismatched_pair_or_a_missing_file(agent: RunningAgent) -> None:
    pod = agent.pod("es-0")
    target = agent.publish(pod, SHORT_LIVED)
    first_serial = serial_of(target)
    problems: list[str] = []
    serials: set[int] = set()
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                cert, key_pem = read_pair(target)
            except FileNotFoundError as exc:
                problems.append(f"missing file: {exc}")
                continue
            if public_der(cert) != public_der(load_private_key(key_pem)):
                problems.append(f"mismatched pair at serial {cert.serial_number:x}")
            for name in ("tls.crt", "tls.key", "ca.crt"):
                if not (target / name).exists():
                    problems.append(f"{name} missing")
            serials.add(cert.serial_number)
            reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        wait_for(lambda: len(serials) >= 3, 20, "two renewals")
    finally:
        stop.set()
        thread.join()
    assert not problems, problems[:5]
    assert first_serial in serials and reads > 100
    assert sorted(p for p in os.listdir(target) if not p.startswith("..")) == [
        "ca.crt",
        "tls.crt",
        "tls.key",
    ]
    # A new key for every renewal (reuse-private-key is off).
    cert, _ = read_pair(target)
    assert cert.serial_number != first_serial
    metrics = scrape(agent)
    assert 'cert_agent_issue_attempts_total{issuer="local",operation="renew"}' in metrics


def test_reuse_private_key_keeps_the_key_across_renewals(agent: RunningAgent) -> None:
    pod = agent.pod("es-0")
    target = agent.publish(pod, {**SHORT_LIVED, "csi.cert-agent.io/reuse-private-key": "true"})
    first_serial, first_key = serial_of(target), (target / "tls.key").read_bytes()
    wait_for(lambda: serial_of(target) != first_serial, 10, "a renewal")
    assert (target / "tls.key").read_bytes() == first_key


class FlakyIssuer:
    """Wraps the real local CA; fails while ``failing`` is set, blocks while ``gate`` is clear."""

    def __init__(self, inner: Issuer) -> None:
        self.inner = inner
        self.failing = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.returned = threading.Event()
        self.calls = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def issue(self, request: IssueRequest, timeout_seconds: float) -> IssuedCertificate:
        self.calls += 1
        self.returned.clear()
        self.entered.set()
        try:
            self.gate.wait(30)
            if self.failing.is_set():
                raise Unavailable("issuer down for the test")
            return self.inner.issue(request, timeout_seconds)
        finally:
            self.returned.set()

    def ready(self) -> tuple[bool, str]:
        return self.inner.ready()


def install_flaky(agent: RunningAgent) -> FlakyIssuer:
    flaky = FlakyIssuer(agent.agent.issuers.local)
    agent.agent.issuers.local = flaky
    return flaky


def scrape(agent: RunningAgent) -> str:
    import urllib.request

    with urllib.request.urlopen(agent.metrics_url + "/metrics", timeout=5) as response:
        return response.read().decode()


def test_failing_issuer_backs_off_keeps_old_certificate_then_recovers(
    agent: RunningAgent,
) -> None:
    pod = agent.pod("es-0")
    target = agent.publish(pod, SHORT_LIVED)
    first_serial = serial_of(target)
    flaky = install_flaky(agent)
    flaky.failing.set()
    retries: list[tuple[int, float]] = []
    agent.agent.scheduler._on_retry = lambda _vid, attempt, delay: retries.append((attempt, delay))

    wait_for(lambda: len(retries) >= 2, 20, "two failed renewals")
    assert serial_of(target) == first_serial  # the old certificate stays in place
    assert [a for a, _ in retries[:2]] == [1, 2]
    metrics = scrape(agent)
    assert (
        'cert_agent_issue_failures_total{issuer="local",operation="renew",reason="unavailable"}'
        in metrics
    )

    flaky.failing.clear()
    wait_for(lambda: serial_of(target) != first_serial, 20, "renewal after recovery")


def test_unpublish_during_a_running_renewal_leaves_nothing_behind(agent: RunningAgent) -> None:
    pod = agent.pod("es-0")
    target = agent.publish(pod, SHORT_LIVED)
    flaky = install_flaky(agent)
    flaky.gate.clear()
    flaky.entered.clear()
    assert flaky.entered.wait(10), "renewal did not start"

    agent.client.unpublish(pod.volume_id, str(target))
    # Not blocked by the slow issuer: it answered while the issuer still holds the renewal.
    assert not flaky.returned.is_set()
    flaky.gate.set()
    # The renewal finishes, finds the volume gone and writes nothing.
    wait_for(
        lambda: flaky.returned.is_set() and agent.agent.scheduler.running() == 0,
        30,
        "the renewal to finish",
    )
    assert agent.agent.scheduler.pending() == 0
    assert not target.exists()
    assert os.listdir(agent.config.data_root / "volumes") == []
    assert 'volume_id="' + pod.volume_id not in scrape(agent)


def test_restart_mid_schedule_renews_each_volume_once_at_its_time(
    agent_factory: Any,
) -> None:
    """A restarted agent resumes each volume's schedule: no reissue, each renews once when due.

    Time is a fake clock moved by hand, so "not yet due" and "due" are exact, whatever the load.
    """
    clock = FakeClock()
    first: RunningAgent = agent_factory(clock=clock)
    clock.set(time.time())  # not before the standalone CA the agent just made
    attributes = {
        "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
        "csi.cert-agent.io/key-algorithm": "ECDSA",
        "csi.cert-agent.io/duration": "1h",
        "csi.cert-agent.io/renew-before": "30m",
    }
    pods = [first.pod(f"es-{i}") for i in range(3)]
    targets = [first.publish(pod, attributes) for pod in pods]
    serials = [serial_of(t) for t in targets]
    store = first.agent.store
    dues = {pod.volume_id: _next_renewal(store, pod.volume_id) for pod in pods}
    for due in dues.values():  # 30 min before expiry, less a spread of at most 5 % (3 min)
        assert clock() + 27 * 60 <= due <= clock() + 30 * 60
    clock.advance(20 * 60)  # mid-schedule: nothing is due yet
    first.stop()
    assert renewals(first) == 0

    second: RunningAgent = agent_factory(clock=clock)
    scheduler = second.agent.scheduler
    # Recovered, not reissued: the same certificates, the same due times.
    assert [serial_of(t) for t in targets] == serials
    assert {v: scheduler.due_time(v) for v in dues} == dues

    # Move the clock to one volume's due time at a time: exactly that volume renews (the others
    # are due later, however close: the clock stops exactly at this one's time).
    order = sorted(dues, key=dues.__getitem__)
    assert len(set(dues.values())) == len(dues)
    renewed: list[str] = []
    for volume_id in order:
        clock.set(dues[volume_id])
        scheduler.wake()
        renewed.append(volume_id)
        expected = len(renewed)
        wait_for(
            lambda n=expected: renewals(second) == n and scheduler.running() == 0,
            30,
            f"the renewal of {volume_id}",
        )
        for pod, target, serial in zip(pods, targets, serials, strict=True):
            changed = serial_of(target) != serial
            assert changed == (pod.volume_id in renewed), pod.volume_id
        assert scheduler.pending() == 3
        assert all(scheduler.due_time(v) > clock() for v in dues)  # type: ignore[operator]
        cert = x509.load_pem_x509_certificate(
            (targets[[p.volume_id for p in pods].index(volume_id)] / "tls.crt").read_bytes()
        )
        assert cert.not_valid_before_utc.timestamp() == int(clock())
    assert renewals(second) == 3


def _next_renewal(store: Any, volume_id: str) -> float:
    meta = store.load(volume_id)
    assert meta is not None and meta.next_renewal is not None
    return float(meta.next_renewal)


def renewals(agent: RunningAgent) -> int:
    """Finished renewals (successful or failed) of the local issuer, from the agent's metrics."""
    metrics = agent.agent.metrics
    value = metrics.registry.get_sample_value(
        "cert_agent_issue_duration_seconds_count", {"issuer": "local", "operation": "renew"}
    )
    return int(value or 0)
