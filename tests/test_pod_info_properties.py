"""Property-based: whatever pod-info values arrive in the volume context (the
``csi.storage.k8s.io/*`` keys kubelet fills in, but anything that reaches the socket can send),
a certificate only ever carries what its template expands to for a valid pod, and a refused
request leaves nothing behind (issue 8, template injection).

Same real agent and sandbox as tests/test_target_properties.py (its mount-table and tree
invariants are checked after every request); hypothesis mixes valid pod names, namespaces, uids,
service accounts and ``ephemeral`` flags with hostile ones: commas, ``=``, ``O=Evil Corp``,
``${...}`` templates, unicode, NUL, very long, empty, uppercase, dots. For every OK answer the
issued tls.crt is parsed with ``cryptography`` and its SANs and subject must be exactly the
template expanded with those values, computed here independently of the agent's code.

CERT_AGENT_HYPOTHESIS_EXAMPLES sets the number of examples (`make soak` raises it).
"""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.client import publish_request
from tests.conftest import IS_ROOT, RunningAgent
from tests.test_target_properties import Sandbox, build_sandbox, check_invariants, tree

EXAMPLES = int(os.environ.get("CERT_AGENT_HYPOTHESIS_EXAMPLES", "100"))
PREFIX = "csi.storage.k8s.io/"
OWN = "csi.cert-agent.io/"
# Codes a request may get; INTERNAL or UNKNOWN would be a finding.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}
# Templates a pod author may write, each using the pod's values in SANs and subject fields.
TEMPLATES: list[dict[str, str]] = [
    {
        "dns-names": (
            "${POD_NAME}.${POD_NAMESPACE}.svc,${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local"
        ),
        "common-name": "${POD_NAME}",
        "organizations": "${POD_NAMESPACE}",
    },
    {
        "literal-subject": "CN=${POD_NAME},O=${POD_NAMESPACE},OU=${SERVICE_ACCOUNT_NAME}",
        "uri-sans": "spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}",
    },
    {
        "dns-names": "${POD_UID}.pods.example",
        "email-sans": "${SERVICE_ACCOUNT_NAME}@${POD_NAMESPACE}.example",
        "organizationalunits": "${SERVICE_ACCOUNT_NAME},team",
    },
]
# The issuance policy is a second line of defence (it would refuse most injected names with
# PERMISSION_DENIED); allowing every value here puts the template expansion and the pod-info
# checks alone under test.
PERMISSIVE_POLICY = """\
rules:
  - name: anything
    namespaces: ["*"]
    dns-names: ["**"]
    uri-sans: ["**"]
    email-sans: ["*@**"]
    subject:
      common-name: ["**"]
      organizations: ["**"]
      organizationalunits: ["**"]
"""
SUBJECT_OIDS = {
    "common-name": NameOID.COMMON_NAME,
    "organizations": NameOID.ORGANIZATION_NAME,
    "organizationalunits": NameOID.ORGANIZATIONAL_UNIT_NAME,
}
LITERAL_OIDS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
}
# Values that must never reach a certificate: each one tries to add a SAN or a subject
# attribute, or to be expanded again, or is simply not a Kubernetes name.
HOSTILE = [
    "a,evil.example.com",
    "web,O=Evil Corp",
    "O=Evil Corp",
    "x=y",
    "web+CN=admin",
    'a"b',
    "a\\,b",
    "a;b",
    "${POD_NAMESPACE}",
    "$POD_UID",
    "${NODE_NAME}",
    "${",
    "wéb",
    "web\u200b",
    "web\x00evil",
    "web\n",
    " web",
    "WEB",
    "Web.Example",
    "-web",
    "web-",
    "web.",
    ".web",
    "a..b",
    "a/b",
    "spiffe://evil/ns/x",
    "x@evil.example",
    "",
    " ",
    "a" * 64,
    "a" * 254,
    ("a" * 63 + ".") * 4,
]


@dataclass(frozen=True)
class PodInfoValues:
    """The pod-info part of one volume context; None means the key is absent."""

    name: str | None
    namespace: str | None
    uid: str | None
    service_account: str | None
    ephemeral: str | None

    def context(self) -> dict[str, str]:
        keys = {
            "pod.name": self.name,
            "pod.namespace": self.namespace,
            "pod.uid": self.uid,
            "serviceAccount.name": self.service_account,
            "ephemeral": self.ephemeral,
        }
        return {PREFIX + k: v for k, v in keys.items() if v is not None}


def hostile_text() -> st.SearchStrategy[str]:
    # Lone surrogates cannot even be serialised by the client; everything else may be sent.
    chars = st.characters(codec="utf-8")
    return st.one_of(
        st.sampled_from(HOSTILE),
        st.text(chars, max_size=20),
        st.text(alphabet="aZ9-.,=+$ {}\x00é", min_size=1, max_size=20),
    )


def valid_name(max_len: int, dots: bool) -> st.SearchStrategy[str]:
    """Valid Kubernetes names: short, with dots, and as long as allowed."""
    label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
    parts = st.lists(label, min_size=1, max_size=3 if dots else 1).map(".".join)
    longest = ".".join(["a" * 63] * 4)[:max_len] if dots else "n" * max_len
    return st.one_of(*[parts] * 7, st.just(longest))


FIELDS = ("name", "namespace", "uid", "service_account", "ephemeral")


def pod_info_strategy(own_uid: str) -> st.SearchStrategy[PodInfoValues]:
    """Valid values for the pod, then none, one or two of its fields made hostile or absent."""
    uids = st.sampled_from([own_uid, own_uid, own_uid.upper(), str(uuid.uuid4())])
    valid = st.builds(
        PodInfoValues,
        valid_name(253, dots=True),
        valid_name(63, dots=False),
        uids,
        st.one_of(*[valid_name(253, dots=True)] * 3, st.just("")),
        st.sampled_from(["true", "true", None]),
    )
    # kubelet sends exactly "true" for inline volumes (older kubelets send nothing).
    hostile_ephemeral = st.sampled_from(["false", "", "True", " true ", "yes", "O=Evil Corp"])
    replacement = st.one_of(hostile_text(), hostile_text(), hostile_ephemeral, st.none())
    spoil = st.lists(st.tuples(st.sampled_from(FIELDS), replacement), max_size=2)
    return st.one_of(valid, st.builds(_spoiled, valid, spoil))


def _spoiled(values: PodInfoValues, changes: list[tuple[str, str | None]]) -> PodInfoValues:
    return replace(values, **dict(changes))


def is_valid(values: PodInfoValues) -> bool:
    """The Kubernetes rules for pod-info values, written out here (not the agent's code)."""
    label = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"

    def subdomain(v: str | None) -> bool:
        return (
            v is not None and len(v) <= 253 and re.fullmatch(rf"{label}(\.{label})*", v) is not None
        )

    return (
        subdomain(values.name)
        and values.namespace is not None
        and len(values.namespace) <= 63
        and re.fullmatch(label, values.namespace) is not None
        and values.uid is not None
        and _is_uuid(values.uid)
        and (not values.service_account or subdomain(values.service_account))
        and values.ephemeral in (None, "true")
    )


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower() and len(text) == 36
    except ValueError:
        return False


def expand(template: str, values: PodInfoValues) -> str:
    return (
        template.replace("${POD_NAME}", values.name or "")
        .replace("${POD_NAMESPACE}", values.namespace or "")
        .replace("${POD_UID}", values.uid or "")
        .replace("${SERVICE_ACCOUNT_NAME}", values.service_account or "")
    )


def expected_certificate(
    template: dict[str, str], values: PodInfoValues
) -> tuple[set[str], set[str], set[str], Counter[tuple[str, str]]]:
    """(DNS SANs, URI SANs, email SANs, subject attributes) the template yields for values."""
    dns = {expand(e, values).lower() for e in template.get("dns-names", "").split(",") if e}
    uris = {expand(e, values) for e in template.get("uri-sans", "").split(",") if e}
    emails = {expand(e, values) for e in template.get("email-sans", "").split(",") if e}
    subject: Counter[tuple[str, str]] = Counter()
    for name, oid in SUBJECT_OIDS.items():
        for entry in template.get(name, "").split(",") if name in template else []:
            subject[(oid.dotted_string, expand(entry, values))] += 1
    if "literal-subject" in template:
        # Valid pod values hold nothing RFC 4514 would escape, so a plain split is exact.
        for part in template["literal-subject"].split(","):
            key, _, value = part.partition("=")
            subject[(LITERAL_OIDS[key].dotted_string, expand(value, values))] += 1
    return dns, uris, emails, subject


def actual_certificate(
    target: Path,
) -> tuple[set[str], set[str], set[str], Counter[tuple[str, str]]]:
    cert = x509.load_pem_x509_certificate((target / "tls.crt").read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        entries = list(san)
    except x509.ExtensionNotFound:
        entries = []
    known = (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name)
    assert all(isinstance(e, known) for e in entries), f"unexpected SAN type in {entries}"
    dns = [e.value.lower() for e in entries if isinstance(e, x509.DNSName)]
    uris = [e.value for e in entries if isinstance(e, x509.UniformResourceIdentifier)]
    emails = [e.value for e in entries if isinstance(e, x509.RFC822Name)]
    for kind in (dns, uris, emails):
        assert len(kind) == len(set(kind)), f"duplicate SAN in {entries}"
    subject: Counter[tuple[str, str]] = Counter(
        (a.oid.dotted_string, str(a.value)) for a in cert.subject
    )
    return set(dns), set(uris), set(emails), subject


@dataclass
class Tally:
    examples: int = 0
    requests: int = 0
    valid_sent: int = 0
    certificates: int = 0

    def __post_init__(self) -> None:
        self.answers: Counter[str] = Counter()


def publish(
    box: Sandbox, tally: Tally, pod_index: int, values: PodInfoValues, template: dict[str, str]
) -> None:
    pod = box.pods[pod_index]
    data_root = box.agent.config.data_root
    store = box.agent.agent.store
    live_before = {m.volume_id for m in store.metas()}
    crt_before = (pod.target / "tls.crt").read_bytes() if pod.volume_id in live_before else b""
    data_before = tree(data_root, data_root / "never")
    attributes = {OWN + k: v for k, v in template.items()}
    attributes[OWN + "key-algorithm"] = "ECDSA"
    context = {**attributes, **values.context()}
    message = publish_request(
        volume_id=pod.volume_id, target_path=str(pod.target), volume_context=context
    )
    before = tree(box.root, data_root)
    try:
        box.agent.client.publish(message)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in ALLOWED, f"{values}: {code} {exc.details()}"
    tally.requests += 1
    tally.answers[code.name] += 1
    tally.valid_sent += is_valid(values)
    check_invariants(box, before)
    if code == grpc.StatusCode.OK:
        # Idempotent repeats answer OK for the volume as first published; only a first
        # publish must carry these values.
        if pod.volume_id not in live_before:
            assert is_valid(values), f"accepted invalid pod info {values}"
            tally.certificates += 1
            assert actual_certificate(pod.target) == expected_certificate(template, values), (
                f"{values} {template}"
            )
        return
    # A refusal changes nothing: no metadata, key, payload or mount for a new volume, and a
    # live volume keeps its certificate.
    assert {m.volume_id for m in store.metas()} == live_before
    assert tree(data_root, data_root / "never") == data_before
    if pod.volume_id in live_before:
        assert (pod.target / "tls.crt").read_bytes() == crt_before
    else:
        assert not os.path.ismount(pod.target) and not pod.target.exists()


def unpublish_all(box: Sandbox, tally: Tally) -> None:
    for pod in box.pods[:3]:
        before = tree(box.root, box.agent.config.data_root)
        box.agent.client.unpublish(pod.volume_id, str(pod.target))
        tally.requests += 1
        tally.answers["OK"] += 1
        check_invariants(box, before)


@pytest.mark.mount
@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")
def test_pod_info_never_reaches_a_certificate_unchecked(
    agent_factory: object, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(PERMISSIVE_POLICY)
    running: RunningAgent = agent_factory(grpc_workers=2, policy_file=policy)  # type: ignore[operator]
    box = build_sandbox(running, tmp_path)
    tally = Tally()
    # Pods 0-2 have ordinary directories (3-5 are the path traps of the target test).
    one = st.integers(0, 2).flatmap(
        lambda i: st.tuples(
            st.just(i), pod_info_strategy(box.pods[i].uid), st.sampled_from(TEMPLATES)
        )
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(one, min_size=1, max_size=4))
    def run(sequence: list[tuple[int, PodInfoValues, dict[str, str]]]) -> None:
        tally.examples += 1
        try:
            for pod_index, values, template in sequence:
                box.pods[pod_index].target.parent.mkdir(parents=True, exist_ok=True)
                publish(box, tally, pod_index, values, template)
        finally:
            # Each example starts with no live volume, also when hypothesis replays a failure.
            unpublish_all(box, tally)

    run()
    print(
        f"\nhypothesis: {tally.examples} examples, {tally.requests} requests "
        f"({tally.valid_sent} publishes with valid pod info, {tally.certificates} certificates "
        f"checked), {dict(tally.answers)}"
    )
    # Both sides were exercised: certificates were issued and hostile values refused.
    assert tally.certificates > 0 and tally.answers["INVALID_ARGUMENT"] > 0
