"""`cert-agent policy check` and `policy default`: the real CLI as a process, no agent running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from agent.pki.policy_loader import default_policy, load_policy_file
from tests.conftest import RunningAgent

REPO = Path(__file__).resolve().parents[1]
ECK_POLICY = REPO / "deploy/examples/elasticsearch/policy.yaml"
QUICK_START = "dns-names=${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "policy", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("check", *args)


def test_the_readme_quick_start_is_allowed_by_the_default() -> None:
    result = check("--namespace", "elastic", "--pod-name", "es-0", "--attr", QUICK_START)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "allowed by rule 'default' of the policy (built-in default)\n"


def test_a_denial_names_the_rule_and_the_value_and_exits_1() -> None:
    result = check(
        "--namespace", "team-a", "--pod-name", "web-0",
        "--attr", "dns-names=web.team-a.svc,evil.google.com", "--attr", "ip-sans=8.8.8.8",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.startswith("denied (PERMISSION_DENIED): denied by the issuance policy")
    assert 'rule "default" does not allow DNS name "evil.google.com"' in result.stdout


def test_the_eck_example_policy_allows_its_othername_and_caps_the_lifetime() -> None:
    args = ["--namespace", "elastic", "--pod-name", "es-es-default-0"]
    args += ["--attr", "other-names=2.5.4.3=${POD_NAME}.node.es.${POD_NAMESPACE}.es.local"]
    args += ["--attr", QUICK_START]
    assert check(*args).returncode == 1  # the default refuses the otherName
    result = check("--policy", str(ECK_POLICY), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "allowed by rule 'elasticsearch-transport'" in result.stdout
    assert "its max-duration is 720h" in result.stdout
    # Another pod's otherName is refused, by name.
    other = ["--attr", "other-names=2.5.4.3=es-es-default-1.node.es.elastic.es.local"]
    denied = check("--policy", str(ECK_POLICY), *args[:4], *other)
    assert denied.returncode == 1
    assert '"es-es-default-1.node.es.elastic.es.local"' in denied.stdout


def test_service_account_and_domains_fill_the_patterns() -> None:
    spiffe = "uri-sans=spiffe://prod.example.org/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}"
    base = ["--namespace", "pay", "--pod-name", "p-0", "--service-account", "api"]
    assert check(*base, "--attr", spiffe).returncode == 1
    allowed = check(*base, "--trust-domain", "prod.example.org", "--attr", spiffe)
    assert allowed.returncode == 0, allowed.stdout
    name = "dns-names=p-0.pay.svc.corp.example"
    assert check(*base, "--cluster-domain", "corp.example", "--attr", name).returncode == 0


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("dns-names=bad_name.team-a.svc", "csi.cert-agent.io/dns-names"),
        ("dns-nmes=a.team-a.svc", "did you mean csi.cert-agent.io/dns-names?"),
        ("dns-names=${POD_IP}.team-a.svc", "POD_IP"),
        ("no-equals-sign", "must be KEY=VALUE"),
    ],
)
def test_attributes_are_parsed_as_the_agent_parses_them(attr: str, message: str) -> None:
    result = check("--namespace", "team-a", "--pod-name", "web-0", "--attr", attr)
    assert result.returncode == 2
    assert message in result.stderr


def test_the_cert_manager_prefix_and_issuers_are_understood() -> None:
    result = check(
        "--namespace", "team-a", "--pod-name", "web-0",
        "--attr", "csi.cert-manager.io/issuer-name=ca-cluster-issuer",
        "--attr", "csi.cert-manager.io/dns-names=${POD_NAME}.${POD_NAMESPACE}.svc",
    )  # fmt: skip
    assert result.returncode == 0
    assert "Issuer ca-cluster-issuer (cert-manager.io) is a cert-manager issuer" in result.stdout
    assert "--policy-for-cert-manager" in result.stdout


def test_a_broken_policy_file_exits_2_naming_the_place(tmp_path: Path) -> None:
    broken = tmp_path / "policy.yaml"
    broken.write_text("rules:\n  - namespaces: ['*']\n    ip-sans: ['pod-ip']\n")
    result = check("--policy", str(broken), "--namespace", "a", "--pod-name", "b", "--attr", "x=y")
    assert result.returncode == 2
    assert "invalid policy" in result.stderr and "rules[0].ip-sans[0]" in result.stderr
    missing = check("--policy", str(tmp_path / "nope.yaml"), "--namespace", "a", "--pod-name", "b")
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_policy_default_prints_the_built_in_default(tmp_path: Path) -> None:
    result = cli("default")
    assert result.returncode == 0
    (tmp_path / "policy.yaml").write_text(result.stdout)
    assert load_policy_file(tmp_path / "policy.yaml").rules == default_policy().rules


def test_the_check_answers_what_the_running_agent_answers(agent: RunningAgent) -> None:
    attributes = {"dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc,www.google.com"}
    result = check(
        "--namespace", "team-a", "--pod-name", "web-0",
        *[f"--attr={k}={v}" for k, v in attributes.items()],
    )  # fmt: skip
    pod = agent.pod("web-0", namespace="team-a")
    with pytest.raises(grpc.RpcError) as info:
        agent.publish(pod, {f"csi.cert-agent.io/{k}": v for k, v in attributes.items()})
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert result.returncode == 1
    assert result.stdout == f"denied (PERMISSION_DENIED): {info.value.details()}\n"
