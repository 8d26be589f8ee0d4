"""What `cert-agent serve` imports in each mode: the measurement behind the image's contents.

    unshare --mount --propagation private .venv/bin/python -m tests.image_imports \
        --python /tmp/rt/bin/python          # a venv with only the runtime dependencies
    .venv/bin/python -m tests.image_imports --image cert-agent:dev     # in the built image

Runs the real agent as its own process (``python -X importtime -m agent.cli serve``) in each mode
against the in-process fake API server, makes it do its mode's work once (publish a volume; for
cert-manager a CertificateRequest the fake signer answers; for PCR a PodCertificateRequest it
signs), stops it with SIGTERM, and reads every module it imported from the importtime lines. It
then maps the modules to the installed distributions and prints, per mode, the third-party
distributions imported, and the runtime dependencies (pyproject's and their whole tree) that no
mode imported. docs/image.md records the result; the Dockerfile ships the tree pip resolves, so a
dependency imported by none of the modes is a candidate to drop from pyproject.

With ``--image`` the agent runs in the image (``docker run``, host network, the temp dir
bind-mounted at its own path and shared, so the agent's mounts reach this process): every mode
works in the image as built, sourceless bytecode included. Root; without ``--image`` in a private
mount namespace (publishing mounts a tmpfs and bind mounts, under a temp dir).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from agent.client import (
    CSIClient,
    PodIdentity,
    kubelet_volume_id,
    pod_volume_context,
    publish_request,
)
from tests.fake_pcr import PCRS, condition, install, pcr_body
from tests.fakekube import FakeKube, FakeSigner, make_test_ca, pem

REPO = Path(__file__).resolve().parent.parent
NODE = "node-1"
SIGNER = "cert-agent.io/pod-identity"
DNS = {"csi.cert-agent.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local"}
CERT_MANAGER = {
    "csi.cert-manager.io/issuer-name": "ca-issuer",
    "csi.cert-manager.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
}
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|( *)(\S+)$")


@dataclass
class Mode:
    name: str
    args: list[str]
    # Runs once the agent serves: does the mode's work through the agent, raises if it fails.
    work: Callable[[Run], None]
    cluster: bool = True


@dataclass
class Run:
    tmp: Path
    fake: FakeKube
    client: CSIClient

    def publish(self, pod_name: str, attributes: dict[str, str]) -> None:
        pod = self.fake.put_pod("apps", pod_name, NODE)
        uid = pod["metadata"]["uid"]
        target = self.tmp / "kubelet/pods" / uid / "volumes/kubernetes.io~csi/tls/mount"
        target.parent.mkdir(parents=True)  # kubelet makes the volume's directory
        identity = PodIdentity(name=pod_name, namespace="apps", uid=uid)
        self.client.publish(
            publish_request(
                volume_id=kubelet_volume_id(uid, "tls"),
                target_path=str(target),
                volume_context=pod_volume_context(identity, attributes),
            )
        )
        if not (target / "tls.crt").is_file():
            raise RuntimeError(f"{pod_name}: published, but no tls.crt in {target}")


def _pcr_signed(run: Run) -> None:
    pod = run.fake.put_pod("apps", "pcr-0", NODE)
    body = pcr_body(name="pcr-0-pcr", pod=pod, signer=SIGNER).body
    run.fake.create(PCRS, "apps", body)

    def issued() -> bool:
        found = condition(run.fake.get(PCRS, "apps", "pcr-0-pcr"))
        return found is not None and found["type"] == "Issued"

    run.fake.wait_until(issued, 60)


MODES = [
    Mode("standalone", ["--standalone"], lambda run: run.publish("web-0", DNS), cluster=False),
    Mode("secret-ca", ["--ca-secret", "cert-agent/cert-agent-ca"], lambda r: r.publish("s-0", DNS)),
    Mode(
        "cert-manager",
        ["--ca-secret", "cert-agent/cert-agent-ca"],
        lambda run: run.publish("cm-0", CERT_MANAGER),
    ),
    Mode(
        "node-ca",
        [
            "--node-ca-issuer-name=ca-cluster-issuer",
            "--node-ca-issuer-kind=ClusterIssuer",
            "--node-ca-namespace=cert-agent",
            "--node-ca-permitted-dns=svc.cluster.local",
            "--pod-name=cert-agent-x",
            "--pod-namespace=cert-agent",
            "--pod-uid=0b6a2c1e-0000-4000-8000-000000000001",
        ],
        lambda run: run.publish("n-0", DNS),
    ),
    Mode(
        "pcr",
        ["--ca-secret", "cert-agent/cert-agent-ca", f"--pcr-signer-name={SIGNER}"],
        _pcr_signed,
    ),
]


def imported_modules(stderr: str) -> set[str]:
    """Every module named in ``-X importtime`` output."""
    return {m.group(2) for line in stderr.splitlines() if (m := _IMPORT_LINE.match(line))}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def _unmounted_after(root: Path) -> Iterator[None]:
    """Mounts outlive the agent on purpose (pods keep their files): detach ours below ``root``."""
    try:
        yield
    finally:
        prefix = str(root) + "/"
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
        mine = [p for p in points if p.startswith(prefix) or p == str(root)]
        for point in sorted(mine, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


class Runner:
    """Runs the agent's interpreter on this machine (``python``: a path)."""

    def __init__(self, python: str) -> None:
        self.python = python

    def command(self, tmp: Path) -> list[str]:
        return [self.python]

    @contextlib.contextmanager
    def prepared(self, tmp: Path) -> Iterator[None]:
        yield


class ImageRunner(Runner):
    """Runs the image's interpreter: ``docker run`` with the host network and ``tmp`` shared."""

    def __init__(self, image: str) -> None:
        super().__init__("python3")
        self.image = image
        # The DaemonSet runs it privileged; a sandboxed host may lack a capability that asks for
        # (runc: "unable to apply caps"), then mount(2) is what the agent needs.
        probe = ["docker", "run", "--rm", "--privileged", "--entrypoint", "true", image]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            self.privilege = ["--privileged"]
        else:
            self.privilege = ["--cap-add=SYS_ADMIN", "--security-opt=seccomp=unconfined"]
            self.privilege.append("--security-opt=apparmor=unconfined")

    def command(self, tmp: Path) -> list[str]:
        volume = f"type=bind,source={tmp},target={tmp},bind-propagation=rshared"
        return [
            *("docker", "run", "--rm", "--network=host", "--read-only", "--tmpfs=/tmp"),
            *self.privilege,
            *("--mount", volume, "--entrypoint", "python3", self.image),
        ]

    @contextlib.contextmanager
    def prepared(self, tmp: Path) -> Iterator[None]:
        # A shared mount, so that the agent's bind mounts in the container reach the host.
        subprocess.run(["mount", "--bind", str(tmp), str(tmp)], check=True)
        subprocess.run(["mount", "--make-shared", str(tmp)], check=True)
        yield


def run_mode(mode: Mode, tmp: Path, runner: Runner) -> set[str]:
    """The modules ``cert-agent serve`` imported while it started, did ``mode``'s work, stopped."""
    socket_path = tmp / "csi/csi.sock"
    (tmp / "csi").mkdir()
    args = [
        *runner.command(tmp),
        "-X",
        "importtime",
        "-m",
        "agent.cli",
        "serve",
        f"--endpoint=unix://{socket_path}",
        f"--data-root={tmp / 'data'}",
        f"--kubelet-root={tmp / 'kubelet'}",
        f"--node-id={NODE}",
        f"--metrics-address=127.0.0.1:{_free_port()}",
        "--log-format=json",
        "--issue-timeout=30s",
        *mode.args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    with FakeKube() as fake:
        key, cert = make_test_ca("image-imports CA")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fake.put_secret("cert-agent", "cert-agent-ca", {"ca.crt": pem(cert), "ca.key": key_pem})
        install(fake)
        signer = FakeSigner(fake).start()
        if mode.cluster:
            args.append(f"--kubeconfig={fake.write_kubeconfig(tmp / 'kubeconfig')}")
        err_path = tmp / "agent.err"
        with open(err_path, "wb") as err:
            process = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=env
            )
        run = None
        try:
            with CSIClient(f"unix://{socket_path}", timeout=60) as client:
                _wait(lambda: socket_path.exists() or process.poll() is not None, "the socket")
                if process.poll() is not None:
                    raise RuntimeError(err_path.read_text()[-3000:])
                run = Run(tmp, fake, client)
                mode.work(run)
                process.send_signal(signal.SIGTERM)
                code = process.wait(60)
            if code != 0:
                raise RuntimeError(f"{mode.name}: exit {code}: {err_path.read_text()[-3000:]}")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            signer.stop()
        return imported_modules(err_path.read_text())


_INSTALLED = """
import importlib.metadata as md, json
print(json.dumps({
    "owners": md.packages_distributions(),
    "installed": sorted({d.metadata["Name"] for d in md.distributions()}),
}))
"""
# Not the agent's: the venv's own tools, and the agent itself.
_NOT_DEPENDENCIES = {"pip", "setuptools", "wheel", "csi-cert-agent"}


def installed(runner: Runner) -> tuple[dict[str, list[str]], set[str]]:
    """The top-level modules' owners and the distributions installed for the agent."""
    with tempfile.TemporaryDirectory(prefix="image-imports-") as name:
        tmp = Path(name)
        with _unmounted_after(tmp), runner.prepared(tmp):
            command = [*runner.command(tmp), "-I", "-c", _INSTALLED]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    owners = {k: sorted(set(v)) for k, v in data["owners"].items()}
    return owners, {d for d in data["installed"] if d.lower() not in _NOT_DEPENDENCIES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--mode", action="append", help="only these modes")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the agent's interpreter: a venv with only the runtime dependencies, as in the image "
        "(a dev venv also imports optional extras it finds: grpc_tools, kubernetes_validate)",
    )
    parser.add_argument("--image", help="run the agent in this image (docker run)")
    options = parser.parse_args()
    runner = ImageRunner(options.image) if options.image else Runner(options.python)
    owners, tree = installed(runner)
    result: dict[str, list[str]] = {}
    outside: set[str] = set()
    for mode in MODES:
        if options.mode and mode.name not in options.mode:
            continue
        prefix = f"image-imports-{mode.name}-"
        with (
            tempfile.TemporaryDirectory(prefix=prefix) as tmp,
            _unmounted_after(Path(tmp)),
            runner.prepared(Path(tmp)),
        ):
            modules = run_mode(mode, Path(tmp), runner)
        dists: set[str] = set()
        for top in {m.split(".")[0] for m in modules}:
            found = [d for d in owners.get(top, []) if d in tree]
            dists.update(found)
            # Third-party, yet not in the runtime tree: the image would lack it (a dev venv's
            # .pth hooks such as setuptools' _distutils_hack aside, which the image has not).
            theirs = {o.lower() for o in owners.get(top, [])}
            if not found and theirs - _NOT_DEPENDENCIES and top not in sys.stdlib_module_names:
                outside.add(f"{top} ({', '.join(owners[top])})")
        result[mode.name] = sorted(dists)
        print(f"{mode.name}: {len(modules)} modules; third-party: {', '.join(result[mode.name])}")
    used = {d for names in result.values() for d in names}
    unused = sorted(tree - used)
    print(f"installed for the agent ({len(tree)}), imported by no mode: {', '.join(unused)}")
    print(f"imported from outside the runtime tree: {', '.join(sorted(outside)) or 'nothing'}")
    if options.json:
        data = {
            "modes": result,
            "installed": sorted(tree),
            "never_imported": unused,
            "outside_tree": sorted(outside),
        }
        options.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
