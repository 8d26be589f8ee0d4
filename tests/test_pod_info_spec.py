"""The pure parts: pod-IP SANs in a CertificateSpec, trust-bundle attributes, JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import InvalidArgument
from agent.spec.attributes import parse_volume_context
from agent.spec.model import CertificateSpec, PodIPSans, TrustBundleKind
from agent.spec.trust import parse_trust_bundle

POD = {
    "csi.storage.k8s.io/pod.name": "web-0",
    "csi.storage.k8s.io/pod.namespace": "apps",
    "csi.storage.k8s.io/pod.uid": "3f0c9a52-7d0e-4c1b-9a61-2b4f8e6d5c13",
}
OWN = "csi.cert-agent.io/"


def parse(**attrs: str) -> CertificateSpec:
    context = {**POD, **{OWN + k.replace("_", "-"): v for k, v in attrs.items()}}
    return parse_volume_context(context, "node-1")[0]


def test_pod_ip_variables_are_deferred_and_filled_from_the_watch() -> None:
    spec = parse(dns_names="a.example", ip_sans="10.0.0.1,${POD_IP}")
    assert spec.pod_ip_sans is PodIPSans.PRIMARY and spec.ip_addresses == ("10.0.0.1",)
    assert spec.with_pod_ips(()).ip_addresses == ("10.0.0.1",)
    assert spec.with_pod_ips(("10.0.0.9", "fd00::9")).ip_addresses == ("10.0.0.1", "10.0.0.9")
    every = parse(dns_names="a.example", ip_sans="$POD_IPS,${POD_IP}")
    assert every.pod_ip_sans is PodIPSans.ALL
    assert every.with_pod_ips(("10.0.0.9", "fd00::9")).ip_addresses == ("10.0.0.9", "fd00::9")
    # An IP that is already a static entry is not repeated.
    assert parse(dns_names="a", ip_sans="10.0.0.9,${POD_IP}").with_pod_ips(
        ("10.0.0.9",)
    ).ip_addresses == ("10.0.0.9",)
    assert not parse(dns_names="a.example").wants_pod_ips


def test_node_name_expands_everywhere_templated() -> None:
    spec = parse(dns_names="${NODE_NAME}.nodes", common_name="$NODE_NAME")
    assert spec.dns_names == ("node-1.nodes",) and spec.subject.common_name == "node-1"
    with pytest.raises(InvalidArgument, match="node's name is not known"):
        parse_volume_context({**POD, OWN + "dns-names": "${NODE_NAME}.x"})


@pytest.mark.parametrize(
    ("attrs", "attribute", "words"),
    [
        ({"dns_names": "${POD_IP}.x"}, "dns-names", "only be IP SANs"),
        ({"dns_names": "a", "uri_sans": "https://${POD_IP}/"}, "uri-sans", "only be IP SANs"),
        ({"dns_names": "a", "ip_sans": "${POD_IP}/32"}, "ip-sans", "whole entries"),
        ({"ip_sans": "${POD_IPS}"}, "ip-sans", "first certificate needs another name"),
        ({"dns_names": "a", "trust_bundle_include_issuer": "yes"}, "trust-bundle-include", ""),
        (
            {"dns_names": "a", "trust_bundle_configmap": "Roots/ca.crt"},
            "trust-bundle-configmap",
            "",
        ),
        ({"dns_names": "a", "trust_bundle_cluster": "a_b"}, "trust-bundle-cluster", ""),
        (
            {
                "dns_names": "a",
                "trust_bundle_signer": "x.io/y",
                "trust_bundle_label_selector": "a b",
            },
            "trust-bundle-label-selector",
            "label selector term",
        ),
    ],
)
def test_bad_inputs_name_the_attribute(attrs: dict[str, str], attribute: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(**attrs)
    assert OWN + attribute in info.value.message
    assert words in info.value.message


def test_trust_bundle_attributes_and_json_round_trip() -> None:
    spec = parse(
        dns_names="a",
        ip_sans="${POD_IPS}",
        trust_bundle_signer="example.com/roots",
        trust_bundle_label_selector="env in (prod, staging),!legacy",
        trust_bundle_include_issuer="true",
        credential_bundle_file="tls.pem",
    )
    ref = spec.trust_bundle
    assert ref is not None and ref.kind is TrustBundleKind.SIGNER and ref.include_issuer
    assert ref.describe("apps") == (
        "ClusterTrustBundles of signer example.com/roots with labels env in (prod, staging),!legacy"
    )
    assert spec.files.credential_bundle == "tls.pem"
    assert CertificateSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # Metadata written before these fields existed still loads.
    old = spec.to_dict()
    for name in ("pod_ip_sans", "trust_bundle"):
        del old[name]
    del old["files"]["credential_bundle"]
    assert CertificateSpec.from_dict(old).trust_bundle is None


def test_configmap_source_is_in_the_pods_namespace() -> None:
    ref = parse_trust_bundle(
        {"trust-bundle-configmap": (OWN + "trust-bundle-configmap", "roots/ca.crt")}
    )
    assert ref is not None and (ref.kind, ref.name, ref.key) == (
        TrustBundleKind.CONFIGMAP,
        "roots",
        "ca.crt",
    )
    assert ref.describe("apps") == "ConfigMap apps/roots key ca.crt"


def test_pod_watch_setting_from_flag_env_and_file(tmp_path: Path) -> None:
    from agent.cli import build_parser
    from agent.config import ConfigError, resolve

    def resolved(*argv: str, environ: dict[str, str] | None = None) -> str:
        args = build_parser().parse_args(["serve", "--standalone", *argv])
        return resolve(args, environ=environ or {}).pod_watch

    assert resolved() == "auto"
    assert resolved("--pod-watch", "on") == "on"
    assert resolved(environ={"CERT_AGENT_POD_WATCH": "OFF"}) == "off"
    config = tmp_path / "config.yaml"
    config.write_text("pod-watch: true\n")
    assert resolved("--config", str(config)) == "on"
    with pytest.raises(ConfigError, match="--pod-watch 'sometimes' must be auto, on or off"):
        resolved("--pod-watch", "sometimes")
