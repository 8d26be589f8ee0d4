"""Property-based: whatever target paths and volume ids arrive on the socket, the agent's mount
namespace holds nothing but its own tmpfs and the binds of live volumes, and nothing is created or
removed outside the data root and valid targets (issue 8).

One real agent per test (in-process, on its real socket, inside the session's private mount
namespace); hypothesis drives sequences of publish/unpublish requests at it, built from a
sandbox that holds every trap of the issue: '//' and '..' spellings, the data root, symlinks at
a target, at a parent and at a pod directory pointing at a decoy, a foreign mount at a valid
target, a target whose parent kubelet never made. After every request the whole mount table and
the whole sandbox tree are compared with what the agent's own metadata says it serves.

CERT_AGENT_HYPOTHESIS_EXAMPLES sets the number of examples (`make soak` raises it).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.client import kubelet_volume_id
from agent.volumes.mounter import read_mountinfo
from agent.volumes.store import VolumeState
from tests.conftest import IS_ROOT, Pod, RunningAgent, kubelet_target

EXAMPLES = int(os.environ.get("CERT_AGENT_HYPOTHESIS_EXAMPLES", "100"))
ATTRS = {
    "csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc",
    "csi.cert-agent.io/key-algorithm": "ECDSA",
}
# Codes a request may get; anything else (INTERNAL above all) is a finding.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}


@dataclass
class Sandbox:
    """Everything the requests aim at, and what must stay as it is."""

    agent: RunningAgent
    root: Path
    pods: list[Pod]
    decoy: Path
    foreign_target: Path
    baseline: list[tuple[str, str, str]] = field(default_factory=list)
    requests: int = 0
    answers: dict[str, int] = field(default_factory=dict)

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    def targets(self) -> list[str]:
        return [str(p.target) for p in self.pods] + [str(self.foreign_target)]


def build_sandbox(agent: RunningAgent, root: Path) -> Sandbox:
    pods = [agent.pod(f"p{i}") for i in range(6)]
    for pod in pods:
        pod.target.parent.mkdir(parents=True)
    decoy = root / "decoy"  # stands in for /etc
    decoy.mkdir()
    (decoy / "passwd").write_text("root:x:0:0\n")
    pods[3].target.symlink_to(decoy)  # a symlink at the target
    pods[4].target.parent.rmdir()  # a symlink at the parent
    pods[4].target.parent.symlink_to(decoy)
    pod5_dir = agent.tmp / "kubelet" / "pods" / pods[5].uid  # a symlink at the pod directory
    subprocess.run(["rm", "-rf", str(pod5_dir)], check=True)
    pod5_dir.symlink_to(decoy)
    foreign = kubelet_target(agent.tmp / "kubelet", "foreign")
    foreign.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "foreign", str(foreign)], check=True)
    box = Sandbox(agent, root, pods, decoy, foreign)
    box.baseline = mount_table()
    return box


def mount_table() -> list[tuple[str, str, str]]:
    return sorted((m.mount_point, m.fs_type, m.root) for m in read_mountinfo())


def tree(root: Path, skip: Path) -> set[str]:
    """Every path below root (symlinks not followed), without the data root's contents."""
    found = set()
    for directory, dirs, files in os.walk(root):
        if Path(directory) == skip:
            dirs[:] = []
            continue
        for name in dirs + files:
            found.add(os.path.join(directory, name))
    return found


def path_strategy(box: Sandbox) -> st.SearchStrategy[str]:
    data = str(box.agent.config.data_root)
    base = st.sampled_from(
        [
            *box.targets(),
            str(kubelet_target(box.kubelet, "never-made-by-kubelet")),
            data,
            f"{data}/volumes",
            str(box.kubelet),
            str(box.kubelet / "pods"),
            str(box.decoy),
            "/",
            "//",
            "/etc",
            "///etc/passwd",
            "relative/mount",
            "",
        ]
    )

    def mangle(path: str, how: str) -> str:
        if how == "double-slash":
            return "/" + path.replace("/", "//")
        if how == "dot":
            return path.replace("/volumes/", "/./volumes/")
        if how == "dotdot":
            return path + "/../../../../../../../.."
        if how == "trailing":
            return path + "/"
        if how == "nul":
            return path + "\x00x"
        if how == "long":
            return path + "/" + "a" * 300
        return path

    how = st.sampled_from(["none", "double-slash", "dot", "dotdot", "trailing", "nul", "long"])
    mangled = st.builds(mangle, base, how)
    noise = st.text(alphabet="/.a~-", max_size=12).map(lambda s: str(box.kubelet) + s)
    return st.one_of(mangled, mangled, noise)


def id_strategy(box: Sandbox) -> st.SearchStrategy[str]:
    known = [p.volume_id for p in box.pods] + [kubelet_volume_id("foreign", "tls")]
    odd = ["", ".", "..", "a/b", "x" * 200, "no-such-volume", "volumes", "../data"]
    return st.one_of(st.sampled_from(known), st.sampled_from(odd), st.text(max_size=8))


def live_binds(box: Sandbox) -> list[tuple[str, str, str]]:
    """What the agent's own metadata says must be mounted: one bind per ready volume."""
    binds = []
    tmpfs = next(
        m for m in read_mountinfo() if m.mount_point == str(box.agent.config.data_root / "volumes")
    )
    for meta in box.agent.agent.store.metas():
        assert meta.state == VolumeState.READY, f"{meta.volume_id} left in {meta.state}"
        binds.append((meta.target_path, tmpfs.fs_type, f"/{meta.volume_id}/data"))
    return binds


def relevant(box: Sandbox, table: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The table without other test sessions' leftovers: pytest deleting an old basetemp detaches
    the mounts a session left there in every namespace, ours included."""
    others = str(box.root.parent.parent) + "/"
    return [m for m in table if not m[0].startswith(others) or m[0].startswith(str(box.root))]


def check_invariants(box: Sandbox, before_tree: set[str]) -> None:
    expected = sorted(relevant(box, box.baseline) + live_binds(box))
    actual = relevant(box, mount_table())
    assert actual == expected, (
        f"unexpected: {sorted(set(actual) - set(expected))}, "
        f"missing: {sorted(set(expected) - set(actual))}"
    )
    for m in read_mountinfo():
        if m.root.endswith("/data") and m.fs_type == "tmpfs" and m.mount_point in box.targets():
            assert m.readonly, m
    # Nothing appeared or vanished outside the data root and the valid targets.
    served = {meta.target_path for meta in box.agent.agent.store.metas()}
    after = tree(box.root, box.agent.config.data_root)
    for path in after - before_tree:
        assert any(path == t or path.startswith(t + "/") for t in served), f"created {path}"
    for path in before_tree - after:
        assert path in box.targets() or any(path.startswith(t + "/") for t in box.targets()), (
            f"removed {path}"
        )
    assert os.listdir(box.decoy) == ["passwd"]


def request(box: Sandbox, op: str, volume_id: str, target: str, pod_index: int) -> None:
    pod = box.pods[pod_index]
    try:
        if op == "publish":
            message = pod.request(ATTRS) if pod_index in (0, 1, 2) else _detached(pod)
            message.volume_id = volume_id
            message.target_path = target
            box.agent.client.publish(message)
        else:
            box.agent.client.unpublish(volume_id, target)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in ALLOWED, f"{op}({volume_id!r}, {target!r}): {code} {exc.details()}"
    box.requests += 1
    box.answers[code.name] = box.answers.get(code.name, 0) + 1


def _detached(pod: Pod) -> object:
    """A request for a pod whose directories are traps: do not let Pod.request mkdir them."""
    from agent.client import pod_volume_context, publish_request

    return publish_request(
        volume_id=pod.volume_id,
        target_path=str(pod.target),
        volume_context=pod_volume_context(pod.identity, ATTRS),
    )


@pytest.mark.mount
@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")
def test_requests_never_touch_anything_but_the_agents_own(
    agent_factory: object, tmp_path: Path
) -> None:
    running: RunningAgent = agent_factory(grpc_workers=2)  # type: ignore[operator]
    box = build_sandbox(running, tmp_path)
    verb = st.sampled_from(["publish", "unpublish"])
    index = st.integers(0, 5)
    # A kubelet-like request (a pod's own id and target), a mismatched pair, or anything.
    coherent = st.builds(
        lambda op, i: (op, box.pods[i].volume_id, str(box.pods[i].target), i), verb, index
    )
    mismatched = st.builds(
        lambda op, i, j: (op, box.pods[i].volume_id, str(box.pods[j].target), i),
        verb,
        index,
        index,
    )
    anything = st.tuples(verb, id_strategy(box), path_strategy(box), index)
    ops = st.lists(st.one_of(coherent, mismatched, anything), min_size=1, max_size=8)
    examples = {"count": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(ops)
    def run(sequence: list[tuple[str, str, str, int]]) -> None:
        examples["count"] += 1
        for op, volume_id, target, pod_index in sequence:
            before = tree(box.root, running.config.data_root)
            request(box, op, volume_id, target, pod_index)
            check_invariants(box, before)

    run()
    # Valid requests were part of the mix, not only refusals.
    print(f"\nhypothesis: {examples['count']} examples, {box.requests} requests, {box.answers}")
    assert box.answers.get("OK", 0) > 0 and box.answers.get("INVALID_ARGUMENT", 0) > 0
