"""Configuration: flags over environment over the YAML file over defaults, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.config import ConfigError, resolve


def resolve_args(*argv: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return resolve(build_parser().parse_args(["serve", *argv]), environ=environ or {})


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("node-id: from-file\nmax-duration: 24h\nallow_ca: true\nkube-qps: 5\n")
    env = {"CERT_AGENT_NODE_ID": "from-env", "CERT_AGENT_MAX_DURATION": "48h"}
    # (--allow-ca needs a CA of its own: the standalone self-signed one may not sign CAs.)
    resolved = resolve_args("--standalone", "--ca-dir", "/ca", "--config", str(config), environ=env)
    assert resolved.node_id == "from-env"
    assert resolved.max_duration_seconds == 48 * 3600
    assert resolved.allow_ca is True
    assert resolved.kube_qps == 5.0
    flagged = resolve_args(
        "--standalone",
        "--ca-dir",
        "/ca",
        "--config",
        str(config),
        "--node-id",
        "from-flag",
        environ=env,
    )
    assert flagged.node_id == "from-flag"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ca-dir", "/x"], "--node-id is required"),
        (["--node-id", "n"], "no local CA configured"),
        (["--standalone", "--ca-cert-file", "/a"], "must be given together"),
        (["--standalone", "--ca-dir", "/a", "--ca-secret", "ns/n"], "choose one CA source"),
        (["--standalone", "--ca-secret", "no-slash"], "NAMESPACE/NAME"),
        (["--standalone", "--endpoint", "tcp://x:1"], "unix:///"),
        (["--standalone", "--max-duration", "90d"], "--max-duration"),
        (["--standalone", "--driver-name=bad_name."], "--driver-name"),
        (["--standalone", "--driver-name", "a" * 64], "63 characters"),
        (["--standalone", "--log-format", "xml"], "--log-format"),
        (["--standalone", "--renewal-workers", "0"], "--renewal-workers"),
        (["--standalone", "--cluster-domain", "Cluster.Local"], "--cluster-domain"),
        (["--standalone", "--trust-domain", "spiffe://x"], "--trust-domain"),
    ],
)
def test_invalid_settings_name_the_setting(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_args(*argv)
    assert message in str(info.value)


def test_unknown_config_file_keys_are_errors(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("node-id: a\nmax-durration: 1h\n")
    with pytest.raises(ConfigError) as info:
        resolve_args("--standalone", "--config", str(config))
    assert "max-durration" in str(info.value)


def test_serve_exits_2_with_the_reason_on_bad_configuration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agent.cli import main

    assert main(["serve", "--node-id", "n"]) == 2
    assert "no local CA configured" in capsys.readouterr().err


def test_limit_settings_default_to_the_production_floors_and_accept_test_values() -> None:
    defaults = resolve_args("--standalone")
    assert defaults.min_duration_seconds == 3600
    assert defaults.min_renewal_interval_seconds == 30.0
    assert defaults.keygen_workers == 2
    assert defaults.tmpfs_reserve_bytes == 2 * 1024 * 1024
    env = {"CERT_AGENT_MIN_DURATION": "10s", "CERT_AGENT_TMPFS_RESERVE": "0"}
    demo = resolve_args("--standalone", "--min-renewal-interval", "500ms", environ=env)
    assert demo.min_duration_seconds == 10
    assert demo.min_renewal_interval_seconds == 0.5
    assert demo.tmpfs_reserve_bytes == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-duration", "3000h"], "--min-duration must not be longer than --max-duration"),
        (["--min-renewal-interval", "0s"], "--min-renewal-interval"),
        (["--keygen-workers", "0"], "--keygen-workers"),
        (["--tmpfs-reserve", "64"], "--tmpfs-reserve"),
    ],
)
def test_invalid_limit_settings_name_the_setting(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_args("--standalone", *argv)
    assert message in str(info.value)


def test_policy_settings_from_flags_environment_and_file(tmp_path: Path) -> None:
    defaults = resolve_args("--standalone")
    assert defaults.policy_file is None and defaults.policy_for_cert_manager is False
    assert (defaults.cluster_domain, defaults.trust_domain) == ("cluster.local", "cluster.local")
    config = tmp_path / "config.yaml"
    config.write_text("policy: /etc/p/policy.yaml\npolicy-for-cert-manager: true\n")
    env = {"CERT_AGENT_CLUSTER_DOMAIN": "corp.example", "CERT_AGENT_TRUST_DOMAIN": "td.example"}
    resolved = resolve_args("--standalone", "--config", str(config), environ=env)
    assert resolved.policy_file == Path("/etc/p/policy.yaml")
    assert resolved.policy_for_cert_manager is True
    assert (resolved.cluster_domain, resolved.trust_domain) == ("corp.example", "td.example")
    flagged = resolve_args("--standalone", "--policy", "/x.yaml", "--no-policy-for-cert-manager")
    assert flagged.policy_file == Path("/x.yaml") and flagged.policy_for_cert_manager is False
