"""Node CA settings: flags, environment and config file, defaults from the cluster domain, and
errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.config import AgentConfig, ConfigError, resolve


def resolve_args(*argv: str, environ: dict[str, str] | None = None) -> AgentConfig:
    return resolve(build_parser().parse_args(["serve", *argv]), environ=environ or {})


BASE = ("--node-id", "n1", "--node-ca-issuer-name", "ca-cluster-issuer")


def test_defaults_come_from_the_agents_namespace_and_the_cluster_domain() -> None:
    config = resolve_args(*BASE, environ={"CERT_AGENT_POD_NAMESPACE": "cert-agent"})
    node_ca = config.node_ca
    assert node_ca is not None
    assert (node_ca.issuer_kind, node_ca.issuer_group) == ("Issuer", "cert-manager.io")
    assert node_ca.namespace == "cert-agent"
    assert node_ca.duration_seconds == 24 * 3600 and node_ca.renew_before_seconds is None
    assert node_ca.permitted.dns == ("svc.cluster.local",)
    assert node_ca.permitted.uri_hosts == ("cluster.local",)
    assert node_ca.permitted.emails == () and node_ca.permitted.ip_networks == ()
    assert node_ca.require_name_constraints is False

    other = resolve_args(
        *BASE, "--node-ca-namespace", "pki", "--cluster-domain", "corp.example"
    ).node_ca
    assert other is not None and other.namespace == "pki"
    assert other.permitted.dns == ("svc.corp.example",)
    assert other.permitted.uri_hosts == ("corp.example",)


def test_every_setting_is_read_from_the_environment_and_the_file(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(
        "node-ca-issuer-name: ca-cluster-issuer\n"
        "node-ca-issuer-kind: ClusterIssuer\n"
        "node-ca-duration: 48h\n"
        "node-ca-permitted-dns: [svc.cluster.local, .corp.example]\n"
        "node_ca_require_name_constraints: true\n"
    )
    env = {
        "CERT_AGENT_NODE_ID": "n1",
        "CERT_AGENT_NODE_CA_NAMESPACE": "cert-agent",
        "CERT_AGENT_NODE_CA_RENEW_BEFORE": "12h",
        "CERT_AGENT_NODE_CA_PERMITTED_IP": "10.0.0.0/8,fd00::/8",
        "CERT_AGENT_NODE_CA_PERMITTED_URI": "",  # explicitly none
        "CERT_AGENT_POD_NAME": "cert-agent-x1",
        "CERT_AGENT_POD_UID": "uid-1",
    }
    config = resolve_args("--config", str(file), environ=env)
    node_ca = config.node_ca
    assert node_ca is not None
    assert node_ca.issuer_kind == "ClusterIssuer"
    assert node_ca.duration_seconds == 48 * 3600 and node_ca.renew_before_seconds == 12 * 3600
    assert node_ca.permitted.dns == ("svc.cluster.local", ".corp.example")
    assert node_ca.permitted.ip_networks == ("10.0.0.0/8", "fd00::/8")
    assert node_ca.permitted.uri_hosts == ()
    assert node_ca.require_name_constraints is True
    assert (config.pod_name, config.pod_uid) == ("cert-agent-x1", "uid-1")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (BASE, "--node-ca-namespace is required unless --pod-namespace"),
        ((*BASE, "--pod-namespace", "a", "--ca-secret", "a/b"), "choose one CA source"),
        ((*BASE, "--pod-namespace", "a", "--standalone"), "drop --standalone"),
        ((*BASE, "--pod-namespace", "a", "--allow-ca"), "--allow-ca cannot be used"),
        (
            (*BASE, "--pod-namespace", "a", "--node-ca-issuer-kind", "Foo"),
            "Issuer or ClusterIssuer",
        ),
        (
            (*BASE, "--pod-namespace", "a", "--node-ca-renew-before", "24h"),
            "--node-ca-renew-before must be shorter than --node-ca-duration",
        ),
        (
            (*BASE, "--pod-namespace", "a", "--node-ca-permitted-uri", "spiffe://cluster.local"),
            "--node-ca-permitted-uri: 'spiffe://cluster.local' is not a URI name constraint",
        ),
        (
            (*BASE, "--pod-namespace", "a", "--node-ca-permitted-ip", "10.0.0.1/8"),
            "--node-ca-permitted-ip:",
        ),
        (
            ("--node-id", "n1", "--ca-dir", "/x", "--node-ca-permitted-dns", "a.b"),
            "--node-ca-permitted-dns only apply with --node-ca-issuer-name",
        ),
        (("--node-id", "n1"), "--node-ca-issuer-name (node CA mode, recommended)"),
    ],
)
def test_errors_name_the_setting(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_args(*argv)
    assert message in str(info.value)


def test_without_the_issuer_name_there_is_no_node_ca() -> None:
    assert resolve_args("--standalone").node_ca is None
