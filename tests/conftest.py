"""Shared fixtures: a real agent (in-process or as a process) on a real UNIX socket.

As root the whole session runs in a private mount namespace of its own (entered before any
thread exists), so no agent bug can reach the machine's mounts: see enter_private_mount_namespace.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.client import (
    CSIClient,
    PodIdentity,
    kubelet_volume_id,
    pod_volume_context,
    publish_request,
)
from agent.config import AgentConfig
from agent.csi import csi_pb2
from agent.volumes.mounter import mount_points_below
from tests.crds import CRDS_DIR_SETTING, upstream_crds_dir
from tests.fakekube import FakeKube, FakeSigner
from tests.path_guard import OutsideOpens

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0


CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


def enter_private_mount_namespace() -> None:
    """unshare(CLONE_NEWNS) and make every mount private: the agents under test (in-process and
    their child processes) then mount and unmount in a copy of the mount table that nothing
    propagates out of. Must run before the process has a second thread (unshare refuses then).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise RuntimeError(f"cannot enter a private mount namespace: {os.strerror(err)}")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise RuntimeError(f"cannot make / rprivate: {os.strerror(err)}")


def pytest_configure(config: pytest.Config) -> None:
    if IS_ROOT and os.environ.get("CERT_AGENT_TEST_MOUNT_NS") != str(os.getpid()):
        enter_private_mount_namespace()
        os.environ["CERT_AGENT_TEST_MOUNT_NS"] = str(os.getpid())


def kubelet_target(kubelet_root: Path, pod_uid: str, volume_name: str = "tls") -> Path:
    """Where kubelet puts an inline CSI volume's target_path."""
    return kubelet_root / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / volume_name / "mount"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unmount_below(root: Path) -> None:
    """Unmount everything mounted at or below root, deepest first (test cleanup)."""
    if not IS_ROOT:
        return
    for point in mount_points_below(root):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def make_config(tmp: Path, **overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "endpoint": f"unix://{tmp}/csi/csi.sock",
        "node_id": "node-1",
        "driver_name": "csi.cert-agent.io",
        "data_root": tmp / "data",
        "metrics_address": "127.0.0.1:0",
        "ca_cert_file": None,
        "ca_key_file": None,
        "ca_dir": None,
        "ca_secret": None,
        "max_duration_seconds": 2160 * 3600,
        "allow_ca": False,
        "allowed_namespaces": None,
        "standalone": True,
        "kubeconfig": None,
        "kube_qps": 20.0,
        "kube_burst": 40,
        "issue_timeout_seconds": 10.0,
        "renewal_workers": 2,
        "grpc_workers": 8,
        "tmpfs_size_bytes": 16 * 1024 * 1024,
        "log_level": "info",
        "log_format": "json",
        # Tests watch certificates that live for seconds: the test-only floors (production:
        # --min-duration 1h, --min-renewal-interval 30s; tests of those pass them explicitly).
        "min_duration_seconds": 1,
        "min_renewal_interval_seconds": 0.5,
        "kubelet_root": tmp / "kubelet",
    }
    values.update(overrides)
    return AgentConfig(**values)  # type: ignore[arg-type]


@dataclass
class Pod:
    """A pod as kubelet sees it: identity, volume id and the target path kubelet would use."""

    kubelet_root: Path
    name: str
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    service_account: str = "default"
    volume_name: str = "tls"

    @property
    def identity(self) -> PodIdentity:
        return PodIdentity(self.name, self.namespace, self.uid, self.service_account)

    @property
    def volume_id(self) -> str:
        return kubelet_volume_id(self.uid, self.volume_name)

    @property
    def target(self) -> Path:
        return kubelet_target(self.kubelet_root, self.uid, self.volume_name)

    def request(
        self, attributes: dict[str, str], fs_group: int | None = None, readonly: bool = True
    ) -> csi_pb2.NodePublishVolumeRequest:
        # kubelet creates the parent of target_path; the plugin creates target_path itself.
        self.target.parent.mkdir(parents=True, exist_ok=True)
        return publish_request(
            volume_id=self.volume_id,
            target_path=str(self.target),
            volume_context=pod_volume_context(self.identity, attributes),
            fs_group=fs_group,
            readonly=readonly,
        )


class RunningAgent:
    """An Agent started in this process, with a real gRPC client on its socket."""

    def __init__(
        self,
        tmp: Path,
        clock: Callable[[], float] | None = None,
        mounter: object = None,
        wait_recovered: bool = True,
        **overrides: object,
    ) -> None:
        from agent.server import Agent

        self.tmp = tmp
        self.config = make_config(tmp, **overrides)
        self.agent = Agent(
            self.config,
            clock=clock or time.time,
            mounter=mounter,  # type: ignore[arg-type]
        )
        self.agent.start()
        # The agent serves while it recovers volumes in the background; tests look at the
        # recovered state right away, so they wait for it (tests of that overlap don't).
        if wait_recovered:
            self.agent.wait_recovered(30)
        self.client = CSIClient(self.config.endpoint, timeout=30)

    @property
    def metrics_url(self) -> str:
        assert self.agent.health is not None
        return f"http://127.0.0.1:{self.agent.health.port}"

    def pod(self, name: str, **kwargs: object) -> Pod:
        return Pod(self.tmp / "kubelet", name, **kwargs)  # type: ignore[arg-type]

    def publish(self, pod: Pod, attributes: dict[str, str], **kwargs: object) -> Path:
        self.client.publish(pod.request(attributes, **kwargs))  # type: ignore[arg-type]
        return pod.target

    def stop(self) -> None:
        self.client.close()
        self.agent.stop(grace=1)


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[type[RunningAgent] | object]:
    started: list[RunningAgent] = []

    def start(**overrides: object) -> RunningAgent:
        running = RunningAgent(tmp_path, **overrides)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()
        unmount_below(tmp_path)


@pytest.fixture
def agent(agent_factory: object) -> RunningAgent:
    return agent_factory()  # type: ignore[operator, no-any-return]


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    """An in-process Kubernetes API server speaking the real REST protocol."""
    with FakeKube() as server:
        yield server


@pytest.fixture
def signer(fake: FakeKube) -> Iterator[FakeSigner]:
    """cert-manager's approver and CA issuer, answering the fake API server's requests."""
    running = FakeSigner(fake).start()
    yield running
    running.stop()


class AgentProcess:
    """`cert-agent serve` as a real process (for restart tests and the CLI)."""

    def __init__(self, tmp: Path, *extra: str, metrics_port: int | None = None) -> None:
        self.tmp = tmp
        self.endpoint = f"unix://{tmp}/csi/csi.sock"
        self.metrics_port = metrics_port or free_port()
        self.log_path = tmp / f"agent-{time.monotonic_ns()}.log"
        self.args = [
            sys.executable,
            "-m",
            "agent.cli",
            "serve",
            "--standalone",
            "--endpoint",
            self.endpoint,
            "--data-root",
            str(tmp / "data"),
            "--node-id",
            "node-1",
            "--metrics-address",
            f"127.0.0.1:{self.metrics_port}",
            "--log-format",
            "json",
            # Certificates that live for seconds (see make_config).
            "--min-duration",
            "1s",
            "--min-renewal-interval",
            "500ms",
            "--kubelet-root",
            str(tmp / "kubelet"),
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> AgentProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the process owns it until stop()
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited: {self.log_path.read_text()}")
            try:
                with CSIClient(self.endpoint, timeout=1) as client:
                    client.plugin_info()
                self.wait_recovered(max(1.0, deadline - time.monotonic()))
                return self
            except grpc.RpcError:
                time.sleep(0.1)
        raise RuntimeError(f"agent did not start: {self.log_path.read_text()}")

    def wait_recovered(self, timeout: float) -> None:
        """Until the agent logs that its start-up recovery is done (it serves before that)."""
        deadline = time.monotonic() + timeout
        while b'"volumes recovered"' not in self.log_path.read_bytes():
            if time.monotonic() > deadline or (self.process and self.process.poll() is not None):
                raise RuntimeError(f"agent did not recover: {self.log_path.read_text()}")
            time.sleep(0.01)

    def stop(self) -> str:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[object]:
    processes: list[AgentProcess] = []

    def start(*extra: str, **kwargs: object) -> AgentProcess:
        process = AgentProcess(tmp_path, *extra, **kwargs)  # type: ignore[arg-type]
        processes.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in processes:
            process.stop()
        unmount_below(tmp_path)


class FakeClock:
    """Wall-clock seconds that move only when a test says so (thread-safe)."""

    def __init__(self, start: float | None = None) -> None:
        import threading

        self._lock = threading.Lock()
        self._now = time.time() if start is None else start

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def set(self, when: float) -> None:
        with self._lock:
            self._now = when

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll until ``predicate()`` holds; ``timeout`` only bounds a failing test, never a pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def openssl(*args: str, input: bytes | None = None) -> str:
    result = subprocess.run(["openssl", *args], input=input, capture_output=True)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed: {result.stderr.decode()}")
    return result.stdout.decode()


NODE_AGENT_POLICY = """\
rules:
  - name: pod-ips
    namespaces: ["*"]
    dns-names: ["**"]
    ip-sans: ["pod-ips", "127.0.0.0/8"]
    subject: {common-name: ["**"]}
"""


@pytest.fixture
def node_agent(
    fake: FakeKube, tmp_path: Path, agent_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Start an in-process agent in cluster mode against the fake API server (node-1, with a
    local CA from a Secret); keyword arguments override AgentConfig fields."""
    from cryptography.hazmat.primitives import serialization

    from tests.fakekube import make_test_ca, pem

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    key, cert = make_test_ca("node local CA")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fake.put_secret("cert-agent", "cert-agent-ca", {"ca.crt": pem(cert), "ca.key": key_pem})
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    # ${POD_IP}/${POD_IPS} need an issuance policy that allows the pod's own addresses (the
    # built-in default allows no IP SANs); these tests are about pod IPs and bundles, not names.
    policy = tmp_path / "node-agent-policy.yaml"
    policy.write_text(NODE_AGENT_POLICY)

    def start(**overrides: object) -> RunningAgent:
        values: dict[str, object] = {
            "standalone": False,
            "kubeconfig": str(kubeconfig),
            "ca_secret": ("cert-agent", "cert-agent-ca"),
            "issue_timeout_seconds": 5.0,
            "policy_file": policy,
        }
        values.update(overrides)
        return agent_factory(**values)  # type: ignore[no-any-return, operator]

    return start


# ------------------------------------------------------------------------- CI: no silent skips

_skipped: list[str] = []
_not_run: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The checks against the full upstream CRDs exist only when CERT_AGENT_CRDS_DIR names them.

    Without the setting they are deselected, not skipped: a clone without the upstream files is
    complete (its own schema subset is tested), so CI's no-skip rule must not count them.
    """
    if upstream_crds_dir() is not None:
        return
    upstream = [item for item in items if item.get_closest_marker("upstream_crds")]
    if not upstream:
        return
    config.hook.pytest_deselected(items=upstream)
    items[:] = [item for item in items if not item.get_closest_marker("upstream_crds")]
    _not_run.append(
        f"{len(upstream)} check(s) against the full upstream CRDs not run: {CRDS_DIR_SETTING} is "
        "not set (point it at a directory holding them; .ci/run does when CI lays them beside "
        "the checkout)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _not_run:
        terminalreporter.write_line(line)


# ------------------------------------------------------------- nothing read beside the repository

OUTSIDE_OPENS: OutsideOpens | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Watch every open of this process for paths beside the repository (tests/path_guard.py)."""
    global OUTSIDE_OPENS
    factory = getattr(session.config, "_tmp_path_factory", None)
    own = [Path(factory.getbasetemp()).resolve()] if factory is not None else []
    upstream = upstream_crds_dir()
    OUTSIDE_OPENS = OutsideOpens(REPO, allowed=[upstream] if upstream else [], own=own)
    sys.addaudithook(OUTSIDE_OPENS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (root, every tool installed) a skipped test means a check silently did not run."""
    if OUTSIDE_OPENS is not None and OUTSIDE_OPENS.seen and session.exitstatus == 0:
        print(
            f"\nThe tests opened {len(OUTSIDE_OPENS.seen)} path(s) beside the repository "
            f"(only {CRDS_DIR_SETTING} may point outside it):"
        )
        for line in OUTSIDE_OPENS.seen[:20]:
            print(f"  {line}")
        session.exitstatus = 1
    if os.environ.get("CERT_AGENT_FAIL_ON_SKIP") == "1" and _skipped and exitstatus == 0:
        print(f"\n{len(_skipped)} test(s) skipped while CERT_AGENT_FAIL_ON_SKIP=1:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = 1
