"""Start-up recovery runs behind a serving socket, and waits only for the volume a call names."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.csi import csi_pb2
from agent.volumes import mountinfo
from agent.volumes.manager import VolumeManager
from agent.volumes.recovery import RecoveryQueue
from tests.conftest import IS_ROOT, Pod, RunningAgent, unmount_below

ATTRIBUTES = {"csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local"}


def is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def test_serves_while_recovering_and_a_call_recovers_its_own_volume_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = RunningAgent(tmp_path)
    pods = [first.pod(f"web-{i}") for i in range(3)]
    requests = [pod.request(ATTRIBUTES) for pod in pods]
    for request in requests:
        first.client.publish(request)
    first.stop()
    # The background thread takes volumes in id order: hold it on the first one.
    pods.sort(key=lambda pod: pod.volume_id)
    held, queued, other = pods
    requests = [pod.request(ATTRIBUTES) for pod in pods]
    if first.agent.mounter.can_mount:
        subprocess.run(["umount", str(queued.target)], check=True)  # lost while the agent was down
    entered, release = threading.Event(), threading.Event()
    recover_one = VolumeManager._recover_one

    def slow(self: VolumeManager, volume_id: str) -> None:
        if volume_id == held.volume_id:
            entered.set()
            release.wait(30)
        recover_one(self, volume_id)

    monkeypatch.setattr(VolumeManager, "_recover_one", slow)
    second = RunningAgent(tmp_path, wait_recovered=False)
    try:
        assert entered.wait(30)
        # Probe answers while recovery is still under way.
        response = second.client.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
        assert response.ready.value
        assert second.agent.manager.recovery.pending() == 3

        # kubelet republishes a queued volume: it is recovered first (bind back), at once.
        second.client.publish(requests[1])
        if second.agent.mounter.can_mount:
            assert is_mountpoint(queued.target)
        assert second.agent.scheduler.due_time(queued.volume_id) is not None
        assert second.agent.manager.recovery.pending() == 2

        # A call for the volume being recovered right now waits for that one volume.
        done = threading.Event()
        errors: list[BaseException] = []

        def unpublish_held() -> None:
            try:
                second.client.unpublish(held.volume_id, str(held.target))
            except grpc.RpcError as exc:
                errors.append(exc)
            done.set()

        caller = threading.Thread(target=unpublish_held)
        caller.start()
        assert not done.wait(0.3)
        release.set()
        caller.join(30)
        assert done.is_set() and errors == []
        assert not held.target.exists()
        assert second.agent.wait_recovered(30)
        assert second.agent.manager.recovery.pending() == 0
        assert second.agent.scheduler.due_time(other.volume_id) is not None
        assert second.agent.scheduler.due_time(held.volume_id) is None
    finally:
        release.set()
        second.stop()


def test_queue_recovers_each_volume_exactly_once() -> None:
    seen: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()

    def recover(volume_id: str) -> None:
        if volume_id == "a":
            gate.wait(30)
        with lock:
            seen.append(volume_id)

    queue = RecoveryQueue(recover)
    assert queue.load(["a", "b", "c"]) == 3
    background = threading.Thread(target=queue.run)
    background.start()
    queue.settle("c")  # taken over by the caller while the background is held on "a"
    assert seen == ["c"]
    waiter = threading.Thread(target=queue.settle, args=("a",))
    waiter.start()
    gate.set()
    waiter.join(30)
    background.join(30)
    assert sorted(seen) == ["a", "b", "c"]
    assert queue.wait(0) and queue.pending() == 0 and queue.recovered == 3
    queue.settle("a")  # already recovered: nothing runs again
    queue.settle("unknown")
    assert len(seen) == 3


def test_a_failing_volume_is_logged_and_the_rest_recover(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def recover(volume_id: str) -> None:
        if volume_id == "bad":
            raise RuntimeError("broken metadata")
        seen.append(volume_id)

    queue = RecoveryQueue(recover)
    queue.load(["bad", "good"])
    queue.run()
    assert seen == ["good"] and queue.pending() == 0
    assert "could not recover volume" in caplog.text


def test_stop_leaves_the_rest_queued() -> None:
    queue = RecoveryQueue(lambda volume_id: queue.stop())
    queue.load(["a", "b"])
    assert queue.run() == 1
    assert queue.pending() == 1


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")
def test_a_start_with_binds_in_place_never_parses_the_mount_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With thousands of binds, /proc/self/mountinfo has thousands of lines: parsing it to find
    # the payload tmpfs cost a restart with 5,000 volumes half a second before the socket served.
    first = RunningAgent(tmp_path)
    pods = [first.pod(f"web-{i}") for i in range(2)]
    for pod in pods:
        first.publish(pod, ATTRIBUTES)
    first.stop()
    subprocess.run(["umount", str(pods[0].target)], check=True)

    def refuse(text: str) -> list[object]:
        raise AssertionError("the whole mount table was parsed")

    monkeypatch.setattr(mountinfo, "parse_mountinfo", refuse)
    second = RunningAgent(tmp_path)
    try:
        assert second.agent.mounter.is_tmpfs(tmp_path / "data" / "volumes")
        assert all(is_mountpoint(pod.target) for pod in pods)
        assert second.agent.manager.recovery.recovered == 2
    finally:
        second.stop()
        monkeypatch.undo()
        unmount_below(tmp_path)


def test_recovery_reads_the_hint_and_parses_only_metadata_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The commit stores what a restart needs (file names, whether the spec is needed); parsing
    # the attributes again was a fifth of the recovery time per volume. Older metadata, or a
    # hint of another version, is parsed as before.
    first = RunningAgent(tmp_path)
    hinted, old, other_version = (first.pod(name) for name in ("hinted", "old", "future"))
    for pod in (hinted, old):
        first.publish(pod, ATTRIBUTES)
    first.publish(other_version, {**ATTRIBUTES, "csi.cert-agent.io/certificate-file": "c.pem"})
    first.stop()
    volumes = tmp_path / "data" / "volumes"

    def edit(pod: Pod, change: Callable[[dict[str, Any]], None]) -> None:
        path = volumes / pod.volume_id / "meta.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    hint = json.loads((volumes / hinted.volume_id / "meta.json").read_text())["recovery_hint"]
    assert hint == {"version": 1, "files": ["tls.crt", "ca.crt", "tls.key"], "needs_spec": False}
    edit(old, lambda meta: meta.pop("recovery_hint"))
    edit(other_version, lambda meta: meta["recovery_hint"].update(version=99, files=["x"]))
    if first.agent.mounter.can_mount:
        for pod in (hinted, old, other_version):
            subprocess.run(["umount", str(pod.target)], check=True)
    parsed: list[str] = []
    parse = VolumeManager._parse

    def counting(self: VolumeManager, context: Mapping[str, str]) -> Any:
        parsed.append(context["csi.storage.k8s.io/pod.name"])
        return parse(self, context)

    monkeypatch.setattr(VolumeManager, "_parse", counting)
    second = RunningAgent(tmp_path)
    try:
        assert sorted(parsed) == ["future", "old"]
        for pod in (hinted, old, other_version):
            due = second.agent.scheduler.due_time(pod.volume_id)
            assert due is not None and due > time.time()  # resumed, not reissued
            if second.agent.mounter.can_mount:
                assert is_mountpoint(pod.target)
        assert (other_version.target / "c.pem").is_file()
        assert second.agent.metrics.registry.get_sample_value(
            "cert_agent_certificate_expiry_timestamp_seconds",
            {
                "namespace": "default",
                "pod": "hinted",
                "volume_id": hinted.volume_id,
                "issuer": "local",
            },
        )
    finally:
        second.stop()
        monkeypatch.undo()
        unmount_below(tmp_path)


def test_probe_and_calls_while_many_volumes_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ready while recovering means what the CSI spec asks of ready: every Node call is served
    # correctly now (a call for a volume not recovered yet recovers it, or waits for it alone).
    first = RunningAgent(tmp_path)
    pods = sorted((first.pod(f"app-{i}") for i in range(12)), key=lambda pod: pod.volume_id)
    for pod in pods:
        first.publish(pod, ATTRIBUTES)
    first.stop()
    held, in_queue = pods[4], pods[9]  # the background thread goes in id order
    if first.agent.mounter.can_mount:
        for pod in (held, in_queue):
            subprocess.run(["umount", str(pod.target)], check=True)
    entered, release = threading.Event(), threading.Event()
    recover_one = VolumeManager._recover_one

    def slow(self: VolumeManager, volume_id: str) -> None:
        if volume_id == held.volume_id:
            entered.set()
            release.wait(30)
        recover_one(self, volume_id)

    monkeypatch.setattr(VolumeManager, "_recover_one", slow)
    second = RunningAgent(tmp_path, wait_recovered=False)
    try:
        assert entered.wait(30)
        recovery = second.agent.manager.recovery
        assert recovery.pending() == len(pods) - 4  # four done, one held, the rest queued
        for _ in range(3):
            assert second.client.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
        assert second.client.plugin_info().name == second.config.driver_name

        # A republish of the volume held right now waits for that one volume, then answers OK.
        answered = threading.Event()
        failures: list[BaseException] = []

        def republish() -> None:
            try:
                second.client.publish(held.request(ATTRIBUTES))
            except grpc.RpcError as exc:
                failures.append(exc)
            answered.set()

        caller = threading.Thread(target=republish)
        caller.start()
        # A queued volume's call goes first, in its own thread, while the other one waits.
        second.client.publish(in_queue.request(ATTRIBUTES))
        if second.agent.mounter.can_mount:
            assert is_mountpoint(in_queue.target)
        assert not answered.is_set()
        assert second.client.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
        release.set()
        caller.join(30)
        assert answered.is_set() and failures == []
        if second.agent.mounter.can_mount:
            assert is_mountpoint(held.target)
        assert second.agent.wait_recovered(30)
        assert recovery.pending() == 0
        assert all(second.agent.scheduler.due_time(pod.volume_id) for pod in pods)
    finally:
        release.set()
        second.stop()
        monkeypatch.undo()
        unmount_below(tmp_path)


def test_a_call_before_the_listing_waits_for_it_and_recovers_its_volume() -> None:
    # The background thread lists the volumes after the socket serves; a call that comes first
    # must not act on its volume before that volume is known to need recovery.
    seen: list[str] = []
    queue = RecoveryQueue(seen.append)
    queue.expect()
    assert not queue.wait(0)
    caller = threading.Thread(target=queue.settle, args=("b",))
    caller.start()
    assert seen == []
    assert queue.load(["a", "b"]) == 2
    caller.join(30)
    assert not caller.is_alive() and seen == ["b"]  # it waited, then recovered its own volume
    assert queue.run() == 1
    assert seen == ["b", "a"] and queue.wait(0) and queue.recovered == 2

    # A listing that failed, or a stop, releases the callers too (nothing to recover then).
    for release in ("listed", "stop"):
        waiting = RecoveryQueue(seen.append)
        waiting.expect()
        caller = threading.Thread(target=waiting.settle, args=("c",))
        caller.start()
        getattr(waiting, release)()
        caller.join(30)
        assert not caller.is_alive()
    assert "c" not in seen
