"""A local-CA first issue writes no `issuing` record: what a kill in its middle can leave.

The agent's own CA signs within the publish call, so such a volume's metadata is written once,
complete, after its payload and before its bind. A kill between the payload and the metadata
leaves a payload (with its private key) that no record names and that nothing is mounted from;
the next start, or kubelet's unpublish of the cut-off publish, removes it. A volume whose
metadata exists but cannot be read is never removed that way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.volumes.mounter import LinuxMounter
from agent.volumes.paths import TargetDir
from agent.volumes.store import VolumeState, VolumeStore, write_payload
from tests.conftest import IS_ROOT, RunningAgent, unmount_below

ATTRS = {"csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc"}


def leave_unrecorded_payload(data_root: Path, volume_id: str) -> Path:
    """What a kill right after the payload write of a first issue leaves on the tmpfs."""
    payload = VolumeStore(data_root).payload_dir(volume_id)
    write_payload(payload, {"tls.key": b"key", "tls.crt": b"crt", "ca.crt": b"ca"}, None)
    return payload.parent


def test_a_start_removes_a_payload_that_no_record_names(tmp_path: Path) -> None:
    first = RunningAgent(tmp_path)
    kept = first.pod("kept")
    first.publish(kept, ATTRS)
    first.stop()
    orphan = leave_unrecorded_payload(tmp_path / "data", "csi-orphan")
    unreadable = leave_unrecorded_payload(tmp_path / "data", "csi-unreadable")
    (unreadable / "meta.json").write_text("{not json")
    try:
        second = RunningAgent(tmp_path)  # waits until recovery is done
        try:
            assert not orphan.exists()
            assert (unreadable / "meta.json").exists()  # unreadable is not "no record"
            assert (kept.target / "tls.crt").exists()
            assert second.agent.manager.store.load(kept.volume_id) is not None
        finally:
            second.stop()
    finally:
        unmount_below(tmp_path)


def test_kubelets_unpublish_of_a_cut_off_publish_removes_its_payload(tmp_path: Path) -> None:
    running = RunningAgent(tmp_path)
    try:
        pod = running.pod("cut-off")
        pod.target.parent.mkdir(parents=True)
        orphan = leave_unrecorded_payload(tmp_path / "data", pod.volume_id)
        running.client.unpublish(pod.volume_id, str(pod.target))
        assert not orphan.exists()
        # The publish kubelet retries instead works from scratch.
        running.publish(pod, ATTRS)
        assert (pod.target / "tls.key").exists()
    finally:
        running.stop()
        unmount_below(tmp_path)


@pytest.mark.mount
@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")
def test_a_local_first_issue_records_the_volume_before_binding_it(tmp_path: Path) -> None:
    """So that a kill at any moment leaves no bind without a record to undo it."""
    seen: list[tuple[VolumeState | None, bool]] = []
    store = VolumeStore(tmp_path / "data")

    class Recording(LinuxMounter):
        def bind_readonly(self, source: Path, target: TargetDir) -> None:
            volume_id = source.parent.name
            meta = store.load(volume_id)
            seen.append((None if meta is None else meta.state, (source / "tls.key").exists()))
            super().bind_readonly(source, target)

    running = RunningAgent(tmp_path, mounter=Recording())
    try:
        pod = running.pod("ordered")
        running.publish(pod, ATTRS)
        assert seen == [(VolumeState.READY, True)]
        assert not (tmp_path / "data" / "volumes" / pod.volume_id / "pending.key").exists()
    finally:
        running.stop()
        unmount_below(tmp_path)
