"""The issuance policy engine and its file format: tables of requests against rules.

Each row is a real policy document loaded by the real loader and a request checked by the real
engine; requests built from volume attributes go through the agent's own attribute parser.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.pki.policy import PolicyDecision, PolicyRequest, PolicyViolation
from agent.pki.policy_loader import (
    DEFAULT_POLICY_YAML,
    PolicyError,
    default_policy,
    load_policy_file,
    load_policy_text,
)
from agent.spec.attributes import parse_volume_context
from agent.spec.model import KeyAlgorithm, OtherName

REPO = Path(__file__).resolve().parents[1]


def policy(text: str, cluster_domain: str = "cluster.local", trust_domain: str = "cluster.local"):  # type: ignore[no-untyped-def]
    return load_policy_text(textwrap.dedent(text), "test.yaml", cluster_domain, trust_domain)


def one_rule(body: str, namespaces: str = '["*"]'):  # type: ignore[no-untyped-def]
    indented = textwrap.indent(textwrap.dedent(body), "    ")
    return policy(f"rules:\n  - name: r\n    namespaces: {namespaces}\n{indented}")


def request(namespace: str = "team-a", pod: str = "web-0", sa: str = "web", **kw: object):  # type: ignore[no-untyped-def]
    return PolicyRequest(namespace=namespace, pod_name=pod, service_account=sa, **kw)  # type: ignore[arg-type]


def from_attributes(namespace: str, pod: str, sa: str = "web", **attrs: str) -> PolicyRequest:
    context = {f"csi.cert-agent.io/{k.replace('_', '-')}": v for k, v in attrs.items()}
    context.update(
        {
            "csi.storage.k8s.io/pod.name": pod,
            "csi.storage.k8s.io/pod.namespace": namespace,
            "csi.storage.k8s.io/pod.uid": "0b0e6a43-8a49-4bb5-9a3c-6a7ea2d0f5b1",
            "csi.storage.k8s.io/serviceAccount.name": sa,
            "csi.storage.k8s.io/ephemeral": "true",
        }
    )
    spec, info = parse_volume_context(context)
    return PolicyRequest.from_spec(info, spec)


def verdict(p, req: PolicyRequest) -> str:  # type: ignore[no-untyped-def]
    try:
        decision: PolicyDecision = p.check(req)
    except PolicyViolation as exc:
        assert exc.code == "PERMISSION_DENIED" and exc.reason == "policy"
        return "denied"
    return f"allowed:{decision.rule}"


# --- the built-in default ------------------------------------------------------------------------

DEFAULT_CASES = [
    # (attributes, namespace, verdict)
    ({"dns_names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local"}, "team-a", True),
    ({"dns_names": "web.team-a.svc"}, "team-a", True),
    ({"dns_names": "a.b.web.team-a.svc"}, "team-a", True),  # names under *.<ns>.svc
    ({"dns_names": "*.team-a.svc"}, "team-a", True),  # a wildcard inside the namespace
    ({"dns_names": "*.team-a.svc.cluster.local"}, "team-a", True),
    ({"dns_names": "team-a.svc"}, "team-a", False),  # the zone itself is not a service
    ({"dns_names": "web.team-b.svc"}, "team-a", False),  # another namespace's service
    ({"dns_names": "web.team-b.svc.cluster.local"}, "team-a", False),
    ({"dns_names": "evil.google.com"}, "team-a", False),
    ({"dns_names": "web.team-a.svc.evil.com"}, "team-a", False),
    ({"dns_names": "web.team-a.svc.cluster.local.evil.com"}, "team-a", False),
    ({"dns_names": "web.team-a.svc.other.local"}, "team-a", False),
    ({"dns_names": "*.svc"}, "team-a", False),
    ({"dns_names": "web.team-a"}, "team-a", False),  # short names could be another zone
    ({"dns_names": "web-0.team-a.pod.cluster.local"}, "team-a", True),  # its own pod name
    ({"dns_names": "web-1.team-a.pod.cluster.local"}, "team-a", False),  # another pod's
    ({"dns_names": "x.web-0.team-a.pod.cluster.local"}, "team-a", False),
    ({"uri_sans": "spiffe://cluster.local/ns/team-a/sa/web"}, "team-a", True),
    ({"uri_sans": "spiffe://cluster.local/ns/team-a/sa/${SERVICE_ACCOUNT_NAME}"}, "team-a", True),
    ({"uri_sans": "spiffe://cluster.local/ns/team-a/sa/admin"}, "team-a", False),
    ({"uri_sans": "spiffe://cluster.local/ns/team-b/sa/web"}, "team-a", False),
    ({"uri_sans": "spiffe://other.domain/ns/team-a/sa/web"}, "team-a", False),
    ({"uri_sans": "spiffe://cluster.local/ns/team-a/sa/web/extra"}, "team-a", False),
    ({"uri_sans": "spiffe://cluster.local/ns/team-a/sa/web?x=1"}, "team-a", False),
    ({"uri_sans": "https://web.team-a.svc"}, "team-a", False),
    ({"ip_sans": "8.8.8.8"}, "team-a", False),
    ({"ip_sans": "10.0.0.1"}, "team-a", False),
    # The pod's own IPs need pod-ips in a rule.
    ({"ip_sans": "${POD_IP}", "dns_names": "web.team-a.svc"}, "team-a", False),
    ({"ip_sans": "${POD_IPS}", "dns_names": "web.team-a.svc"}, "team-a", False),
    ({"email_sans": "web@team-a.svc"}, "team-a", False),
    ({"other_names": "2.5.4.3=web-0.node.es.team-a.es.local"}, "team-a", False),
    ({"common_name": "web.team-a.svc"}, "team-a", True),
    ({"common_name": "web-0.team-a.svc.cluster.local"}, "team-a", True),
    ({"common_name": "evil.google.com"}, "team-a", False),
    ({"common_name": "web"}, "team-a", False),
    ({"dns_names": "web.team-a.svc", "organizations": "system:masters"}, "team-a", False),
    ({"literal_subject": "CN=web.team-a.svc"}, "team-a", True),
    ({"literal_subject": "CN=web.team-a.svc,O=system:masters"}, "team-a", False),
    ({"literal_subject": "CN=web.team-a.svc,DC=example"}, "team-a", False),
    ({"dns_names": "web.team-a.svc", "is_ca": "true"}, "team-a", False),
    ({"dns_names": "web.team-a.svc", "key_algorithm": "Ed25519"}, "team-a", True),
    ({"dns_names": "web.team-a.svc", "key_algorithm": "ECDSA", "key_size": "384"}, "team-a", True),
    ({"dns_names": "web.team-a.svc", "duration": "8760h"}, "team-a", True),  # issuer's limit
]


@pytest.mark.parametrize(("attributes", "namespace", "allowed"), DEFAULT_CASES)
def test_default_policy_keeps_a_pod_inside_its_namespace(
    attributes: dict[str, str], namespace: str, allowed: bool
) -> None:
    req = from_attributes(namespace, "web-0", **attributes)
    assert verdict(default_policy(), req) == ("allowed:default" if allowed else "denied")


def test_default_policy_uses_the_cluster_and_trust_domains() -> None:
    p = default_policy(cluster_domain="corp.example", trust_domain="prod.example.org")
    ok = request(dns_names=("web.team-a.svc.corp.example",))
    assert verdict(p, ok) == "allowed:default"
    assert verdict(p, request(dns_names=("web.team-a.svc.cluster.local",))) == "denied"
    spiffe = "spiffe://prod.example.org/ns/team-a/sa/web"
    assert verdict(p, request(uris=(spiffe,))) == "allowed:default"
    assert verdict(p, request(uris=("spiffe://cluster.local/ns/team-a/sa/web",))) == "denied"


def test_denial_names_the_rule_the_value_and_what_is_allowed() -> None:
    with pytest.raises(PolicyViolation) as info:
        default_policy().check(request(dns_names=("web.team-a.svc", "evil.google.com")))
    message = info.value.message
    assert info.value.rule == "default"
    assert 'rule "default" does not allow DNS name "evil.google.com"' in message
    assert '"**.team-a.svc", "**.team-a.svc.cluster.local"' in message  # expanded for this pod
    assert "built-in default" in message
    with pytest.raises(PolicyViolation, match=r'any IP address \(requested "8.8.8.8"\)'):
        default_policy().check(request(ip_addresses=("8.8.8.8",)))
    with pytest.raises(PolicyViolation, match="CA certificates"):
        default_policy().check(request(dns_names=("a.team-a.svc",), is_ca=True))


def test_a_pod_without_a_service_account_gets_no_spiffe_id() -> None:
    req = request(sa="", uris=("spiffe://cluster.local/ns/team-a/sa/",))
    assert verdict(default_policy(), req) == "denied"


def test_the_default_policy_is_what_its_yaml_says() -> None:
    # Built from a Python copy of the document (a start then needs no YAML parser): the copy,
    # the policy and its fingerprint are those of DEFAULT_POLICY_YAML.
    import yaml

    from agent.pki.policy_loader import _DEFAULT_POLICY_DOCUMENT, DEFAULT_SOURCE

    assert yaml.safe_load(DEFAULT_POLICY_YAML) == _DEFAULT_POLICY_DOCUMENT
    for domains in ({}, {"cluster_domain": "corp.example", "trust_domain": "prod.example.org"}):
        built = default_policy(**domains)
        parsed = load_policy_text(DEFAULT_POLICY_YAML, DEFAULT_SOURCE, **domains)
        assert built == parsed and built.sha256 == parsed.sha256
    assert default_policy() == default_policy()  # the shared document is not changed by a load


def test_a_standalone_start_imports_no_yaml_parser() -> None:
    code = (
        "import sys, agent.cli, agent.server\n"
        "from agent.pki.policy_reload import PolicySource\n"
        "PolicySource(None)\n"
        "assert 'yaml' not in sys.modules, 'yaml imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shipped_documents_state_the_built_in_default() -> None:
    # The example policy repeats the default rule; docs/policy.md quotes it verbatim.
    example = load_policy_file(REPO / "deploy/examples/elasticsearch/policy.yaml")
    [rule] = [r for r in example.rules if r.name == "default"]
    assert rule == default_policy().rules[0]
    assert DEFAULT_POLICY_YAML in (REPO / "docs/policy.md").read_text()


# --- patterns, SAN by SAN -------------------------------------------------------------------------

GLOB_CASES = [
    # (rule body, request fields, allowed)
    ('dns-names: ["*.example.com"]', {"dns_names": ("a.example.com",)}, True),
    ('dns-names: ["*.example.com"]', {"dns_names": ("a.b.example.com",)}, False),
    ('dns-names: ["*.example.com"]', {"dns_names": ("example.com",)}, False),
    ('dns-names: ["*.example.com"]', {"dns_names": ("A.EXAMPLE.COM",)}, True),  # DNS: any case
    ('dns-names: ["**.example.com"]', {"dns_names": ("a.b.c.example.com",)}, True),
    ('dns-names: ["**.example.com"]', {"dns_names": ("example.com",)}, False),
    ('dns-names: ["**.example.com"]', {"dns_names": ("a.example.com.evil",)}, False),
    ('dns-names: ["**.example.com"]', {"dns_names": ("aexample.com",)}, False),
    ('dns-names: ["es-*.example.com"]', {"dns_names": ("es-0.example.com",)}, True),
    ('dns-names: ["es-*.example.com"]', {"dns_names": ("es-.example.com",)}, True),
    ('dns-names: ["es-*.example.com"]', {"dns_names": ("x-es-0.example.com",)}, False),
    ('dns-names: ["es-*.example.com"]', {"dns_names": ("es-0.x.example.com",)}, False),
    ('dns-names: ["api.*.example.com"]', {"dns_names": ("api.eu.example.com",)}, True),
    ('dns-names: ["api.*.example.com"]', {"dns_names": ("api.eu.west.example.com",)}, False),
    ('dns-names: ["api.**.example.com"]', {"dns_names": ("api.eu.west.example.com",)}, True),
    ('dns-names: ["*"]', {"dns_names": ("localhost",)}, True),
    ('dns-names: ["*"]', {"dns_names": ("a.b",)}, False),
    ('dns-names: ["**"]', {"dns_names": ("any.name.at.all",)}, True),
    ('dns-names: ["a.example.com"]', {"dns_names": ("axexample.com",)}, False),  # '.' literal
    ('dns-names: ["${POD_NAME}.web.svc"]', {"dns_names": ("web-0.web.svc",)}, True),
    ('dns-names: ["${POD_NAME}.web.svc"]', {"dns_names": ("web-1.web.svc",)}, False),
    (
        'dns-names: ["${SERVICE_ACCOUNT_NAME}.${POD_NAMESPACE}.x"]',
        {"dns_names": ("web.team-a.x",)},
        True,
    ),
    ("dns-names: []", {"dns_names": ("web.team-a.svc",)}, False),
    ("is-ca: false", {"dns_names": ("web.team-a.svc",)}, False),  # a kind not listed: nothing
    # URIs: '/'-separated, exact case
    (
        'uri-sans: ["spiffe://td/ns/${POD_NAMESPACE}/sa/*"]',
        {"uris": ("spiffe://td/ns/team-a/sa/x",)},
        True,
    ),
    (
        'uri-sans: ["spiffe://td/ns/${POD_NAMESPACE}/sa/*"]',
        {"uris": ("spiffe://td/ns/team-a/sa/x/y",)},
        False,
    ),
    (
        'uri-sans: ["spiffe://td/ns/${POD_NAMESPACE}/sa/*"]',
        {"uris": ("spiffe://td/ns/team-b/sa/x",)},
        False,
    ),
    (
        'uri-sans: ["spiffe://td/ns/${POD_NAMESPACE}/sa/*"]',
        {"uris": ("SPIFFE://td/ns/team-a/sa/x",)},
        False,
    ),
    ('uri-sans: ["https://*.example.com/**"]', {"uris": ("https://a.example.com/x/y",)}, True),
    ('uri-sans: ["https://*.example.com/**"]', {"uris": ("https://example.com/x",)}, False),
    (
        'uri-sans: ["https://*.example.com/**"]',
        {"uris": ("https://a.b.example.com/x",)},
        True,
    ),  # a URI segment spans dots
    (
        'uri-sans: ["https://*.example.com/**"]',
        {"uris": ("https://a.evil.com/.example.com/x",)},
        False,
    ),
    ('uri-sans: ["**"]', {"uris": ("spiffe://td/ns/a/sa/b",)}, True),
    ('uri-sans: ["**"]', {"uris": ("https://a.example/?q=1",)}, False),
    ('uri-sans: ["spiffe://td/**"]', {"uris": ("spiffe://td/ns/a/sa/b",)}, True),
    ('uri-sans: ["spiffe://td/**"]', {"uris": ("spiffe://td2/ns/a",)}, False),
    ('uri-sans: ["urn:team-a:*"]', {"uris": ("urn:team-a:svc",)}, True),
    ('uri-sans: ["urn:team-a:*"]', {"uris": ("urn:team-a:svc?x",)}, False),
    # emails: exact local part, DNS-like domain
    (
        'email-sans: ["*@${POD_NAMESPACE}.example.com"]',
        {"emails": ("alice@team-a.example.com",)},
        True,
    ),
    (
        'email-sans: ["*@${POD_NAMESPACE}.example.com"]',
        {"emails": ("alice@TEAM-A.example.com",)},
        True,
    ),
    (
        'email-sans: ["*@${POD_NAMESPACE}.example.com"]',
        {"emails": ("alice@team-b.example.com",)},
        False,
    ),
    (
        'email-sans: ["*@${POD_NAMESPACE}.example.com"]',
        {"emails": ("alice@x.team-a.example.com",)},
        False,
    ),
    (
        'email-sans: ["${SERVICE_ACCOUNT_NAME}@**.example.com"]',
        {"emails": ("web@a.b.example.com",)},
        True,
    ),
    (
        'email-sans: ["${SERVICE_ACCOUNT_NAME}@**.example.com"]',
        {"emails": ("Web@a.example.com",)},
        False,
    ),
    # IP addresses: CIDRs, per family
    ('ip-sans: ["10.0.0.0/8"]', {"ip_addresses": ("10.1.2.3",)}, True),
    ('ip-sans: ["10.0.0.0/8"]', {"ip_addresses": ("11.0.0.1",)}, False),
    ('ip-sans: ["10.0.0.0/8"]', {"ip_addresses": ("::ffff:10.0.0.1",)}, False),
    ('ip-sans: ["fd00::/8", "192.168.1.7/32"]', {"ip_addresses": ("fd12::1", "192.168.1.7")}, True),
    (
        'ip-sans: ["fd00::/8", "192.168.1.7/32"]',
        {"ip_addresses": ("fd12::1", "192.168.1.8")},
        False,
    ),
    # the pod's own addresses (${POD_IP}/${POD_IPS}): a keyword, not a range
    ('ip-sans: ["pod-ips"]', {"pod_ips": True}, True),
    ('ip-sans: ["10.0.0.0/8"]', {"pod_ips": True}, False),
    ('ip-sans: ["pod-ips"]', {"pod_ips": True, "ip_addresses": ("10.0.0.1",)}, False),
    ('ip-sans: ["pod-ips", "10.0.0.0/8"]', {"pod_ips": True, "ip_addresses": ("10.0.0.1",)}, True),
    # otherNames: per OID
    (
        'other-names: {"2.5.4.3": ["${POD_NAME}.node.*.${POD_NAMESPACE}.es.local"]}',
        {"other_names": (OtherName("2.5.4.3", "web-0.node.es.team-a.es.local"),)},
        True,
    ),
    (
        'other-names: {"2.5.4.3": ["${POD_NAME}.node.*.${POD_NAMESPACE}.es.local"]}',
        {"other_names": (OtherName("2.5.4.3", "web-1.node.es.team-a.es.local"),)},
        False,
    ),
    (
        'other-names: {"2.5.4.3": ["${POD_NAME}.node.*.${POD_NAMESPACE}.es.local"]}',
        {"other_names": (OtherName("1.3.6.1.4.1.311.20.2.3", "web-0.node.es.team-a.es.local"),)},
        False,  # the same value under another OID (a Windows UPN) is another claim
    ),
    # subject fields, exact
    (
        'subject: {organizations: ["Team A", "Team *"]}',
        {"subject": (("organizations", "Team B"),)},
        True,
    ),
    (
        'subject: {organizations: ["Team *"]}',
        {"subject": (("organizations", "system:masters"),)},
        False,
    ),
    (
        'subject: {organizations: ["Team *"]}',
        {"subject": (("organizationalunits", "Team B"),)},
        False,
    ),
    (
        'subject: {"0.9.2342.19200300.100.1.25": ["example"]}',
        {"subject": (("0.9.2342.19200300.100.1.25", "example"),)},
        True,
    ),
]


@pytest.mark.parametrize(("body", "fields", "allowed"), GLOB_CASES)
def test_patterns_for_every_kind_of_name(
    body: str, fields: dict[str, object], allowed: bool
) -> None:
    assert verdict(one_rule(body), request(**fields)) == ("allowed:r" if allowed else "denied")


def test_a_variable_value_is_literal_text_never_a_glob() -> None:
    p = one_rule('dns-names: ["${POD_NAME}.web.svc"]')
    # A pod name with dots matches only itself, not a wider pattern.
    assert verdict(p, request(pod="a.b", dns_names=("a.b.web.svc",))) == "allowed:r"
    assert verdict(p, request(pod="a.b", dns_names=("axb.web.svc",))) == "denied"
    assert verdict(p, request(pod="a", dns_names=("ab.web.svc",))) == "denied"


# --- keys, lifetime, CA, namespaces, several rules ------------------------------------------------

OTHER_CASES = [
    (
        "keys: [{algorithm: RSA, min-size: 3072}]",
        {"key_algorithm": KeyAlgorithm.RSA, "key_size": 2048},
        False,
    ),
    (
        "keys: [{algorithm: RSA, min-size: 3072}]",
        {"key_algorithm": KeyAlgorithm.RSA, "key_size": 4096},
        True,
    ),
    (
        "keys: [{algorithm: RSA, min-size: 3072}]",
        {"key_algorithm": KeyAlgorithm.ECDSA, "key_size": 256},
        False,
    ),
    (
        "keys: [{algorithm: ecdsa, min-size: 384}]",
        {"key_algorithm": KeyAlgorithm.ECDSA, "key_size": 256},
        False,
    ),
    ("keys: [{algorithm: ECDSA}]", {"key_algorithm": KeyAlgorithm.ECDSA, "key_size": 256}, True),
    (
        "keys: [{algorithm: Ed25519}]",
        {"key_algorithm": KeyAlgorithm.ED25519, "key_size": None},
        True,
    ),
    ("is-ca: false", {"key_algorithm": KeyAlgorithm.ED25519, "key_size": None}, True),
    ("max-duration: 24h", {"duration_seconds": 24 * 3600}, True),
    ("max-duration: 24h", {"duration_seconds": 24 * 3600 + 1}, False),
    ("max-duration: 24h", {"duration_seconds": None}, True),  # capped, see below
    ("is-ca: true", {"is_ca": True}, True),
    ("is-ca: false", {"is_ca": True}, False),
    ("max-duration: 1h", {"is_ca": True}, False),  # is-ca defaults to false
]


@pytest.mark.parametrize(("body", "fields", "allowed"), OTHER_CASES)
def test_keys_lifetime_and_ca_flag(body: str, fields: dict[str, object], allowed: bool) -> None:
    assert verdict(one_rule(body), request(**fields)) == ("allowed:r" if allowed else "denied")


def test_max_duration_is_the_cap_for_requests_without_a_duration() -> None:
    assert one_rule("max-duration: 24h").check(request()) == PolicyDecision("r", 24 * 3600)
    assert one_rule("is-ca: false").check(request()) == PolicyDecision("r", None)


@pytest.mark.parametrize(
    ("namespaces", "namespace", "selected"),
    [
        ('["team-a"]', "team-a", True),
        ('["team-a"]', "team-ab", False),
        ('["team-*"]', "team-b", True),
        ('["team-*"]', "x-team-b", False),
        ('["*"]', "anything", True),
        ('["a", "b"]', "b", True),
        ("[]", "a", False),
    ],
)
def test_rules_select_namespaces_by_name_and_glob(
    namespaces: str, namespace: str, selected: bool
) -> None:
    p = one_rule('dns-names: ["**"]', namespaces=namespaces)
    req = request(namespace=namespace, dns_names=("x.y",))
    if selected:
        assert verdict(p, req) == "allowed:r"
    else:
        with pytest.raises(PolicyViolation, match=f'no rule for namespace "{namespace}"'):
            p.check(req)


TWO_RULES = """
rules:
  - name: team-a-ca
    namespaces: ["team-a"]
    dns-names: ["ca.team-a.svc"]
    is-ca: true
  - name: everyone
    namespaces: ["*"]
    dns-names: ["**.${POD_NAMESPACE}.svc"]
  - name: also-everyone
    namespaces: ["*"]
    dns-names: ["**"]
    max-duration: 1h
"""


def test_one_rule_must_allow_the_whole_request_and_the_first_such_rule_decides() -> None:
    p = policy(TWO_RULES)
    assert p.check(request(dns_names=("ca.team-a.svc",), is_ca=True)).rule == "team-a-ca"
    assert p.check(request(dns_names=("ca.team-a.svc",))).rule == "team-a-ca"  # first wins
    assert p.check(request(dns_names=("web.team-a.svc",))) == PolicyDecision("everyone")
    assert p.check(request(dns_names=("evil.com",))) == PolicyDecision("also-everyone", 3600)
    # Rules never add up: team-a-ca's is-ca does not extend to names only another rule allows.
    with pytest.raises(PolicyViolation) as info:
        p.check(request(dns_names=("ca.team-a.svc", "web.team-a.svc"), is_ca=True))
    message = info.value.message
    assert info.value.rule == "team-a-ca"
    assert 'rule "team-a-ca" does not allow DNS name "web.team-a.svc"' in message
    assert 'rule "everyone" does not allow CA certificates' in message
    assert 'rule "also-everyone" does not allow CA certificates' in message
    # A namespace only the catch-all rules select never sees team-a-ca.
    with pytest.raises(PolicyViolation) as other:
        p.check(request(namespace="team-b", dns_names=("ca.team-a.svc",), is_ca=True))
    assert "team-a-ca" not in other.value.message


# --- the file format ------------------------------------------------------------------------------

BROKEN = [
    ("rules: [", "not valid YAML"),
    ("- a", "must be a mapping with a 'rules' list"),
    ("rules: []", "'rules' must be a non-empty list"),
    ("rulez: []", "unknown top-level key 'rulez'"),
    ("version: 2\nrules: [{namespaces: ['*']}]", "version 2 is not supported"),
    ("rules: [{dns-names: ['a']}]", "rules[0]: 'namespaces' is required"),
    ("rules: [{namespaces: ['*'], dns-name: ['a']}]", "rules[0]: unknown key 'dns-name'"),
    ("rules: [{namespaces: ['*'], dns-names: 'a.b'}]", "rules[0].dns-names must be a list"),
    (
        "rules: [{namespaces: ['*'], dns-names: ['a**.b']}]",
        "rules[0].dns-names[0]: 'a**.b': '**' must be a whole segment",
    ),
    ("rules: [{namespaces: ['*'], dns-names: ['${POD_IP}.x']}]", "unknown variable ${POD_IP}"),
    ("rules: [{namespaces: ['*'], dns-names: ['${POD_NAME.x']}]", "unterminated"),
    (
        "rules: [{namespaces: ['*'], dns-names: ['']}]",
        "rules[0].dns-names[0]: a pattern must be a non-empty string",
    ),
    ("rules: [{namespaces: ['*'], dns-names: [' a.b']}]", "leading or trailing spaces"),
    (
        "rules: [{namespaces: ['${POD_NAMESPACE}']}]",
        "rules[0].namespaces[0]: '${POD_NAMESPACE}': variables are not allowed here",
    ),
    ("rules: [{namespaces: ['*'], email-sans: ['nobody']}]", "not an email pattern"),
    ("rules: [{namespaces: ['*'], email-sans: ['**@x.y']}]", "'**' is not allowed before the '@'"),
    (
        "rules: [{namespaces: ['*'], ip-sans: ['10.0.0.1/8']}]",
        "rules[0].ip-sans[0]: '10.0.0.1/8' is not a CIDR",
    ),
    ("rules: [{namespaces: ['*'], ip-sans: ['pod-ip']}]", "nor pod-ips"),
    ("rules: [{namespaces: ['*'], other-names: {'x.y': ['a']}}]", "'x.y' is not a dotted OID"),
    ("rules: [{namespaces: ['*'], other-names: ['a']}]", "other-names must be a mapping"),
    ("rules: [{namespaces: ['*'], subject: {cn: ['a']}}]", "unknown field 'cn'"),
    ("rules: [{namespaces: ['*'], max-duration: 30d}]", "rules[0].max-duration"),
    ("rules: [{namespaces: ['*'], max-duration: 0s}]", "must be positive"),
    ("rules: [{namespaces: ['*'], keys: [{algorithm: DSA}]}]", "must be RSA, ECDSA or Ed25519"),
    (
        "rules: [{namespaces: ['*'], keys: [{algorithm: Ed25519, min-size: 1}]}]",
        "Ed25519 keys have no size",
    ),
    ("rules: [{namespaces: ['*'], keys: [{algorithm: RSA, min-size: big}]}]", "positive integer"),
    ("rules: [{namespaces: ['*'], keys: []}]", "non-empty list"),
    ("rules: [{namespaces: ['*'], is-ca: 'yes'}]", "rules[0].is-ca must be true or false"),
    (
        "rules: [{name: a, namespaces: ['*']}, {name: a, namespaces: ['*']}]",
        "rules[1]: the name 'a' is used twice",
    ),
]


@pytest.mark.parametrize(("text", "problem"), BROKEN)
def test_a_broken_policy_is_refused_naming_where(text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "broken.yaml")
    assert problem in str(info.value)


def test_settings_must_be_dns_names() -> None:
    with pytest.raises(PolicyError, match="--cluster-domain"):
        default_policy(cluster_domain="Cluster Local")
