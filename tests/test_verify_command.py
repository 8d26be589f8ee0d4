"""The documented `openssl verify` works with an intermediate CA (tls.crt = leaf + intermediate,
ca.crt = root), and every place that shows the command uses that form."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from agent.demo import verify_command
from tests.conftest import REPO
from tests.test_local_issuer import make_openssl_ca

DOCUMENTED = (
    "README.md",
    "Makefile",
    *(str(p.relative_to(REPO)) for p in REPO.glob("docs/**/*.md")),
)


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True)


def test_documented_verify_command_accepts_a_chain_from_an_intermediate_ca(
    agent_factory: object, tmp_path: Path
) -> None:
    root_crt, _, int_crt, int_key = make_openssl_ca(tmp_path)
    ca_dir = tmp_path / "ca-secret"
    ca_dir.mkdir()
    (ca_dir / "tls.crt").write_bytes(int_crt.read_bytes())
    (ca_dir / "tls.key").write_bytes(int_key.read_bytes())
    (ca_dir / "ca.crt").write_bytes(root_crt.read_bytes())
    agent = agent_factory(ca_dir=ca_dir)  # type: ignore[operator]
    volume = agent.publish(agent.pod("es-0"), {"csi.cert-agent.io/dns-names": "es-0.default.svc"})
    assert (volume / "tls.crt").read_text().count("BEGIN CERTIFICATE") == 2

    # The form the README used to show fails on exactly this volume...
    old = run(["openssl", "verify", "-CAfile", str(volume / "ca.crt"), str(volume / "tls.crt")])
    assert old.returncode != 0 and "unable to get local issuer certificate" in old.stderr
    # ...the documented one (README, as written there, and make demo's) succeeds.
    readme = (REPO / "README.md").read_text()
    (shown,) = re.findall(r"^\$ (openssl verify .*)$", readme, re.MULTILINE)
    command = shown.replace("$T/", f"{volume}/").split()
    assert run(command).stdout.strip() == f"{volume}/tls.crt: OK"
    assert run(verify_command(volume)).stdout.strip() == f"{volume}/tls.crt: OK"


def test_every_shown_verify_command_passes_the_chain_as_untrusted() -> None:
    shown = []
    for name in DOCUMENTED:
        for line in (REPO / name).read_text().splitlines():
            if "openssl verify" in line:
                shown.append((name, line))
                assert "-untrusted" in line, f"{name}: {line.strip()}"
    assert {name for name, _ in shown} >= {"README.md", "Makefile", "docs/install.md"}
