"""The local CA from a Secret: load, reload on change, trust bundle during a rotation."""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import FailedPrecondition
from agent.issuers.secret_ca import SecretCAProvider
from agent.kube.client import KubeSettings, make_api_client
from tests.fakekube import FakeKube, RequestRecord, make_test_ca, pem

NS = "cert-agent"
NAME = "agent-ca"


@pytest.fixture
def api(fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    return make_api_client(KubeSettings(kubeconfig=str(kubeconfig)))


def ca_files(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, dict[str, bytes]]:
    key, cert = make_test_ca(name)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, cert, {"ca.crt": pem(cert), "ca.key": key_pem}


def leaf_signed_by(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "es-0")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(ca_key, hashes.SHA256())
    )
    return pem(cert)


def verifies(tmp_path: Path, bundle: bytes, leaf: bytes) -> bool:
    (tmp_path / "bundle.pem").write_bytes(bundle)
    (tmp_path / "leaf.pem").write_bytes(leaf)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "bundle.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture
def changes() -> tuple[threading.Event, Callable[[], None]]:
    event = threading.Event()
    return event, event.set


def test_loads_the_ca_from_the_secret(fake: FakeKube, api: Any) -> None:
    _, cert, files = ca_files("ca one")
    fake.put_secret(NS, NAME, files)
    provider = SecretCAProvider(api, NS, NAME)
    provider.start()
    try:
        assert provider.current().certificate == cert
        assert provider.trust_bundle_pem() == pem(cert)
        assert not provider.rotating
    finally:
        provider.stop()


def test_rotation_reloads_and_bundles_old_and_new_until_retired(
    fake: FakeKube, api: Any, tmp_path: Path
) -> None:
    key1, cert1, files1 = ca_files("ca one")
    key2, cert2, files2 = ca_files("ca two")
    fake.put_secret(NS, NAME, files1)
    changed = threading.Event()
    provider = SecretCAProvider(api, NS, NAME, on_change=changed.set)
    provider.start()
    try:
        fake.wait_until(lambda: bool(fake.active_watches("secrets")))
        fake.put_secret(NS, NAME, files2)
        assert changed.wait(10)

        assert provider.current().certificate == cert2
        bundle = provider.trust_bundle_pem()
        assert x509.load_pem_x509_certificates(bundle) == [cert2, cert1]
        # Peers with certificates from either CA keep working during the rotation.
        old_leaf, new_leaf = leaf_signed_by(key1, cert1), leaf_signed_by(key2, cert2)
        assert verifies(tmp_path, bundle, old_leaf)
        assert verifies(tmp_path, bundle, new_leaf)

        provider.retire_previous()
        bundle = provider.trust_bundle_pem()
        assert x509.load_pem_x509_certificates(bundle) == [cert2]
        assert verifies(tmp_path, bundle, new_leaf)
        assert not verifies(tmp_path, bundle, old_leaf)
    finally:
        provider.stop()


def test_broken_update_keeps_signing_with_the_last_good_ca(fake: FakeKube, api: Any) -> None:
    _, cert1, files1 = ca_files("ca one")
    _, cert3, files3 = ca_files("ca three")
    fake.put_secret(NS, NAME, files1)
    provider = SecretCAProvider(api, NS, NAME)
    provider.start()
    try:
        fake.wait_until(lambda: bool(fake.active_watches("secrets")))
        fake.put_secret(NS, NAME, {"ca.crt": files1["ca.crt"], "ca.key": files3["ca.key"]})
        wait_for(lambda: provider.last_error is not None)
        assert "does not match" in (provider.last_error or "")
        assert provider.current().certificate == cert1
        fake.put_secret(NS, NAME, files3)
        wait_for(lambda: provider.current().certificate == cert3)
        assert provider.last_error is None
    finally:
        provider.stop()


def test_change_is_seen_after_the_watch_drops_or_expires(fake: FakeKube, api: Any) -> None:
    _, _, files1 = ca_files("ca one")
    _, cert2, files2 = ca_files("ca two")
    _, cert3, files3 = ca_files("ca three")
    fake.put_secret(NS, NAME, files1)
    provider = SecretCAProvider(api, NS, NAME)
    provider.start()
    try:
        fake.wait_until(lambda: len(fake.active_watches("secrets")) == 1)
        fake.drop_watches(after_events=0, count=1)
        fake.cut_watches()
        fake.put_secret(NS, NAME, files2)  # changed while nobody watched
        wait_for(lambda: provider.current().certificate == cert2)

        fake.gone_next_watches(1)
        fake.cut_watches()
        fake.wait_until(lambda: fake.gone_pending == 0)  # the re-watch was answered 410
        fake.put_secret(NS, NAME, files3)
        wait_for(lambda: provider.current().certificate == cert3)
    finally:
        provider.stop()


def test_missing_secret_is_a_clear_error(fake: FakeKube, api: Any) -> None:
    provider = SecretCAProvider(api, NS, NAME)
    with pytest.raises(FailedPrecondition) as info:
        provider.start()
    message = info.value.message
    assert f"Secret {NS}/{NAME} does not exist" in message
    assert "ca.crt" in message and "ca.key" in message


def test_secret_without_the_key_is_a_clear_error(fake: FakeKube, api: Any) -> None:
    _, _, files = ca_files("ca one")
    fake.put_secret(NS, NAME, {"ca.crt": files["ca.crt"], "tls.crt": files["ca.crt"]})
    provider = SecretCAProvider(api, NS, NAME)
    with pytest.raises(FailedPrecondition) as info:
        provider.start()
    assert "lacks key(s) ca.key" in info.value.message
    assert "(it has: ca.crt, tls.crt)" in info.value.message


def test_not_a_ca_is_refused_at_start(fake: FakeKube, api: Any) -> None:
    key, _, files = ca_files("ca one")
    leaf = leaf_signed_by(key, make_test_ca("other")[1])
    fake.put_secret(NS, NAME, {"ca.crt": leaf, "ca.key": files["ca.key"]})
    provider = SecretCAProvider(api, NS, NAME)
    with pytest.raises(FailedPrecondition) as info:
        provider.start()
    assert f"Secret {NS}/{NAME}" in info.value.message


def test_stop_ends_the_watch_thread(fake: FakeKube, api: Any) -> None:
    _, _, files = ca_files("ca one")
    fake.put_secret(NS, NAME, files)
    provider = SecretCAProvider(api, NS, NAME)
    provider.start()
    fake.wait_until(lambda: bool(fake.active_watches("secrets")))
    provider.stop()
    threads = [t for t in threading.enumerate() if t.name == f"ca-secret-{NS}-{NAME}"]
    assert threads == []


def secret_requests(fake: FakeKube, since: int) -> list[RequestRecord]:
    with fake._cond:
        return [r for r in fake.requests[since:] if "/secrets" in r.path]


def is_watch(record: RequestRecord) -> bool:
    return record.query.get("watch") in ("true", "1")


def test_after_compaction_it_relists_once_and_watches_from_the_lists_version(
    fake: FakeKube, api: Any
) -> None:
    """Regression: after a 410 the provider resumed from the Secret's own resourceVersion, older
    than the compaction, and got 410 again, forever. It must list and watch from the list's."""
    _, _, files1 = ca_files("ca one")
    _, cert2, files2 = ca_files("ca two")
    _, cert3, files3 = ca_files("ca three")
    fake.put_secret(NS, NAME, files1)
    provider = SecretCAProvider(api, NS, NAME)
    provider.start()
    try:
        fake.put_secret(NS, NAME, files2)
        wait_for(lambda: provider.current().certificate == cert2)  # the watch is streaming
        mark = len(fake.requests)
        # The cluster moves on (versions past the Secret's own), then etcd compacts them away.
        unrelated = fake.put_secret(NS, "unrelated", files1)
        compacted = int(unrelated["metadata"]["resourceVersion"])
        fake.expire_history()
        fake.cut_watches()

        def watching_after_compaction() -> bool:
            return any(
                int(w.query.get("resourceVersion") or 0) >= compacted
                for w in fake.active_watches("secrets")
            )

        fake.wait_until(watching_after_compaction)
        fake.put_secret(NS, NAME, files3)
        wait_for(lambda: provider.current().certificate == cert3)  # seen through that watch

        requests = secret_requests(fake, mark)
        watches = [r for r in requests if is_watch(r)]
        lists = [r for r in requests if not is_watch(r) and r.path.endswith("/secrets")]
        reads = [r for r in requests if r.path.endswith(f"/secrets/{NAME}")]
        # One watch answered 410, one list, one watch from the list's version: no loop.
        assert (len(watches), len(lists), len(reads)) == (2, 1, 0), requests
        assert "resourceVersion" not in lists[0].query  # a fresh list, not a stale one
    finally:
        provider.stop()


def test_a_server_that_keeps_answering_410_is_retried_with_backoff(
    fake: FakeKube, api: Any
) -> None:
    _, _, files = ca_files("ca one")
    fake.put_secret(NS, NAME, files)
    backoffs: list[int] = []  # how many requests the server had seen at each backoff

    def backoff(failures: int) -> float:
        backoffs.append(len(fake.requests))
        return 0.0

    provider = SecretCAProvider(api, NS, NAME, backoff=backoff)
    provider.start()
    try:
        fake.wait_for_watch(1, "secrets")
        mark = len(fake.requests)
        fake.gone_next_watches(5, path_contains="secrets")
        fake.cut_watches()
        fake.wait_until(lambda: fake.gone_pending == 0 and bool(fake.active_watches("secrets")))

        with fake._cond:
            indexed = list(enumerate(fake.requests))[mark:]
        lists = [i for i, r in indexed if r.path.endswith("/secrets") and not is_watch(r)]
        assert 1 <= len(lists) <= 5
        for before, after in itertools.pairwise(lists):
            # A list whose watch was answered 410 at once is not repeated without a backoff.
            assert any(before < b <= after for b in backoffs), (lists, backoffs)
    finally:
        provider.stop()
