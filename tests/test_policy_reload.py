"""Reloading the policy file: ConfigMap swaps, edits, broken versions, deletion.

A real directory laid out as kubelet lays out a ConfigMap volume (``policy.yaml -> ..data/
policy.yaml``, ``..data -> ..<timestamp>``), updated the way kubelet's atomic writer does it
(a new directory, then a rename of a new ``..data`` link over the old one). ``poll()`` is the
trigger; the clock is injected. No sleeps.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from agent.observe.metrics import AgentMetrics
from agent.pki.policy import PolicyRequest, PolicyViolation
from agent.pki.policy_loader import DEFAULT_SOURCE
from agent.pki.policy_reload import PolicySource

ALLOW_EXAMPLE = """\
rules:
  - name: example
    namespaces: ["*"]
    dns-names: ["*.example.com"]
"""
ALLOW_EXAMPLE_ORG = """\
rules:
  - name: example-org
    namespaces: ["*"]
    dns-names: ["*.example.org"]
"""
BROKEN = "rules:\n  - name: broken\n    namespaces: ['*']\n    dns-names: ['a**.b']\n"

COM = PolicyRequest("team-a", "web-0", "web", dns_names=("www.example.com",))
ORG = PolicyRequest("team-a", "web-0", "web", dns_names=("www.example.org",))
IN_NAMESPACE = PolicyRequest("team-a", "web-0", "web", dns_names=("web.team-a.svc",))


class ConfigMapDir:
    """A ConfigMap volume as kubelet writes it, updated atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.generation = 0

    @property
    def path(self) -> Path:
        return self.root / "policy.yaml"

    def publish(self, text: str, *, mtime_ns: int | None = None) -> None:
        self.generation += 1
        directory = self.root / f"..2026_11_30_00_00_{self.generation:02d}.{self.generation}"
        directory.mkdir()
        (directory / "policy.yaml").write_text(text)
        if mtime_ns is not None:
            os.utime(directory / "policy.yaml", ns=(mtime_ns, mtime_ns))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(directory.name)
        os.rename(tmp, self.root / "..data")  # the one atomic step readers see
        if not self.path.is_symlink():
            self.path.symlink_to("..data/policy.yaml")

    def delete(self) -> None:
        for entry in self.root.iterdir():
            if entry.is_symlink() or entry.is_file():
                entry.unlink()


def metric(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def source_for(path: Path | None, metrics: AgentMetrics, now: list[float]) -> PolicySource:
    return PolicySource(path, observer=metrics, clock=lambda: now[0])


def allowed(source: PolicySource, request: PolicyRequest) -> bool:
    try:
        source.check(request)
    except PolicyViolation:
        return False
    return True


def test_without_a_file_the_default_applies_and_nothing_is_watched() -> None:
    metrics = AgentMetrics()
    source = source_for(None, metrics, [100.0])
    assert source.policy.source == DEFAULT_SOURCE
    assert source.poll() is False
    assert allowed(source, IN_NAMESPACE) and not allowed(source, COM)
    assert metric(metrics, "cert_agent_policy_info", sha256=source.policy.sha256, source="default")
    assert metric(metrics, "cert_agent_policy_loaded_timestamp_seconds") == 100.0


def test_a_configmap_that_appears_later_is_loaded(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    metrics, now = AgentMetrics(), [100.0]
    source = source_for(cm.path, metrics, now)
    assert source.policy.source == DEFAULT_SOURCE and source.problem is None
    assert source.poll() is False

    cm.publish(ALLOW_EXAMPLE)
    now[0] = 200.0
    assert source.poll() is True
    assert source.policy.source == str(cm.path)
    assert allowed(source, COM) and not allowed(source, IN_NAMESPACE)
    assert metric(metrics, "cert_agent_policy_reload_total", result="success") == 1
    assert metric(metrics, "cert_agent_policy_info", sha256=source.policy.sha256, source="file")
    assert metric(metrics, "cert_agent_policy_loaded_timestamp_seconds") == 200.0
    assert source.poll() is False  # unchanged: no reload
    assert metric(metrics, "cert_agent_policy_reload_total", result="success") == 1


def test_a_configmap_update_is_seen_even_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    assert len(ALLOW_EXAMPLE) == len(ALLOW_EXAMPLE.replace(".com", ".org"))
    cm.publish(ALLOW_EXAMPLE, mtime_ns=1_700_000_000_000_000_000)
    source = source_for(cm.path, AgentMetrics(), [0.0])
    assert allowed(source, COM)
    # Only the ..data link moves: same size, same mtime, another directory and inode.
    cm.publish(ALLOW_EXAMPLE.replace(".com", ".org"), mtime_ns=1_700_000_000_000_000_000)
    assert source.poll() is True
    assert allowed(source, ORG) and not allowed(source, COM)


def test_an_in_place_edit_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_EXAMPLE)
    source = source_for(path, AgentMetrics(), [0.0])
    assert allowed(source, COM)
    path.write_text(ALLOW_EXAMPLE_ORG + "\n# a longer file\n")
    assert source.poll() is True
    assert allowed(source, ORG) and not allowed(source, COM)


def test_the_same_content_in_a_new_configmap_generation_is_not_a_reload(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    cm.publish(ALLOW_EXAMPLE)
    metrics = AgentMetrics()
    source = source_for(cm.path, metrics, [0.0])
    before = metric(metrics, "cert_agent_policy_reload_total", result="success")
    cm.publish(ALLOW_EXAMPLE)
    assert source.poll() is False
    assert metric(metrics, "cert_agent_policy_reload_total", result="success") == before


def test_a_broken_version_keeps_the_last_good_one_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    cm.publish(ALLOW_EXAMPLE)
    metrics, now = AgentMetrics(), [100.0]
    source = source_for(cm.path, metrics, now)
    good = source.policy

    cm.publish(BROKEN)
    now[0] = 200.0
    with caplog.at_level(logging.ERROR, logger="agent.pki.policy_reload"):
        assert source.poll() is False
    assert source.policy is good
    assert allowed(source, COM)
    assert source.problem is not None and "'**' must be a whole segment" in source.problem
    assert "rules[0].dns-names[0]" in caplog.text and "keeping the policy in force" in caplog.text
    assert metric(metrics, "cert_agent_policy_reload_total", result="failure") == 1
    assert metric(metrics, "cert_agent_policy_last_reload_successful") == 0
    assert metric(metrics, "cert_agent_policy_loaded_timestamp_seconds") == 100.0
    with pytest.raises(PolicyViolation) as info:
        source.check(ORG)
    assert 'rule "example" does not allow DNS name "www.example.org"' in info.value.message
    assert "newest version is not in force" in info.value.message
    assert "must be a whole segment" in info.value.message
    assert source.poll() is False  # the same broken file is not counted again
    assert metric(metrics, "cert_agent_policy_reload_total", result="failure") == 1

    cm.publish(ALLOW_EXAMPLE_ORG)
    assert source.poll() is True
    assert source.problem is None and allowed(source, ORG)
    assert metric(metrics, "cert_agent_policy_last_reload_successful") == 1


def test_going_back_to_the_content_in_force_clears_the_problem(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    cm.publish(ALLOW_EXAMPLE)
    metrics = AgentMetrics()
    source = source_for(cm.path, metrics, [0.0])
    cm.publish(BROKEN)
    source.poll()
    assert source.problem is not None
    cm.publish(ALLOW_EXAMPLE)
    assert source.poll() is False  # nothing changed in force
    assert source.problem is None
    assert metric(metrics, "cert_agent_policy_last_reload_successful") == 1


def test_a_broken_file_at_start_means_the_default_until_a_good_one(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    cm.publish("rules: [")
    metrics = AgentMetrics()
    source = source_for(cm.path, metrics, [0.0])
    assert source.policy.source == DEFAULT_SOURCE
    assert source.problem is not None and "not valid YAML" in source.problem
    assert allowed(source, IN_NAMESPACE) and not allowed(source, COM)
    assert metric(metrics, "cert_agent_policy_reload_total", result="failure") == 1
    cm.publish(ALLOW_EXAMPLE)
    assert source.poll() is True and allowed(source, COM)


def test_a_deleted_configmap_falls_back_to_the_default(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    cm.publish(ALLOW_EXAMPLE)
    metrics = AgentMetrics()
    source = source_for(cm.path, metrics, [0.0])
    assert allowed(source, COM)
    cm.delete()
    assert source.poll() is True
    assert source.policy.source == DEFAULT_SOURCE
    assert not allowed(source, COM) and allowed(source, IN_NAMESPACE)
    assert metric(metrics, "cert_agent_policy_info", sha256=source.policy.sha256, source="default")
    assert source.poll() is False


class _Signal:
    """An observer that forwards to the metrics and wakes the test when a file policy loads."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self.loaded = threading.Event()

    def policy_reloaded(self, result: str) -> None:
        self.metrics.policy_reloaded(result)

    def policy_loaded(self, sha256: str, source: str, timestamp: float) -> None:
        self.metrics.policy_loaded(sha256, source, timestamp)
        if source == "file":
            self.loaded.set()


def test_the_watch_thread_reloads_by_itself(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    signal = _Signal(AgentMetrics())
    source = PolicySource(cm.path, observer=signal)
    source.start(interval_seconds=0.01)
    try:
        cm.publish(ALLOW_EXAMPLE)
        assert signal.loaded.wait(30), "the watch thread never loaded the new file"
        assert allowed(source, COM)
    finally:
        source.stop()
