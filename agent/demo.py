"""`make demo`: the product in one minute, on one machine, with nothing to set up.

Starts an agent with its own CA, publishes the three pods of an Elasticsearch-like StatefulSet
with certificates that live for seconds, shows them rotate (new serials, same file names, the
``..data`` link swapped atomically) and the metrics that tell it, then cleans everything up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cryptography import x509

from agent.pki.serials import format_serial

PODS = ("es-0", "es-1", "es-2")
NAMESPACE = "elastic"
ATTRIBUTES = {
    "dns-names": "${POD_NAME}.es-default.${POD_NAMESPACE}.svc.cluster.local",
    "other-names": "2.5.4.3=${POD_NAME}.node.es.${POD_NAMESPACE}.es.local",
    "key-usages": "digital signature,key encipherment,server auth,client auth",
    "key-algorithm": "ECDSA",
    "duration": "12s",
    "renew-before": "6s",
}
WATCH_SECONDS = 16
# The agent's issuance policy for the demo (docs/policy.md): the built-in default would refuse
# the Elasticsearch otherName, so this allows it, for namespace "elastic" only.
POLICY = """\
rules:
  - name: elasticsearch-transport
    namespaces: ["elastic"]
    dns-names: ["**.${POD_NAMESPACE}.svc", "**.${POD_NAMESPACE}.svc.${CLUSTER_DOMAIN}"]
    other-names:
      "2.5.4.3": ["${POD_NAME}.node.es.${POD_NAMESPACE}.es.local"]
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"cert-agent {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def verify_command(volume: Path) -> list[str]:
    """The documented check of a volume. ``-untrusted tls.crt`` lets openssl use the
    intermediates that follow the leaf in tls.crt (an intermediate CA as issuer), which
    ``-CAfile ca.crt tls.crt`` alone ignores."""
    crt = str(volume / "tls.crt")
    return ["openssl", "verify", "-CAfile", str(volume / "ca.crt"), "-untrusted", crt, crt]


def describe(target: Path) -> tuple[str, str]:
    """The certificate's serial (as openssl prints it) and the current ``..data`` generation."""
    cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
    return format_serial(cert.serial_number), os.readlink(target / "..data")


def metrics(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = (
        "cert_agent_managed_volumes",
        "cert_agent_certificate_expiry_timestamp_seconds{",
        "cert_agent_issue_attempts_total{",
    )
    refused = 'cert_agent_issue_failures_total{issuer="local",operation="issue",reason="policy"}'
    return [line for line in text.splitlines() if line.startswith((*wanted, refused))]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cert-agent-demo-"))
    endpoint = f"unix://{work}/csi.sock"
    port = free_port()
    (work / "policy.yaml").write_text(POLICY)
    say(f"1. Starting the agent (standalone, its own self-signed CA) in {work}")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "serve",
            "--standalone",
            "--endpoint",
            endpoint,
            "--data-root",
            str(work / "data"),
            "--node-id",
            "demo-node",
            "--metrics-address",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
            # Certificates that live for seconds: below the production floors (1h, 30s).
            "--min-duration",
            "10s",
            "--min-renewal-interval",
            "2s",
            "--kubelet-root",
            str(work / "kubelet"),
            "--policy",
            str(work / "policy.yaml"),
        ],
        stdout=open(work / "agent.log", "wb"),  # noqa: SIM115 - lives as long as the agent
        stderr=subprocess.STDOUT,
    )
    # Where kubelet puts each pod's volume (the agent accepts no other shape).
    targets = {
        pod: work / "kubelet" / "pods" / pod / "volumes" / "kubernetes.io~csi" / "tls" / "mount"
        for pod in PODS
    }
    try:
        _wait_for_socket(work / "csi.sock", agent, work / "agent.log")
        say(f"   serving on {endpoint}, metrics on http://127.0.0.1:{port}/metrics")
        say()
        say("2. kubelet mounts a csi volume into each pod of the StatefulSet 'es':")
        for key, value in ATTRIBUTES.items():
            say(f"     csi.cert-agent.io/{key}: {value}")
        for pod, target in targets.items():
            args = ["publish", "--endpoint", endpoint, "--target", str(target)]
            args += ["--pod-name", pod, "--pod-namespace", NAMESPACE]
            for key, value in ATTRIBUTES.items():
                args += ["--attr", f"{key}={value}"]
            cli(*args)
        say()
        for pod, target in targets.items():
            cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = ", ".join(sans.get_values_for_type(x509.DNSName))
            verify = subprocess.run(verify_command(target), capture_output=True, text=True)
            files = sorted(n for n in os.listdir(target) if not n.startswith(".."))
            say(f"   {pod}: {', '.join(files)}  serial {format_serial(cert.serial_number)}")
            say(f"         SAN {dns}; openssl verify: {verify.stdout.strip().split(': ')[-1]}")
        say()
        say("   A pod asking for a name outside its namespace gets nothing (the issuance policy):")
        denied = work / "kubelet" / "pods" / "intruder" / "volumes" / "kubernetes.io~csi" / "tls"
        denied = denied / "mount"
        args = ["publish", "--endpoint", endpoint, "--target", str(denied)]
        args += ["--pod-name", "intruder", "--pod-namespace", NAMESPACE]
        args += ["--attr", "dns-names=www.google.com"]
        refused = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args],
            capture_output=True,
            text=True,
        )
        say(f"   {refused.stderr.strip().removeprefix('cert-agent: ')}")
        say(f"   files left for it: {sorted(os.listdir(denied)) if denied.exists() else 'none'}")
        say()
        say(
            f"3. Watching for {WATCH_SECONDS}s: each certificate lives 12s and renews 6s "
            "before it expires"
        )
        last = {pod: describe(target) for pod, target in targets.items()}
        started = time.monotonic()
        while time.monotonic() - started < WATCH_SECONDS:
            time.sleep(0.2)
            for pod, target in targets.items():
                current = describe(target)
                if current[0] != last[pod][0]:
                    elapsed = time.monotonic() - started
                    say(
                        f"   +{elapsed:4.1f}s {pod} rotated: serial {last[pod][0]} -> "
                        f"{current[0]}; ..data -> {current[1]} (one atomic rename)"
                    )
                    last[pod] = current
        say()
        say("4. What Prometheus scrapes:")
        for line in metrics(port):
            say(f"   {line}")
        say()
        say("5. Cleaning up: kubelet unmounts the volumes, the agent stops")
        for target in targets.values():
            cli("unpublish", "--endpoint", endpoint, "--target", str(target))
            say(f"   {target.relative_to(work)} removed: {not target.exists()}")
        return 0
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        _unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
        say("   done.")


def _wait_for_socket(path: Path, agent: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise SystemExit(
                f"the agent exited with code {agent.returncode}; its log:\n{log_tail(log)}"
            )
        if path.exists():
            return
        time.sleep(0.1)
    raise SystemExit(f"the agent did not start in 30s; its log:\n{log_tail(log)}")


def log_tail(log: Path, lines: int = 20) -> str:
    """The end of the agent's log, printed on failure: the log lives in the temporary
    directory the demo removes when it exits."""
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"   (cannot read {log}: {exc.strerror})"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"   {line}" for line in tail) or "   (empty)"


def _unmount_below(root: Path) -> None:
    if os.geteuid() != 0:
        return
    from agent.volumes.mounter import mount_points_below

    for point in mount_points_below(root):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main())
