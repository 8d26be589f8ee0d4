"""`make demo` shows why its agent did not start (the log lives in a directory it deletes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_demo_prints_the_agents_log_when_it_cannot_start(tmp_path: Path) -> None:
    # A broken config file, picked up through the environment, stops the demo's agent at once.
    config = tmp_path / "broken.yaml"
    config.write_text("no-such-setting: 1\n")
    env = {**os.environ, "CERT_AGENT_CONFIG": str(config)}
    result = subprocess.run(
        [sys.executable, "-m", "agent.demo"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert result.returncode != 0
    assert "the agent exited with code 2; its log:" in result.stderr
    assert f"--config file {config} has unknown settings: no-such-setting" in result.stderr
    # The temporary directory is gone, so the tail printed is the only record.
    work = result.stdout.splitlines()[0].rsplit(" in ", 1)[1].strip()
    assert work.startswith("/") and not Path(work).exists()
