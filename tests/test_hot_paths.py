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
