"""After a CA rotation the replaced CA stays in every ca.crt for the overlap, then leaves.

The agent runs in cluster mode against the fake API server (the CA comes from a watched Secret)
with real mounts and an injected clock: the overlap is months long by default, and the test moves
the clock to its end instead of waiting.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.issuers.base import IssuedCertificate, Issuer, IssueRequest
from agent.server import CA_OVERLAP_STATE
from tests.conftest import FakeClock, RunningAgent, openssl, wait_for
from tests.fakekube import FakeKube, pem

CA_SECRET = ("cert-agent", "cert-agent-ca")
DAY = 86400.0
MAX_DURATION = 2160 * 3600  # the default --max-duration, hence the default overlap
ATTRIBUTES = {"csi.cert-agent.io/key-algorithm": "ECDSA"}


def make_ca(common_name: str, now: float, days: float) -> tuple[dict[str, bytes], x509.Certificate]:
    """A CA Secret's data whose certificate is valid from ``now`` for ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = dt.datetime.fromtimestamp(int(now) - 60, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
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
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"ca.crt": pem(cert), "ca.key": key_pem}, cert


def bundle(target: Path) -> list[x509.Name]:
    return [c.subject for c in x509.load_pem_x509_certificates((target / "ca.crt").read_bytes())]


def issuer_of(target: Path) -> x509.Name:
    return x509.load_pem_x509_certificate((target / "tls.crt").read_bytes()).issuer


class Cluster:
    """A cluster-mode agent on a fake clock, restartable on the same data root."""

    def __init__(
        self, fake: FakeKube, tmp_path: Path, agent_factory: Any, monkeypatch: Any
    ) -> None:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        self.fake = fake
        self.factory = agent_factory
        self.kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        self.clock = FakeClock()
        self.state_file = tmp_path / "data" / CA_OVERLAP_STATE

    def start(self, **overrides: object) -> RunningAgent:
        agent: RunningAgent = self.factory(
            standalone=False,
            kubeconfig=str(self.kubeconfig),
            ca_secret=CA_SECRET,
            clock=self.clock,
            **overrides,
        )
        return agent

    def rotate(self, agent: RunningAgent, data: dict[str, bytes], targets: list[Path]) -> None:
        """Replace the CA Secret; wait until this node has reissued every volume from it."""
        new = x509.load_pem_x509_certificate(data["ca.crt"]).subject
        self.fake.put_secret(*CA_SECRET, data)
        wait_for(lambda: all(issuer_of(t) == new for t in targets), 30, "every volume reissued")
        rotation = agent.agent._rotation
        wait_for(lambda: rotation.changed_at is None, 30, "the reissue to be noticed")
        # The reissues ran on the renewal workers: wait until each has rescheduled its volume.
        scheduler = agent.agent.scheduler
        wait_for(
            lambda: scheduler.running() == 0 and scheduler.pending() == len(targets),
            30,
            "the reissues to finish",
        )

    def end_overlap(self, agent: RunningAgent, when: float) -> None:
        self.clock.set(when)
        agent.agent._rotation.wake()


@pytest.fixture
def cluster(
    fake: FakeKube, tmp_path: Path, agent_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> Cluster:
    return Cluster(fake, tmp_path, agent_factory, monkeypatch)


def publish(agent: RunningAgent, *names: str) -> list[Path]:
    return [
        agent.publish(
            agent.pod(n, namespace="elastic"),
            {**ATTRIBUTES, "csi.cert-agent.io/dns-names": f"{n}.elastic.svc"},
        )
        for n in names
    ]


def renew_all(cluster: Cluster, agent: RunningAgent, targets: list[Path]) -> float:
    """Move the clock to the latest renewal time of the volumes and wait for their renewals."""
    scheduler = agent.agent.scheduler
    volumes = [m.volume_id for m in agent.agent.store.metas()]
    due = max(scheduler.due_time(v) or 0.0 for v in volumes)
    serials = [(t / "tls.crt").read_bytes() for t in targets]
    cluster.clock.set(due + 1)
    scheduler.wake()
    wait_for(
        lambda: (
            all((t / "tls.crt").read_bytes() != s for t, s in zip(targets, serials, strict=True))
            and scheduler.running() == 0
        ),
        30,
        "every volume renewed",
    )
    return due + 1


def test_replaced_ca_stays_in_every_ca_crt_for_the_longest_lifetime_it_issued(
    cluster: Cluster, tmp_path: Path
) -> None:
    old_data, old_ca = make_ca("old local CA", cluster.clock(), 3650)
    cluster.fake.put_secret(*CA_SECRET, old_data)
    agent = cluster.start()
    targets = publish(agent, "es-0", "es-1")
    old_leaf = (targets[0] / "tls.crt").read_bytes()
    new_data, new_ca = make_ca("new local CA", cluster.clock(), 3650)
    changed_at = cluster.clock()
    cluster.rotate(agent, new_data, targets)

    # Reissued from the new CA, and yet both CAs stay trusted: a pod elsewhere still holding an
    # old-CA certificate is accepted by these pods, and theirs by it.
    for target in targets:
        assert bundle(target) == [new_ca.subject, old_ca.subject]
        (tmp_path / "old-leaf.pem").write_bytes(old_leaf)
        ca_file = str(target / "ca.crt")
        assert "OK" in openssl("verify", "-CAfile", ca_file, str(tmp_path / "old-leaf.pem"))
        assert "OK" in openssl("verify", "-CAfile", ca_file, str(target / "tls.crt"))
    [retiring] = agent.agent._rotation.retiring()
    assert retiring.leaves_at == changed_at + MAX_DURATION  # default: --max-duration

    # Renewals during the overlap keep both CAs.
    renewed_at = renew_all(cluster, agent, targets)
    assert renewed_at < retiring.leaves_at
    for target in targets:
        assert bundle(target) == [new_ca.subject, old_ca.subject]

    cluster.end_overlap(agent, retiring.leaves_at - 1)
    assert all(bundle(t) == [new_ca.subject, old_ca.subject] for t in targets)
    cluster.end_overlap(agent, retiring.leaves_at)
    wait_for(lambda: all(bundle(t) == [new_ca.subject] for t in targets), 30, "the old CA gone")
    assert agent.agent._rotation.retiring() == []
    assert json.loads(cluster.state_file.read_text())["retiring"] == []
    # New volumes get the new CA alone too.
    [late] = publish(agent, "es-2")
    assert bundle(late) == [new_ca.subject]


def test_overlap_never_outlasts_the_replaced_ca(cluster: Cluster) -> None:
    old_data, old_ca = make_ca("short-lived old CA", cluster.clock(), 2)
    cluster.fake.put_secret(*CA_SECRET, old_data)
    agent = cluster.start()
    targets = publish(agent, "es-0")
    cluster.rotate(agent, make_ca("new local CA", cluster.clock(), 3650)[0], targets)
    [retiring] = agent.agent._rotation.retiring()
    old_end = old_ca.not_valid_after_utc.timestamp()
    assert retiring.leaves_at == old_end  # not 90 days: nothing it issued outlives it

    cluster.end_overlap(agent, old_end)
    wait_for(lambda: len(bundle(targets[0])) == 1, 30, "the expired CA gone")


def test_ca_overlap_setting_shortens_it(cluster: Cluster) -> None:
    old_data, _old_ca = make_ca("old local CA", cluster.clock(), 3650)
    cluster.fake.put_secret(*CA_SECRET, old_data)
    agent = cluster.start(ca_overlap_seconds=3600.0)
    targets = publish(agent, "es-0")
    changed_at = cluster.clock()
    new_data, new_ca = make_ca("new local CA", cluster.clock(), 3650)
    cluster.rotate(agent, new_data, targets)
    [retiring] = agent.agent._rotation.retiring()
    assert retiring.leaves_at == changed_at + 3600

    cluster.end_overlap(agent, changed_at + 3600)
    wait_for(lambda: bundle(targets[0]) == [new_ca.subject], 30, "the old CA gone")


def test_a_restart_during_the_overlap_keeps_the_replaced_ca(cluster: Cluster) -> None:
    old_data, old_ca = make_ca("old local CA", cluster.clock(), 3650)
    cluster.fake.put_secret(*CA_SECRET, old_data)
    first = cluster.start()
    targets = publish(first, "es-0")
    new_data, new_ca = make_ca("new local CA", cluster.clock(), 3650)
    cluster.rotate(first, new_data, targets)
    [retiring] = first.agent._rotation.retiring()
    first.stop()

    second = cluster.start()
    assert second.agent._rotation.retiring() == [retiring]
    [late] = publish(second, "es-1")  # issued after the restart: still both
    assert bundle(late) == [new_ca.subject, old_ca.subject]
    cluster.end_overlap(second, retiring.leaves_at)
    wait_for(
        lambda: all(bundle(t) == [new_ca.subject] for t in [*targets, late]), 30, "old CA gone"
    )


class HeldAfterSigning:
    """The real local issuer; a renewal then waits (signed, not yet written) until released."""

    def __init__(self, inner: Issuer) -> None:
        self.inner = inner
        self.signed = threading.Event()
        self.release = threading.Event()

    @property
    def name(self) -> str:
        return self.inner.name

    def issue(self, request: IssueRequest, timeout_seconds: float) -> IssuedCertificate:
        issued = self.inner.issue(request, timeout_seconds)
        self.signed.set()
        assert self.release.wait(30)
        return issued

    def ready(self) -> tuple[bool, str]:
        return self.inner.ready()


def test_a_renewal_signed_before_the_drop_does_not_bring_the_old_ca_back(
    cluster: Cluster,
) -> None:
    old_data, _old_ca = make_ca("old local CA", cluster.clock(), 3650)
    cluster.fake.put_secret(*CA_SECRET, old_data)
    agent = cluster.start(ca_overlap_seconds=3600.0)
    [target] = publish(agent, "es-0")
    new_data, new_ca = make_ca("new local CA", cluster.clock(), 3650)
    changed_at = cluster.clock()
    cluster.rotate(agent, new_data, [target])
    held = HeldAfterSigning(agent.agent.issuers.local)
    agent.agent.issuers.local = held

    # A renewal signs while the old CA is still trusted (its bundle names both CAs) ...
    due = agent.agent.scheduler.due_time(agent.agent.store.volume_ids()[0])
    assert due is not None and due > changed_at + 3600
    cluster.clock.set(due + 1)
    agent.agent.scheduler.wake()
    assert held.signed.wait(30)
    # ... the overlap ends and every ca.crt is rewritten meanwhile ...
    agent.agent._rotation.wake()
    wait_for(lambda: bundle(target) == [new_ca.subject], 30, "the old CA gone")
    serial = (target / "tls.crt").read_bytes()
    # ... and the renewal, written afterwards, carries the bundle of its commit.
    held.release.set()
    wait_for(lambda: (target / "tls.crt").read_bytes() != serial, 30, "the renewal written")
    wait_for(lambda: agent.agent.scheduler.running() == 0, 30, "the renewal to finish")
    assert bundle(target) == [new_ca.subject]


def test_ca_overlap_is_a_setting(tmp_path: Path) -> None:
    import argparse

    from agent.config import ConfigError, add_serve_arguments, resolve

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    base = ["--standalone", "--data-root", str(tmp_path)]
    assert resolve(parser.parse_args(base)).ca_overlap_seconds is None
    args = parser.parse_args([*base, "--ca-overlap", "720h"])
    assert resolve(args).ca_overlap_seconds == 720 * 3600
    env = {"CERT_AGENT_CA_OVERLAP": "0s"}
    assert resolve(parser.parse_args(base), env).ca_overlap_seconds == 0
    (tmp_path / "c.yaml").write_text("ca-overlap: 48h\n")
    args = parser.parse_args([*base, "--config", str(tmp_path / "c.yaml")])
    assert resolve(args, {}).ca_overlap_seconds == 48 * 3600
    with pytest.raises(ConfigError, match="--ca-overlap"):
        resolve(parser.parse_args([*base, "--ca-overlap=-1h"]), {})
