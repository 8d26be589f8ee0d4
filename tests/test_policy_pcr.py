"""The issuance policy for PodCertificateRequests: the agent's PCR signer asks the same engine.

The whole agent against the fake API server with its PodCertificateRequest rules (tests.fake_pcr):
a signer whose templates name something the policy does not allow answers PolicyViolation with
the rule and the value and signs nothing; a rule's max-duration caps the lifetime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509

from agent.spec.pcr import parse_signers
from tests.fake_pcr import PCRS, condition, install, pcr_body
from tests.fakekube import FakeKube

SIGNER = "cert-agent.io/pod-identity"


def answered(fake: FakeKube, name: str) -> dict[str, Any]:
    pod = fake.put_pod("apps", name, "node-1")
    fake.create(PCRS, "apps", pcr_body(name=f"{name}-pcr", pod=pod, signer=SIGNER).body)
    fake.wait_until(lambda: condition(fake.get(PCRS, "apps", f"{name}-pcr")) is not None)
    return fake.get(PCRS, "apps", f"{name}-pcr")


def failures(agent: Any) -> float:
    value = agent.agent.metrics.registry.get_sample_value(
        "cert_agent_pcr_requests_total",
        {"signer": SIGNER, "outcome": "denied", "reason": "PolicyViolation"},
    )
    return value or 0.0


def test_a_signer_template_outside_the_policy_is_denied_naming_rule_and_value(
    fake: FakeKube, node_agent: Any
) -> None:
    install(fake)
    signers = parse_signers([SIGNER], {SIGNER: {"dns-names": ["${POD_NAME}.example.com"]}})
    agent = node_agent(pcr_signers=signers, policy_file=None)  # the built-in default policy
    done = answered(fake, "web-0")
    state = condition(done)
    assert state is not None and state["type"] == "Denied"
    assert state["reason"] == "PolicyViolation"
    assert 'rule "default" does not allow DNS name "web-0.example.com"' in state["message"]
    assert not (done.get("status") or {}).get("certificateChain")
    fake.wait_until(lambda: failures(agent) == 1)


def test_the_default_signer_names_pass_the_default_policy_and_max_duration_caps(
    fake: FakeKube, node_agent: Any, tmp_path: Path
) -> None:
    install(fake)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "rules:\n  - name: short\n    namespaces: ['apps']\n    max-duration: 2h\n"
        "    dns-names: ['${POD_NAME}.${POD_NAMESPACE}.pod.${CLUSTER_DOMAIN}']\n"
        "    uri-sans: ['spiffe://${TRUST_DOMAIN}/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}']\n"
    )
    node_agent(pcr_signers=parse_signers([SIGNER], None), policy_file=policy)
    done = answered(fake, "web-1")
    state = condition(done)
    assert state is not None and state["type"] == "Issued", state
    leaf = x509.load_pem_x509_certificates(done["status"]["certificateChain"].encode())[0]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 2 * 3600
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["web-1.apps.pod.cluster.local"]
