"""A full tmpfs: new volumes are refused first, so existing volumes can always renew."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tests.conftest import IS_ROOT, RunningAgent
from tests.test_renewal_limits import sample

ATTRS = {
    "csi.cert-agent.io/dns-names": "app.default.svc",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}
MiB = 1024 * 1024


def fill_to(volumes_dir: Path, free_target: int) -> Path:
    """Write a file on the tmpfs so that about ``free_target`` bytes stay free."""
    st = os.statvfs(volumes_dir)
    free = st.f_bavail * st.f_frsize
    filler = volumes_dir / "filler!"  # not a volume id: the store ignores it
    with open(filler, "wb") as out:
        out.write(b"\0" * (free - free_target))
    return filler


def serial(target: Path) -> int:
    return x509.load_pem_x509_certificate((target / "tls.crt").read_bytes()).serial_number


@pytest.mark.skipif(not IS_ROOT, reason="the payload tmpfs needs root (CI runs as root)")
def test_below_the_reserve_new_volumes_are_refused_and_renewals_still_complete(
    agent_factory: object,
) -> None:
    agent: RunningAgent = agent_factory(  # type: ignore[operator]
        tmpfs_size_bytes=16 * MiB, tmpfs_reserve_bytes=2 * MiB
    )
    volumes_dir = agent.config.data_root / "volumes"
    existing = agent.pod("existing")
    target = agent.publish(existing, ATTRS)
    first = serial(target)
    assert sample(agent, "cert_agent_tmpfs_size_bytes") == 16 * MiB

    filler = fill_to(volumes_dir, 2 * MiB - 256 * 1024)
    free = sample(agent, "cert_agent_tmpfs_free_bytes")
    assert free is not None and free < 2 * MiB

    newcomer = agent.pod("newcomer")
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(newcomer, ATTRS)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details() or ""
    assert "--tmpfs-reserve" in details and "--tmpfs-size" in details
    # Nothing of the refused volume stays behind.
    assert agent.agent.store.count() == 1
    assert not newcomer.target.exists()
    assert not (volumes_dir / newcomer.volume_id).exists()

    # The existing volume renews inside the reserve (what the scheduler's worker calls).
    agent.agent.manager.renew(existing.volume_id)
    assert serial(target) != first

    filler.unlink()
    agent.publish(newcomer, ATTRS)
    assert (newcomer.target / "tls.crt").exists()


@pytest.mark.skipif(not IS_ROOT, reason="the payload tmpfs needs root (CI runs as root)")
def test_a_full_tmpfs_refuses_a_new_volume_before_any_issue(agent_factory: object) -> None:
    agent: RunningAgent = agent_factory(tmpfs_reserve_bytes=2 * MiB)  # type: ignore[operator]
    filler = fill_to(agent.config.data_root / "volumes", 64 * 1024)
    try:
        with pytest.raises(grpc.RpcError) as info:
            agent.publish(agent.pod("app"), ATTRS)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # was INTERNAL on main
        assert sample(agent, "cert_agent_issue_attempts_total", operation="issue") == 0.0
    finally:
        filler.unlink()
