"""--pcr-signer-name / --pcr-signers / --pcr-publish-trust-bundle: flag, env, file; errors name
the setting; templates expand per pod."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.config import AgentConfig, ConfigError, resolve
from agent.spec.pcr import (
    KEY_TYPES,
    PcrIdentity,
    dns_name_problem,
    expand,
    parse_signers,
    signer_name_problem,
)

BASE = ("--node-id", "node-1", "--ca-dir", "/ca")


def resolve_args(*argv: str, environ: dict[str, str] | None = None) -> AgentConfig:
    return resolve(build_parser().parse_args(["serve", *BASE, *argv]), environ=environ or {})


def test_signer_names_from_repeated_flags_and_commas() -> None:
    config = resolve_args(
        "--pcr-signer-name", "cert-agent.io/pod-identity,example.com/a", "--pcr-signer-name",
        "example.com/b",
    )  # fmt: skip
    assert [s.signer_name for s in config.pcr_signers] == [
        "cert-agent.io/pod-identity",
        "example.com/a",
        "example.com/b",
    ]
    assert config.pcr_signers[0].uris == (
        "spiffe://${TRUST_DOMAIN}/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}",
    )
    assert config.pcr_signers[0].key_types == frozenset(KEY_TYPES)
    assert config.pcr_publish_trust_bundle is False


def test_env_and_config_file(tmp_path: Path) -> None:
    env = {
        "CERT_AGENT_PCR_SIGNER_NAME": "cert-agent.io/pod-identity",
        "CERT_AGENT_PCR_SIGNERS": '{"cert-agent.io/pod-identity": {"max-duration": "2h"}}',
        "CERT_AGENT_PCR_PUBLISH_TRUST_BUNDLE": "true",
    }
    config = resolve_args(environ=env)
    assert config.pcr_signers[0].max_duration_seconds == 7200
    assert config.pcr_publish_trust_bundle is True
    file = tmp_path / "config.yaml"
    file.write_text(
        "pcr-signer-name: [example.com/mesh]\n"
        "pcr-signers:\n"
        "  example.com/mesh:\n"
        "    uris: ['spiffe://${TRUST_DOMAIN}/${NODE_NAME}/${POD_UID}']\n"
        "    dns-names: []\n"
        "    common-name: ${POD_NAME}\n"
        "    key-types: [ED25519]\n"
        "    trust-domain: prod.example.com\n"
    )
    config = resolve_args("--config", str(file))
    (signer,) = config.pcr_signers
    assert signer.key_types == frozenset({"ED25519"})
    names = expand(signer, PcrIdentity("apps", "web-0", "u-1", "web", "node-1"))
    assert names.uris == ("spiffe://prod.example.com/node-1/u-1",)
    assert names.dns_names == ()
    assert names.common_name == "web-0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--pcr-signer-name", "pod-identity"), "--pcr-signer-name 'pod-identity'"),
        (("--pcr-signer-name", "kubernetes.io/x"), "reserved"),
        (("--pcr-signer-name", "Cert-Agent.io/x"), "lower-case"),
        (("--pcr-signer-name", "a.io/x", "--pcr-signer-name", "a.io/x"), "twice"),
        (("--pcr-signers", "{b.io/x: {}}", "--pcr-signer-name", "a.io/x"), "b.io/x"),
        (("--pcr-signer-name", "a.io/x", "--pcr-signers", "{a.io/x: {sans: []}}"), "sans"),
        (
            ("--pcr-signer-name", "a.io/x", "--pcr-signers", "{a.io/x: {uris: ['${POD_IP}']}}"),
            "${POD_IP}",
        ),
        (("--pcr-signer-name", "a.io/x", "--pcr-signers", "{a.io/x: {max-duration: 30m}}"), "1h"),
        (("--pcr-signer-name", "a.io/x", "--pcr-signers", "{a.io/x: {key-types: [RSA2048]}}"),
         "RSA2048"),
        (("--pcr-signer-name", "a.io/x", "--pcr-signers", "{a.io/x: {trust-domain: A_B}}"),
         "trust-domain"),
        (("--pcr-signer-name", "a.io/x", "--pcr-signers", "[1, 2]"), "mapping"),
        (("--pcr-signer-name", "a.io/x", "--pcr-signers", "{a: [}"), "--pcr-signers"),
        (("--pcr-publish-trust-bundle",), "needs at least one --pcr-signer-name"),
    ],
)  # fmt: skip
def test_errors_name_the_setting(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_args(*argv)
    assert message in str(err.value)


def test_standalone_cannot_sign_pcrs() -> None:
    with pytest.raises(ConfigError, match="needs Kubernetes access"):
        resolve(
            build_parser().parse_args(
                ["serve", "--standalone", "--pcr-signer-name", "cert-agent.io/pod-identity"]
            ),
            environ={},
        )


def test_signer_name_rules() -> None:
    assert signer_name_problem("cert-agent.io/pod-identity") is None
    assert signer_name_problem("example.com/a.b-c") is None
    for bad in ("example.com", "example.com/", "com/x", "example.com/a/b", "x.kubernetes.io/y"):
        assert signer_name_problem(bad) is not None, bad


def test_dns_names_from_long_pod_names_are_caught() -> None:
    (signer,) = parse_signers(["a.io/x"], None)
    names = expand(signer, PcrIdentity("ns", "p" * 64, "u", "sa", "n"))
    assert dns_name_problem(names.dns_names[0]) is not None
    names = expand(signer, PcrIdentity("ns", "web-0", "u", "sa", "n"))
    assert names.dns_names == ("web-0.ns.pod.cluster.local",)
    assert dns_name_problem(names.dns_names[0]) is None


def test_the_documented_workload_and_settings_are_valid() -> None:
    """docs/pod-certificates.md: the Deployment validates against the Kubernetes 1.37 schema
    (podCertificate and clusterTrustBundle sources), the pcr-signers block is what the resolver
    accepts, and the documented defaults are the real ones."""
    import re

    import kubernetes_validate  # type: ignore[import-untyped]
    import yaml

    from agent.kube.trust_bundle_publisher import bundle_name

    text = (Path(__file__).resolve().parents[1] / "docs/pod-certificates.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    deployment = next(b for b in blocks if b.get("kind") == "Deployment")
    kubernetes_validate.validate(deployment, "1.37.0", strict=True)
    sources = deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    assert sources[0]["podCertificate"]["signerName"] == "cert-agent.io/pod-identity"
    settings = next(b for b in blocks if "pcr-signers" in b)
    env = {"CERT_AGENT_PCR_SIGNERS": yaml.safe_dump(settings["pcr-signers"])}
    resolved = resolve_args("--pcr-signer-name", "cert-agent.io/pod-identity", environ=env)
    (documented,) = resolved.pcr_signers
    (default,) = resolve_args("--pcr-signer-name", "cert-agent.io/pod-identity").pcr_signers
    assert documented == default
    from agent.pki.policy_loader import load_policy_text

    policy = next(b for b in blocks if "rules" in b)
    assert load_policy_text(yaml.safe_dump(policy), "docs").rules[0].name == "pod-identity"
    bundle = next(b for b in blocks if b.get("kind") == "ClusterTrustBundle")
    assert bundle["metadata"]["name"] == bundle_name(bundle["spec"]["signerName"])


def test_signer_domains_default_to_the_agents_trust_and_cluster_domains() -> None:
    """The SPIFFE ID follows --trust-domain, as the built-in policy's ${TRUST_DOMAIN} does (a
    signer defaulting to the cluster domain would be denied by the default policy)."""
    config = resolve_args(
        "--pcr-signer-name", "a.io/x", "--trust-domain", "prod.example.com",
        "--cluster-domain", "k8s.example.com",
    )  # fmt: skip
    (signer,) = config.pcr_signers
    assert (signer.trust_domain, signer.cluster_domain) == ("prod.example.com", "k8s.example.com")
    names = expand(signer, PcrIdentity("apps", "web-0", "u", "web", "node-1"))
    assert names.uris == ("spiffe://prod.example.com/ns/apps/sa/web",)
    assert names.dns_names == ("web-0.apps.pod.k8s.example.com",)
