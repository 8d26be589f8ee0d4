"""Work the publish path must not repeat: what each publish used to redo for nothing.

Performance itself is measured by `make bench`, never timed here; these tests pin the behaviour
that keeps the hot path short (each fails on the code before its change).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from agent.pki import ca as ca_module
from agent.pki.ca import ensure_self_signed_ca


def test_the_ca_works_out_its_intermediates_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every issuance asks for the chain; deciding which certificates are self-signed verifies a
    signature each time, so it is done once per CA object."""
    ca = ensure_self_signed_ca(tmp_path / "ca")
    calls: list[x509.Certificate] = []
    real = ca_module.is_self_signed

    def counting(cert: x509.Certificate) -> bool:
        calls.append(cert)
        return real(cert)

    monkeypatch.setattr(ca_module, "is_self_signed", counting)
    assert ca.intermediates() == []  # a self-signed root: nothing to send along
    first = len(calls)
    for _ in range(5):
        chain = ca.intermediates()
        chain.append(ca.certificate)  # a caller changing its copy changes nothing here
    assert ca.intermediates() == []
    assert len(calls) == first == 1


def test_the_agent_starts_without_importing_the_kubernetes_client() -> None:
    """Import time is a share of the time until `Probe` answers: the agent has its own small
    Kubernetes client (kube/rest.py; the `kubernetes` package took ~0.3 s to import), and a
    standalone or Secret-less agent does not load even that (nor urllib3): it is imported on
    use."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys, agent.cli, agent.server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'urllib3') "
        "or m == 'agent.kube.rest'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"


# Modules a standalone agent has no use for before its socket serves (each was imported by the
# start once, a share of the time until `Probe` answers): `uuid` (only `publish`/`policy check`
# make up UIDs; it pulls in `platform`), `ctypes.util` (its find_library ran ldconfig as a child
# process for every libc handle), the PodCertificateRequest signer's settings, the other modes'
# issuers and the Kubernetes client, the CLI's client side.
NOT_IMPORTED_BEFORE_SERVING = (
    "uuid",
    "ctypes.util",
    "kubernetes",
    "urllib3",
    "agent.spec.pcr",
    "agent.pki.pcr_leaf",
    "agent.issuers.pcr_service",
    "agent.issuers.certmanager",
    "agent.issuers.node_ca",
    "agent.issuers.secret_ca",
    "agent.kube.rest",
    "agent.kube.informer",
    "agent.client",
    "agent.status_view",
    "agent.demo",
)

_START_AND_LIST_MODULES = """
import json, sys
from agent.cli import build_parser
from agent.config import resolve
config = resolve(build_parser().parse_args(sys.argv[1:]))
from agent.server import Agent
agent = Agent(config)
agent.start()
loaded = sorted(sys.modules)
agent.stop()
print(json.dumps(loaded))
"""


def test_a_standalone_start_imports_only_what_serving_needs(tmp_path: Path) -> None:
    """A standalone agent started as deployed (settings from a --config file) until it serves,
    in its own process: the modules it loaded by then leave out every one above."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    args = _standalone_serve_args(tmp_path, "tmpfs-size: 16\ngrpc-workers: 8\n")
    result = subprocess.run(
        [sys.executable, "-c", _START_AND_LIST_MODULES, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert {"grpc", "agent.volumes.manager", "yaml"} <= loaded  # it did start, from the file
    heavy = {
        m for m in loaded if m in NOT_IMPORTED_BEFORE_SERVING or m.split(".")[0] == "kubernetes"
    }
    assert heavy == set()


_SERVE_AND_REPORT_COLLECTIONS = """
import gc, json, os, signal, sys, threading, time
socket_path = sys.argv[1]
seen = []  # per collection during main: the objects frozen by then
in_main = []
gc.callbacks.append(
    lambda phase, info: phase == "start" and in_main and seen.append(gc.get_freeze_count())
)

def report_once_serving():
    while not os.path.exists(socket_path):
        time.sleep(0.005)
    print(json.dumps({"collections": seen, "frozen": gc.get_freeze_count()}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report_once_serving, daemon=True).start()
from agent.cli import main
in_main.append(True)
main(sys.argv[2:])
"""


def test_the_start_runs_no_garbage_collection_while_its_modules_load(tmp_path: Path) -> None:
    """The modules a start imports make tens of thousands of objects that live as long as the
    process; the cyclic collector traversing them over and over while they load took ~8% of
    the time until the socket served. `cert-agent serve` pauses it until the agent's modules
    are in, freezes what they made, and collects as usual from then on."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    socket_path = tmp_path / "csi" / "csi.sock"
    args = _standalone_serve_args(tmp_path, "tmpfs-size: 16\n")
    result = subprocess.run(
        [sys.executable, "-c", _SERVE_AND_REPORT_COLLECTIONS, str(socket_path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert report["frozen"] > 20_000  # the imported modules' objects, frozen
    # Every collection from main's start until the socket was bound ran after the freeze, on
    # new objects only.
    assert [frozen for frozen in report["collections"] if frozen == 0] == []


def _standalone_serve_args(tmp_path: Path, config_text: str) -> list[str]:
    """`cert-agent serve --standalone` in ``tmp_path`` (socket csi/csi.sock), settings from a
    --config file as deployed."""
    from tests.conftest import free_port

    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    return [
        "serve",
        "--standalone",
        "--endpoint",
        f"unix://{tmp_path}/csi/csi.sock",
        "--data-root",
        str(tmp_path / "data"),
        "--kubelet-root",
        str(tmp_path / "kubelet"),
        "--node-id",
        "node-1",
        "--metrics-address",
        f"127.0.0.1:{free_port()}",
        "--config",
        str(config),
    ]
