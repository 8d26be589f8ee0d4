"""Every failed issue or renewal attempt is counted with a reason, node-side failures included.

The agent's tmpfs is really filled (root: the agent mounts one), the clock is injected, so the
renewal and each retry happen exactly when the test moves the clock.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from agent.issuers.base import IssuedCertificate, Issuer, IssueRequest
from agent.observe.metrics import KNOWN_FAILURE_REASONS
from tests.conftest import IS_ROOT, FakeClock, RunningAgent, wait_for

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: the agent's tmpfs is filled")

ATTRIBUTES = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
    "csi.cert-agent.io/duration": "1h",
    "csi.cert-agent.io/renew-before": "30m",
}


def fill(tmpfs: Path) -> Path:
    """Fill the tmpfs to the last byte; returns the file to delete to free it."""
    filler = tmpfs / ".filler"  # not a valid volume id: the agent ignores it
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def sample(agent: RunningAgent, name: str, **labels: str) -> float:
    value = agent.agent.metrics.registry.get_sample_value(name, labels)
    return float(value or 0)


def failures(agent: RunningAgent, operation: str, reason: str) -> float:
    return sample(
        agent,
        "cert_agent_issue_failures_total",
        issuer="local",
        operation=operation,
        reason=reason,
    )


def finished(agent: RunningAgent, operation: str) -> float:
    return sample(
        agent, "cert_agent_issue_duration_seconds_count", issuer="local", operation=operation
    )


def serial_of(target: Path) -> int:
    return x509.load_pem_x509_certificate((target / "tls.crt").read_bytes()).serial_number


class Retries:
    """The scheduler's retry notifications, as an event per count."""

    def __init__(self, agent: RunningAgent) -> None:
        self.count = 0
        self._cond = threading.Condition()
        agent.agent.scheduler._on_retry = self._on_retry

    def _on_retry(self, _volume_id: str, attempt: int, _delay: float) -> None:
        with self._cond:
            self.count = attempt
            self._cond.notify_all()

    def wait(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= count, 30), "no failed renewal"


class FillAfterSigning:
    """The real local CA, then the tmpfs fills up before the agent writes the result."""

    def __init__(self, inner: Issuer, tmpfs: Path) -> None:
        self.inner = inner
        self.tmpfs = tmpfs
        self.filler: Path | None = None

    @property
    def name(self) -> str:
        return self.inner.name

    def issue(self, request: IssueRequest, timeout_seconds: float) -> IssuedCertificate:
        issued = self.inner.issue(request, timeout_seconds)
        self.filler = fill(self.tmpfs)
        return issued

    def ready(self) -> tuple[bool, str]:
        return self.inner.ready()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def agent(agent_factory: Any, clock: FakeClock) -> RunningAgent:
    running: RunningAgent = agent_factory(clock=clock)
    clock.set(time.time())  # not before the standalone CA the agent just made
    return running


def make_due(agent: RunningAgent, clock: FakeClock, volume_id: str) -> None:
    due = agent.agent.scheduler.due_time(volume_id)
    assert due is not None
    clock.set(due + 1)
    agent.agent.scheduler.wake()


def test_storage_and_mount_are_known_reasons() -> None:
    assert {"storage", "mount"} <= set(KNOWN_FAILURE_REASONS)


def test_renewal_failing_on_a_full_tmpfs_is_counted_then_recovers(
    agent: RunningAgent, clock: FakeClock
) -> None:
    pod = agent.pod("es-0")
    target = agent.publish(pod, ATTRIBUTES)
    serial = serial_of(target)
    retries = Retries(agent)
    filler = fill(agent.config.data_root / "volumes")

    make_due(agent, clock, pod.volume_id)
    retries.wait(1)
    assert serial_of(target) == serial  # the old certificate stays
    assert failures(agent, "renew", "storage") == 1
    assert finished(agent, "renew") == 1  # finished minus failed: no success
    assert sum(failures(agent, "renew", r) for r in KNOWN_FAILURE_REASONS) == 1

    filler.unlink()
    make_due(agent, clock, pod.volume_id)  # the backoff's retry time
    wait_for(lambda: serial_of(target) != serial, 30, "the renewal after space came back")
    wait_for(lambda: finished(agent, "renew") == 2, 30, "the retry to be counted")
    assert failures(agent, "renew", "storage") == 1


def test_renewal_failing_after_the_issuer_answered_is_counted(
    agent: RunningAgent, clock: FakeClock
) -> None:
    pod = agent.pod("es-0")
    target = agent.publish(pod, ATTRIBUTES)
    serial = serial_of(target)
    retries = Retries(agent)
    issuer = FillAfterSigning(agent.agent.issuers.local, agent.config.data_root / "volumes")
    agent.agent.issuers.local = issuer

    make_due(agent, clock, pod.volume_id)
    retries.wait(1)
    assert issuer.filler is not None  # the issuer did sign
    issuer.filler.unlink()
    assert serial_of(target) == serial
    assert failures(agent, "renew", "storage") == 1
    assert finished(agent, "renew") == 1


def test_first_issue_on_a_full_tmpfs_is_counted(agent: RunningAgent) -> None:
    # With the default --tmpfs-reserve a full tmpfs refuses the new volume before any issue
    # (RESOURCE_EXHAUSTED, tests/test_tmpfs_limits.py); without it the write itself fails.
    agent.agent.manager.tmpfs_reserve_bytes = 0
    filler = fill(agent.config.data_root / "volumes")
    pod = agent.pod("es-0")
    with pytest.raises(grpc.RpcError) as error:
        agent.publish(pod, ATTRIBUTES)
    filler.unlink()
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert failures(agent, "issue", "storage") == 1
    assert finished(agent, "issue") == 1
    assert not pod.target.exists()
