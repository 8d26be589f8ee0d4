"""Starting and stopping `cert-agent serve` as a real process: one clear line for every start-up
failure with nothing left behind, a live agent's socket never taken over, readiness that follows
the CSI socket, and SIGTERM honoured in every phase (also while the API server does not answer).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.client import CSIClient
from agent.volumes.mounter import mount_points_below
from tests.conftest import IS_ROOT, REPO, AgentProcess, RunningAgent, free_port, unmount_below
from tests.fakekube import FakeKube

# The cluster-mode agent mounts its tmpfs, and the clean-up checks are about mounts.
pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")

# Generous bounds for the process to do what it must; the assertions are on the outcome.
EXIT_TIMEOUT = 30.0


def serve_args(tmp: Path, *extra: str, standalone: bool = True) -> list[str]:
    args = [sys.executable, "-m", "agent.cli", "serve"]
    if standalone:
        args.append("--standalone")
    args += [
        "--endpoint",
        f"unix://{tmp}/csi/csi.sock",
        "--data-root",
        str(tmp / "data"),
        "--node-id",
        "node-1",
        "--metrics-address",
        f"127.0.0.1:{free_port()}",
        "--log-format",
        "json",
        "--kubelet-root",
        str(tmp / "kubelet"),
        *extra,
    ]
    return args


def run_to_exit(args: list[str]) -> tuple[int, list[str]]:
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=EXIT_TIMEOUT)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def records(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines]


def assert_one_clear_error(lines: list[str], *fragments: str) -> str:
    """Exactly one error line (JSON, so no traceback lines), naming what failed."""
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    errors = [r for r in records(lines) if r["level"] in ("error", "critical")]
    assert len(errors) == 1, "\n".join(lines)
    message = str(errors[0]["msg"])
    assert message.startswith("cannot start: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert "exc_info" not in errors[0] and "traceback" not in errors[0]
    return message


def assert_nothing_left(tmp: Path, data_root: Path | None = None) -> None:
    data_root = data_root or tmp / "data"
    assert mount_points_below(data_root) == [], "a tmpfs was left mounted"
    assert not (tmp / "csi" / "csi.sock").exists(), "a socket was left behind"


@pytest.fixture
def clean_tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    unmount_below(tmp_path)


# ------------------------------------------------------------------------ the CSI endpoint


def test_second_agent_leaves_a_live_agents_socket_alone(
    agent_process: object, clean_tmp: Path
) -> None:
    first: AgentProcess = agent_process()  # type: ignore[operator]
    socket_path = clean_tmp / "csi" / "csi.sock"
    inode = socket_path.stat().st_ino

    second = clean_tmp / "second"
    args = serve_args(clean_tmp, "--data-root", str(second / "data"))
    code, lines = run_to_exit(args)

    assert code == 1
    message = assert_one_clear_error(lines, "another agent is serving on", str(socket_path))
    assert "left alone" in message
    assert socket_path.stat().st_ino == inode, "the live agent's socket was replaced"
    with CSIClient(first.endpoint, timeout=5) as client:
        assert client.plugin_info().name == "csi.cert-agent.io"
    # The second agent stopped before touching anything: no tmpfs of its own.
    assert mount_points_below(second) == []


def test_stale_socket_of_a_crashed_agent_is_replaced(agent_process: object, tmp_path: Path) -> None:
    socket_path = tmp_path / "csi" / "csi.sock"
    socket_path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(socket_path))  # bound, never listening: what a killed process leaves
    stale.close()
    agent: AgentProcess = agent_process()  # type: ignore[operator]
    with CSIClient(agent.endpoint, timeout=5) as client:
        assert client.plugin_info().name == "csi.cert-agent.io"


def test_a_file_that_is_not_a_socket_is_not_removed(clean_tmp: Path) -> None:
    path = clean_tmp / "csi" / "csi.sock"
    path.parent.mkdir()
    path.write_text("not a socket")
    code, lines = run_to_exit(serve_args(clean_tmp))
    assert code == 1
    assert_one_clear_error(lines, str(path), "is not a socket")
    assert path.read_text() == "not a socket"
    assert mount_points_below(clean_tmp / "data") == []


# ----------------------------------------------------------------- start-up failures in general


def test_busy_metrics_address_is_one_line_and_leaves_nothing(clean_tmp: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = serve_args(clean_tmp, "--metrics-address", f"127.0.0.1:{port}")
        code, lines = run_to_exit(args)
    assert code == 1
    assert_one_clear_error(lines, f"--metrics-address 127.0.0.1:{port}", "in use")
    assert_nothing_left(clean_tmp)


def test_failure_after_the_tmpfs_is_mounted_unmounts_it(clean_tmp: Path) -> None:
    # The CA is read after the payload tmpfs is mounted: its failure must take the tmpfs away.
    ca_dir = clean_tmp / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca.crt").write_text("not a certificate")
    (ca_dir / "ca.key").write_text("not a key")
    code, lines = run_to_exit(serve_args(clean_tmp, "--ca-dir", str(ca_dir)))
    assert code == 1
    assert_one_clear_error(lines, str(ca_dir))
    assert_nothing_left(clean_tmp)
    assert (clean_tmp / "data" / "volumes").is_dir()  # the empty mount point may stay


def test_unreachable_api_without_retry_budget_is_one_line(clean_tmp: Path) -> None:
    kubeconfig = clean_tmp / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    args = serve_args(
        clean_tmp, "--kubeconfig", str(kubeconfig), "--ca-secret", "ns/ca", standalone=False
    )
    code, lines = run_to_exit(args)
    assert code == 1
    assert_one_clear_error(lines, "Kubernetes client configuration")
    assert_nothing_left(clean_tmp)


# ----------------------------------------------------------------------------------- readiness


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_readyz_fails_once_the_csi_socket_is_removed(agent: RunningAgent) -> None:
    assert http_get(agent.metrics_url + "/readyz") == (200, "ok\n")
    agent.config.socket_path.unlink()
    status, body = http_get(agent.metrics_url + "/readyz")
    assert status == 503
    assert f"the CSI socket {agent.config.socket_path} was removed" in body
    assert http_get(agent.metrics_url + "/healthz")[0] == 200  # alive, not ready


def test_probe_over_a_live_connection_still_sees_the_socket_file_go(agent: RunningAgent) -> None:
    """The CSI Probe skips the connect /readyz makes (the Probe came over the socket), but the
    socket file removed or replaced under a connection kubelet still holds is still reported."""
    from agent.csi import csi_pb2

    identity = agent.client.identity
    assert identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value is True
    path = agent.config.socket_path
    path.unlink()
    with pytest.raises(grpc.RpcError) as removed:
        identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    assert removed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "was removed" in (removed.value.details() or "")
    impostor = socket.socket(socket.AF_UNIX)
    impostor.bind(str(path))
    try:
        with pytest.raises(grpc.RpcError) as replaced:
            identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    finally:
        impostor.close()
    assert "was replaced by another file" in (replaced.value.details() or "")


def test_readyz_fails_when_another_file_takes_the_sockets_place(agent: RunningAgent) -> None:
    path = agent.config.socket_path
    path.unlink()
    impostor = socket.socket(socket.AF_UNIX)
    impostor.bind(str(path))
    impostor.listen()
    try:
        status, body = http_get(agent.metrics_url + "/readyz")
    finally:
        impostor.close()
    assert status == 503 and "was replaced by another file" in body


# ------------------------------------------------------------------------------------ SIGTERM


class ServeProcess:
    """`cert-agent serve` whose log we follow line by line while it starts."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def wait_for_log(self, message: str) -> None:
        deadline = time.monotonic() + EXIT_TIMEOUT
        while time.monotonic() < deadline:
            if any(json.loads(line).get("msg") == message for line in self.lines()):
                return
            assert self.process.poll() is None, "\n".join(self.lines())
            time.sleep(0.05)
        raise AssertionError(f"no {message!r} in:\n" + "\n".join(self.lines()))

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the process took to exit (for the report)."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(EXIT_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return code, time.monotonic() - sent


def assert_clean_stop_during_startup(process: ServeProcess, tmp: Path) -> None:
    code, seconds = process.terminate()
    lines = process.lines()
    print(f"SIGTERM during start-up: exit {code} after {seconds:.3f}s")
    assert code == 0, "\n".join(lines)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    messages = [r["msg"] for r in records(lines)]
    assert "received SIGTERM during start-up, stopping" in messages
    assert messages[-1] == "agent stopped"
    assert not any(r["level"] == "error" for r in records(lines)), "\n".join(lines)
    assert_nothing_left(tmp)


def cluster_args(tmp: Path, kubeconfig: Path) -> list[str]:
    return serve_args(
        tmp, "--kubeconfig", str(kubeconfig), "--ca-secret", "cert-agent/ca", standalone=False
    )


def test_sigterm_while_the_api_server_is_unreachable(clean_tmp: Path) -> None:
    with FakeKube() as fake:
        kubeconfig = fake.write_kubeconfig(clean_tmp / "kubeconfig")
    # The fake has stopped: its port now refuses connections, and the agent backs off.
    process = ServeProcess(cluster_args(clean_tmp, kubeconfig), clean_tmp / "agent.log")
    process.wait_for_log("Kubernetes API call failed, retrying")
    assert_clean_stop_during_startup(process, clean_tmp)


def test_sigterm_while_the_ca_secret_read_hangs(fake: FakeKube, clean_tmp: Path) -> None:
    fake.hang("/secrets")
    kubeconfig = fake.write_kubeconfig(clean_tmp / "kubeconfig")
    port = free_port()
    args = [*cluster_args(clean_tmp, kubeconfig), "--metrics-address", f"127.0.0.1:{port}"]
    process = ServeProcess(args, clean_tmp / "agent.log")
    try:
        # The agent is blocked reading the CA Secret from an API server that never answers.
        fake.wait_until(lambda: fake.count("GET", "/secrets/ca") == 1, timeout=EXIT_TIMEOUT)
        # Meanwhile the HTTP endpoint is up and says so: not alive yet (the startup probe
        # allows for it, and restarts a start that never ends), not ready.
        assert http_get(f"http://127.0.0.1:{port}/healthz") == (503, "starting\n")
        assert http_get(f"http://127.0.0.1:{port}/readyz") == (503, "starting\n")
        assert_clean_stop_during_startup(process, clean_tmp)
    finally:
        fake.release_hung()


def test_sigterm_while_serving_exits_zero(agent_process: object, tmp_path: Path) -> None:
    agent: AgentProcess = agent_process()  # type: ignore[operator]
    assert agent.process is not None
    sent = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    code = agent.process.wait(EXIT_TIMEOUT)
    print(f"SIGTERM while serving: exit {code} after {time.monotonic() - sent:.3f}s")
    log = agent.log_path.read_text()
    assert code == 0 and "Traceback" not in log
    messages = [r["msg"] for r in records(log.splitlines())]
    assert "received SIGTERM, stopping" in messages and messages[-1] == "agent stopped"
    # gRPC removes its socket on the way out, so a restart starts clean.
    assert not (tmp_path / "csi" / "csi.sock").exists()
    with pytest.raises(grpc.RpcError), CSIClient(agent.endpoint, timeout=1) as client:
        client.plugin_info()


def test_sigterm_while_a_publish_waits_for_cert_manager(
    fake: FakeKube, clean_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_cluster_mode import CA_SECRET, SEED_ATTRIBUTES, ca_secret_data

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake.put_secret(*CA_SECRET, ca_secret_data("lifecycle CA")[0])
    kubeconfig = fake.write_kubeconfig(clean_tmp / "kubeconfig")
    args = serve_args(
        clean_tmp,
        "--kubeconfig",
        str(kubeconfig),
        "--ca-secret",
        "/".join(CA_SECRET),
        "--issue-timeout",
        "10m",  # nobody approves the request: the publish waits as long as it may
        standalone=False,
    )
    process = ServeProcess(args, clean_tmp / "agent.log")
    process.wait_for_log("agent serving")
    target = clean_tmp / "kubelet" / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / "tls"
    publish = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "publish",
            "--endpoint",
            f"unix://{clean_tmp}/csi/csi.sock",
        ]
        + ["--target", str(target / "mount"), "--pod-name", "es-0", "--pod-namespace", "elastic"]
        + [f"--attr={key}={value}" for key, value in SEED_ATTRIBUTES.items()],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        fake.wait_until(lambda: len(fake.list_crs("elastic")) == 1, timeout=EXIT_TIMEOUT)
        code, seconds = process.terminate()
    finally:
        publish.kill()
        publish.wait()
    lines = process.lines()
    print(f"SIGTERM with a publish in flight: exit {code} after {seconds:.3f}s")
    assert code == 0, "\n".join(lines)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    messages = [r["msg"] for r in records(lines)]
    assert "received SIGTERM, stopping" in messages and messages[-1] == "agent stopped"


# ------------------------------------------------------------------- --allow-ca needs room


def test_allow_ca_with_the_standalone_ca_is_refused_before_anything_happens(
    clean_tmp: Path,
) -> None:
    code, lines = run_to_exit(serve_args(clean_tmp, "--allow-ca"))
    assert code == 2
    (line,) = lines
    assert line.startswith("cert-agent: --allow-ca does not work with the self-signed CA of ")
    assert "pathLenConstraint 0" in line
    assert not (clean_tmp / "data").exists()


def test_allow_ca_with_a_ca_that_may_not_sign_cas_is_one_line(clean_tmp: Path) -> None:
    from agent.pki.ca import ensure_self_signed_ca

    ensure_self_signed_ca(clean_tmp / "limited", common_name="limited CA")  # pathlen 0
    ca = ["--ca-cert-file", str(clean_tmp / "limited" / "ca.crt")]
    ca += ["--ca-key-file", str(clean_tmp / "limited" / "ca.key")]
    code, lines = run_to_exit(serve_args(clean_tmp, "--allow-ca", *ca))
    assert code == 1
    assert_one_clear_error(lines, "--allow-ca: the pathLenConstraint 0 of CN=limited CA")
    assert_nothing_left(clean_tmp)


def test_allow_ca_with_a_ca_that_may_sign_cas_issues_a_verifiable_ca(
    agent_factory: object, tmp_path: Path
) -> None:
    from tests.conftest import openssl
    from tests.test_local_issuer import make_openssl_ca

    root_crt, root_key, _, _ = make_openssl_ca(tmp_path)  # a root without pathlen
    # A CA certificate needs --allow-ca and an issuance policy rule that allows it.
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "rules:\n  - name: team-ca\n    namespaces: ['default']\n    is-ca: true\n"
        "    subject: {common-name: ['team CA']}\n"
    )
    agent = agent_factory(  # type: ignore[operator]
        allow_ca=True, ca_cert_file=root_crt, ca_key_file=root_key, policy_file=policy
    )
    attributes = {"csi.cert-agent.io/common-name": "team CA", "csi.cert-agent.io/is-ca": "true"}
    attributes["csi.cert-agent.io/key-usages"] = "cert sign,crl sign"
    volume = agent.publish(agent.pod("ca-0"), attributes)
    crt = str(volume / "tls.crt")
    assert openssl("verify", "-CAfile", str(volume / "ca.crt"), "-untrusted", crt, crt)
    assert "CA:TRUE, pathlen:0" in openssl("x509", "-in", crt, "-noout", "-text")
