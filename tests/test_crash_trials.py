"""Crash trials: SIGKILL the agent at a random moment during publishes and during renewals.

After every kill, with the agent dead, every volume whose publish was acknowledged must still be
served at its target with a key that matches its certificate, read through one resolution of
``..data`` (0 torn); the agent is restarted, kubelet's retries of the publishes the kill cut off
must succeed, and no acknowledged volume may be missing (0 lost).

CI runs a few kills (CERT_AGENT_CRASH_KILLS, default 6); `make soak` runs 90. The random kill
moment comes from a seeded generator (CERT_AGENT_CRASH_SEED), and nothing asserted depends on
timing: a kill that lands between two operations is simply a weaker trial.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import IS_ROOT, AgentProcess, Pod

KILLS = int(os.environ.get("CERT_AGENT_CRASH_KILLS", "6"))
SEED = int(os.environ.get("CERT_AGENT_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
MAX_VOLUMES = 12
ATTRS = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
    # Short-lived so that renewals run all the time while the trial kills the agent.
    "csi.cert-agent.io/duration": "4s",
    "csi.cert-agent.io/renew-before": "3s",
}


def public_key(pem: bytes) -> bytes:
    if b"CERTIFICATE" in pem:
        key = x509.load_pem_x509_certificate(pem).public_key()
    else:
        key = serialization.load_pem_private_key(pem, None).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def consistent(target: Path) -> bool:
    """The files of one generation, reached through a single readlink of ..data, belong together."""
    generation = target / os.readlink(target / "..data")
    key, cert = (generation / "tls.key").read_bytes(), (generation / "tls.crt").read_bytes()
    return public_key(key) == public_key(cert) and (generation / "ca.crt").exists()


def publish(client_endpoint: str, pod: Pod) -> None:
    from agent.client import CSIClient

    with CSIClient(client_endpoint, timeout=30) as client:
        client.publish(pod.request(ATTRS))


def publish_until_ok(endpoint: str, pod: Pod) -> None:
    """kubelet's retry loop for a publish: ABORTED while the agent finishes it on its own."""
    for _ in range(200):
        try:
            publish(endpoint, pod)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
        time.sleep(0.05)
    raise AssertionError(f"publish of {pod.name} never succeeded")


@pytest.mark.mount
@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")
def test_sigkill_during_publish_and_renewal_loses_and_tears_nothing(
    agent_process: object, tmp_path: Path
) -> None:
    from agent.client import CSIClient

    rng = random.Random(SEED)
    print(f"\ncrash trials: seed {SEED}, {KILLS} kills")
    acknowledged: list[Pod] = []
    pending: list[Pod] = []  # publishes a kill cut off: kubelet retries them
    counter = 0
    results = {"kills": 0, "during_publish": 0, "during_renewal": 0, "torn": 0, "lost": 0}
    for trial in range(KILLS):
        agent: AgentProcess = agent_process()  # type: ignore[operator]
        for pod in pending:
            publish_until_ok(agent.endpoint, pod)
            acknowledged.append(pod)
        pending = []
        for pod in acknowledged:
            if not (pod.target / "tls.crt").exists() or not consistent(pod.target):
                results["lost"] += 1
        while len(acknowledged) > MAX_VOLUMES:
            old = acknowledged.pop(0)
            with CSIClient(agent.endpoint, timeout=30) as client:
                client.unpublish(old.volume_id, str(old.target))

        if trial % 2 == 0:
            # Kill somewhere inside a burst of publishes.
            batch = []
            for _ in range(3):
                counter += 1
                batch.append(Pod(tmp_path / "kubelet", f"pod-{counter}"))
            done: list[Pod] = []

            def burst(
                batch: list[Pod] = batch, done: list[Pod] = done, endpoint: str = agent.endpoint
            ) -> None:
                for pod in batch:
                    try:
                        publish(endpoint, pod)
                    except grpc.RpcError:
                        return
                    done.append(pod)

            thread = threading.Thread(target=burst)
            thread.start()
            time.sleep(rng.uniform(0.0, 0.3))
            agent.kill()
            thread.join()
            acknowledged.extend(done)
            pending = [pod for pod in batch if pod not in done]
            results["during_publish"] += 1
        else:
            # Kill while renewals run (every volume renews about once a second).
            time.sleep(rng.uniform(0.2, 1.5))
            agent.kill()
            results["during_renewal"] += 1
        results["kills"] += 1

        # The agent is dead: what a pod reads now is what a crash leaves behind.
        for pod in acknowledged:
            if not (pod.target / "tls.crt").exists():
                results["lost"] += 1
            elif not consistent(pod.target):
                results["torn"] += 1

    # A last start: everything acknowledged is there, and the retried publishes too.
    agent = agent_process()  # type: ignore[operator]
    for pod in pending:
        publish_until_ok(agent.endpoint, pod)
        acknowledged.append(pod)
    for pod in acknowledged:
        if not (pod.target / "tls.crt").exists() or not consistent(pod.target):
            results["lost"] += 1
    print(f"crash trials: {results}, {len(acknowledged)} volumes served at the end")
    assert results["kills"] == KILLS
    assert results["torn"] == 0 and results["lost"] == 0, results
