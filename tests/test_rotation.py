"""Renewal end to end: real agents, real mounts, certificates living for seconds."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import Unavailable
from agent.issuers.base import IssuedCertificate, Issuer, IssueRequest
from agent.pki.keys import load_private_key
from tests.conftest import AgentProcess, RunningAgent

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


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


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
        self.calls = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def issue(self, request: IssueRequest, timeout_seconds: float) -> IssuedCertificate:
        self.calls += 1
        self.entered.set()
        self.gate.wait(30)
        if self.failing.is_set():
            raise Unavailable("issuer down for the test")
        return self.inner.issue(request, timeout_seconds)

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

    started = time.monotonic()
    agent.client.unpublish(pod.volume_id, str(target))  # not blocked by the slow issuer
    assert time.monotonic() - started < 5
    flaky.gate.set()
    time.sleep(0.5)  # let the renewal finish and find the volume gone
    assert not target.exists()
    assert os.listdir(agent.config.data_root / "volumes") == []
    assert 'volume_id="' + pod.volume_id not in scrape(agent)


def test_restart_mid_schedule_renews_each_volume_once_at_its_time(
    agent_process: object, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    first: AgentProcess = agent_process()  # type: ignore[operator]
    targets = [tmp_path / "pods" / f"es-{i}" / "mount" for i in range(3)]
    for i, target in enumerate(targets):
        args = ["publish", "--endpoint", first.endpoint, "--target", str(target)]
        args += ["--pod-name", f"es-{i}", "--attr", "dns-names=${POD_NAME}.example.com"]
        args += ["--attr", "key-algorithm=ECDSA", "--attr", "duration=8s"]
        args += ["--attr", "renew-before=4s"]
        subprocess.run([sys.executable, "-m", "agent.cli", *args], check=True, cwd=REPO)
    serials = [serial_of(t) for t in targets]
    first_log = first.stop()
    assert "renewed certificate" not in first_log

    second: AgentProcess = agent_process()  # type: ignore[operator]
    wait_for(
        lambda: all(serial_of(t) != s for t, s in zip(targets, serials, strict=True)),
        15,
        "every volume renewed after the restart",
    )
    renewed_at = time.time()
    time.sleep(1.0)  # the next renewals are ~4 s away: none may happen twice now
    log = second.stop()
    assert log.count('"renewed certificate"') == 3, log
    for target in targets:
        cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
        # Renewed no earlier than renew-before (plus spread) ahead of the old expiry.
        assert cert.not_valid_before_utc.timestamp() <= renewed_at
