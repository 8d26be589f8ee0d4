"""Renewals give way to kubelet's calls (a renewal storm must not starve NodePublishVolume)."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.volumes.priority import KubeletFirst
from tests.conftest import RunningAgent

ATTRIBUTES = {"csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local"}


def test_a_renewal_waits_while_a_kubelet_call_is_in_flight() -> None:
    gate = KubeletFirst(max_wait_seconds=60, quiet_seconds=0)
    gate.before_renewal()  # nothing in flight: no wait
    assert gate.waited == 0
    inside, leave = threading.Event(), threading.Event()

    def kubelet() -> None:
        with gate.kubelet_call():
            inside.set()
            leave.wait(30)

    call = threading.Thread(target=kubelet)
    call.start()
    assert inside.wait(30)
    renewed = threading.Event()
    renewal = threading.Thread(target=lambda: (gate.before_renewal(), renewed.set()))
    renewal.start()
    assert not renewed.wait(0.2)
    leave.set()
    assert renewed.wait(30)
    call.join(30)
    renewal.join(30)
    assert gate.waited == 1 and gate.in_flight == 0


def test_a_renewal_waits_for_a_quiet_moment_after_the_last_call() -> None:
    now = [100.0]
    gate = KubeletFirst(max_wait_seconds=60, quiet_seconds=0.01, clock=lambda: now[0])
    with gate.kubelet_call():
        pass  # ended at 100.0
    now[0] = 100.02  # quiet long enough
    gate.before_renewal()
    assert gate.waited == 0
    with gate.kubelet_call():
        pass  # ended at 100.02
    now[0] = 100.025  # 5 ms after: the renewal waits the other 5 ms
    waiting = threading.Thread(target=gate.before_renewal)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()
    with gate.kubelet_call():  # another call: the quiet period starts over when it ends
        now[0] = 100.05
    waiting.join(0.2)
    assert waiting.is_alive()
    now[0] = 100.06  # 10 ms after the last call ended
    waiting.join(30)
    assert not waiting.is_alive() and gate.waited == 1


def test_the_wait_is_bounded_so_a_busy_node_still_renews() -> None:
    gate = KubeletFirst(max_wait_seconds=0.01)
    with gate.kubelet_call():
        gate.before_renewal()  # returns after the bound although the call is still in flight
    assert gate.waited == 1


def test_publish_and_unpublish_count_as_kubelet_calls(tmp_path: Path) -> None:
    running = RunningAgent(tmp_path)
    try:
        manager = running.agent.manager
        seen: list[int] = []
        mounter_bind = manager.mounter.bind_readonly

        def bind(*args: object) -> None:
            seen.append(manager.priority.in_flight)
            mounter_bind(*args)  # type: ignore[arg-type]

        manager.mounter.bind_readonly = bind  # type: ignore[method-assign]
        pod = running.pod("web-0")
        running.publish(pod, ATTRIBUTES)
        assert manager.priority.in_flight == 0
        running.client.unpublish(pod.volume_id, str(pod.target))
        assert manager.priority.in_flight == 0
        if manager.mounter.can_mount:
            assert seen == [1]
    finally:
        running.stop()
