"""Tests for agent.spec.attributes / agent.spec.templating: volume_context -> CertificateSpec."""

from __future__ import annotations

import json
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import assume, given
from hypothesis import strategies as st

from agent.errors import InvalidArgument
from agent.pki.csr import build_csr, build_general_names, build_subject, usages_to_extensions
from agent.pki.keys import generate_private_key
from agent.spec.attributes import (
    ATTRIBUTE_NAMES,
    COMPAT_PREFIX,
    KEY_USAGES,
    MAX_ANNOTATION_BYTES,
    MAX_ANNOTATIONS,
    MAX_CONTEXT_BYTES,
    OWN_PREFIX,
    POD_INFO_PREFIX,
    expand_template,
    parse_go_duration,
    parse_volume_context,
)
from agent.spec.model import (
    DEFAULT_DURATION_SECONDS,
    CertificateSpec,
    FileNames,
    IssuerRef,
    KeyAlgorithm,
    KeyEncoding,
    KeySpec,
    OtherName,
    Pkcs12Spec,
    PodInfo,
    SubjectSpec,
)
from agent.spec.templating import expand_entries, rfc4514_escape

POD_CONTEXT = {
    "csi.storage.k8s.io/pod.name": "es-transport-0",
    "csi.storage.k8s.io/pod.namespace": "elastic",
    "csi.storage.k8s.io/pod.uid": "0c5e5e0e-3b1f-4c55-9c6a-1f2f0b7c9d11",
    "csi.storage.k8s.io/serviceAccount.name": "elasticsearch",
    "csi.storage.k8s.io/ephemeral": "true",
}
POD = PodInfo(
    name="es-transport-0",
    namespace="elastic",
    uid="0c5e5e0e-3b1f-4c55-9c6a-1f2f0b7c9d11",
    service_account="elasticsearch",
)
CM = COMPAT_PREFIX
OWN = OWN_PREFIX


def parse(attrs: dict[str, str]) -> CertificateSpec:
    spec, pod = parse_volume_context({**POD_CONTEXT, **attrs})
    assert pod == POD
    return spec


def invalid(attrs: dict[str, str], *, pod: dict[str, str] | None = None) -> InvalidArgument:
    context = {**(POD_CONTEXT if pod is None else pod), **attrs}
    with pytest.raises(InvalidArgument) as info:
        parse_volume_context(context)
    assert info.value.code == "INVALID_ARGUMENT"
    return info.value


def with_cn(**extra: str) -> dict[str, str]:
    """A minimal valid volume plus ``extra`` (keys given without prefix, cert-manager prefix)."""
    return {CM + "common-name": "app", **{CM + k.replace("_", "-"): v for k, v in extra.items()}}


# --- the seed's volume and the prefixes ----------------------------------------------------------

SEED_ATTRIBUTES = {
    "csi.cert-manager.io/issuer-name": "ca-cluster-issuer",
    "csi.cert-manager.io/issuer-kind": "ClusterIssuer",
    "csi.cert-manager.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local",
}


def test_seed_cert_manager_attributes_parse_to_the_expected_spec() -> None:
    spec = parse(SEED_ATTRIBUTES)
    assert spec == CertificateSpec(
        issuer=IssuerRef(name="ca-cluster-issuer", kind="ClusterIssuer", group="cert-manager.io"),
        dns_names=("es-transport-0.elastic.svc.cluster.local",),
        duration_seconds=None,
        renew_before_seconds=None,
        key=KeySpec(algorithm=KeyAlgorithm.RSA, size=2048, encoding=KeyEncoding.PKCS1),
        key_usages=("digital signature", "key encipherment"),
        files=FileNames(certificate="tls.crt", ca="ca.crt", private_key="tls.key"),
    )
    assert not spec.issuer.is_local


def test_own_prefix_gives_the_same_spec_and_prefixes_mix() -> None:
    own = {k.replace(CM, OWN): v for k, v in SEED_ATTRIBUTES.items()}
    assert parse(own) == parse(SEED_ATTRIBUTES)
    mixed = {OWN + "issuer-name": "ca-cluster-issuer", CM + "dns-names": "a.example.com"}
    assert parse(mixed).issuer.name == "ca-cluster-issuer"


def test_same_key_under_both_prefixes_is_an_error_naming_both() -> None:
    err = invalid({CM + "dns-names": "a.example.com", OWN + "dns-names": "a.example.com"})
    assert CM + "dns-names" in err.message
    assert OWN + "dns-names" in err.message


def test_spec_survives_a_json_round_trip() -> None:
    spec = parse(
        {
            OWN + "dns-names": "a.example.com",
            OWN + "other-names": "2.5.4.3=${POD_NAME}.node.es.default.es.local",
            OWN + "organizations": "Example",
            OWN + "pkcs12-enable": "true",
            OWN + "pkcs12-password": "changeit",
            "example.com/team": "search",
        }
    )
    assert CertificateSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# --- pod info -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["pod.name", "pod.namespace", "pod.uid"])
def test_missing_pod_info_names_the_key_and_the_fix(suffix: str) -> None:
    pod = {k: v for k, v in POD_CONTEXT.items() if k != POD_INFO_PREFIX + suffix}
    err = invalid(SEED_ATTRIBUTES, pod=pod)
    assert POD_INFO_PREFIX + suffix in err.message
    assert "podInfoOnMount: true" in err.message


def test_persistent_volume_is_refused() -> None:
    err = invalid(SEED_ATTRIBUTES, pod={**POD_CONTEXT, POD_INFO_PREFIX + "ephemeral": "false"})
    assert "only inline ephemeral volumes are supported" in err.message
    assert POD_INFO_PREFIX + "ephemeral" in err.message


@pytest.mark.parametrize("value", ["True", " true ", "TRUE", ""])
def test_ephemeral_must_be_exactly_what_kubelet_sends(value: str) -> None:
    # The CSI layer accepts only "true"; the attribute parser must agree, not loosen it.
    err = invalid(SEED_ATTRIBUTES, pod={**POD_CONTEXT, POD_INFO_PREFIX + "ephemeral": value})
    assert POD_INFO_PREFIX + "ephemeral" in err.message


def test_other_pod_info_keys_are_ignored_and_service_account_is_optional() -> None:
    pod = {k: v for k, v in POD_CONTEXT.items() if "serviceAccount" not in k}
    pod[POD_INFO_PREFIX + "serviceAccount.tokens"] = '{"aud": {"token": "x"}}'
    spec, info = parse_volume_context({**pod, **SEED_ATTRIBUTES})
    assert info.service_account == ""
    assert spec.annotations == ()
    err = invalid({CM + "uri-sans": "spiffe://td/sa/${SERVICE_ACCOUNT_NAME}"}, pod=pod)
    assert "serviceAccount.name" in err.message
    assert CM + "uri-sans" in err.message


# --- keys ---------------------------------------------------------------------------------------


def test_unknown_key_under_our_prefix_suggests_the_close_one() -> None:
    err = invalid({**SEED_ATTRIBUTES, CM + "dns-name": "b.example.com"})
    assert CM + "dns-name" in err.message
    assert f"did you mean {CM}dns-names" in err.message
    err = invalid({**SEED_ATTRIBUTES, OWN + "frobnicate": "yes"})
    assert OWN + "frobnicate" in err.message
    assert "did you mean" not in err.message


def test_key_without_prefix_is_unknown() -> None:
    err = invalid({**SEED_ATTRIBUTES, "dns-names": "b.example.com"})
    assert '"dns-names"' in err.message
    assert f"did you mean {OWN}dns-names" in err.message


def test_misspelt_prefix_is_an_error_not_an_annotation() -> None:
    err = invalid({**SEED_ATTRIBUTES, "csi.cert-manger.io/dns-names": "b.example.com"})
    assert "csi.cert-manger.io/dns-names" in err.message
    assert f"did you mean {CM}dns-names" in err.message


def test_foreign_prefixes_become_sorted_annotations() -> None:
    spec = parse({**SEED_ATTRIBUTES, "z.example.com/b": "2", "example.com/a": "${POD_NAME}"})
    assert spec.annotations == (("example.com/a", "${POD_NAME}"), ("z.example.com/b", "2"))


def test_foreign_key_must_be_a_valid_annotation_key() -> None:
    err = invalid({**SEED_ATTRIBUTES, "Example.com/x y": "1"})
    assert "Example.com/x y" in err.message


def test_value_size_cap() -> None:
    assert parse({**SEED_ATTRIBUTES, "example.com/big": "x" * 4096})
    err = invalid({**SEED_ATTRIBUTES, "example.com/big": "é" * 2049})
    assert "example.com/big" in err.message
    assert "4096" in err.message


def test_empty_value_means_not_set() -> None:
    spec = parse({**SEED_ATTRIBUTES, CM + "common-name": "", CM + "duration": "  "})
    assert spec.subject.common_name is None
    assert spec.duration_seconds is None


def test_several_problems_are_reported_together() -> None:
    err = invalid(with_cn(is_ca="yes", duration="1d", key_usages="server-auth"))
    for key in ("is-ca", "duration", "key-usages"):
        assert CM + key in err.message
    assert "3 problems" in err.message


# --- templating ---------------------------------------------------------------------------------


def test_expand_template_forms() -> None:
    key = OWN + "dns-names"
    assert expand_template("${POD_NAME}.${POD_NAMESPACE}", POD, key) == "es-transport-0.elastic"
    assert expand_template("$POD_NAME.$POD_NAMESPACE", POD, key) == "es-transport-0.elastic"
    assert expand_template("urn:$POD_UID", POD, key) == f"urn:{POD.uid}"
    assert expand_template("${SERVICE_ACCOUNT_NAME}", POD, key) == "elasticsearch"
    assert expand_template("cost $5, $-x, end$", POD, key) == "cost $5, $-x, end$"


def test_expansion_is_a_single_pass() -> None:
    pod = PodInfo(name="${POD_UID}", namespace="ns", uid="u", service_account="sa")
    assert expand_template("${POD_NAME}", pod, "k") == "${POD_UID}"


@pytest.mark.parametrize("text", ["${POD_ADDRESS}", "$POD_NAMEX", "${pod_name}"])
def test_unknown_variable_is_named_and_known_ones_listed(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        expand_template(text, POD, CM + "common-name")
    message = info.value.message
    assert CM + "common-name" in message
    assert text.strip("${}") in message
    for known in ("${POD_NAME}", "${POD_NAMESPACE}", "${POD_UID}", "${SERVICE_ACCOUNT_NAME}"):
        assert known in message


@pytest.mark.parametrize("text", ["${POD_NAME", "a.${", "${}"])
def test_malformed_variable_is_an_error(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        expand_template(text, POD, CM + "dns-names")
    assert CM + "dns-names" in info.value.message


def test_templated_value_is_validated_after_expansion() -> None:
    err = invalid({CM + "dns-names": "${POD_NAME}_x.svc"})
    assert '"es-transport-0_x.svc"' in err.message
    assert "${POD_NAME}_x.svc" in err.message
    pod = {**POD_CONTEXT, POD_INFO_PREFIX + "pod.name": "a" * 60}
    err = invalid({CM + "common-name": "${POD_NAME}.${POD_NAMESPACE}"}, pod=pod)
    assert CM + "common-name" in err.message
    assert "64" in err.message


def test_every_templated_attribute_is_expanded() -> None:
    spec = parse(
        {
            OWN + "common-name": "${POD_NAME}",
            OWN + "dns-names": "${POD_NAME}.svc",
            OWN + "uri-sans": "spiffe://cluster.local/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME",
            OWN + "email-sans": "${POD_NAME}@example.com",
            OWN + "other-names": "2.5.4.3=${POD_NAME}.node.es.default.es.local",
            OWN + "organizations": "org-${POD_NAMESPACE}",
            OWN + "organizationalunits": "${POD_NAME}",
            OWN + "provinces": "${POD_NAMESPACE}",
            OWN + "localities": "${POD_NAMESPACE}",
            OWN + "streetaddresses": "${POD_NAMESPACE}",
            OWN + "postalcodes": "${POD_NAMESPACE}",
        }
    )
    assert spec.subject.common_name == "es-transport-0"
    assert spec.dns_names == ("es-transport-0.svc",)
    assert spec.uris == ("spiffe://cluster.local/ns/elastic/sa/elasticsearch",)
    assert spec.emails == ("es-transport-0@example.com",)
    assert spec.other_names == (OtherName("2.5.4.3", "es-transport-0.node.es.default.es.local"),)
    assert spec.subject.organizations == ("org-elastic",)
    assert spec.subject.organizational_units == ("es-transport-0",)
    assert spec.subject.postal_codes == ("elastic",)
    literal = parse({OWN + "literal-subject": "CN=${POD_NAME},O=Example"})
    assert literal.subject.literal_subject == "CN=es-transport-0,O=Example"


def test_untemplated_attributes_keep_dollar_as_text() -> None:
    spec = parse(with_cn(certificate_file="$POD_NAME.crt", issuer_name="ca"))
    assert spec.files.certificate == "$POD_NAME.crt"
    err = invalid(with_cn(ip_sans="${POD_NAME}"))
    assert "${POD_IP}" in err.message  # ip-sans takes only the pod-IP variables
    assert "unknown variable" not in err.message
    err = invalid(with_cn(issuer_name="${POD_NAMESPACE}-issuer"))
    assert "not a valid Kubernetes object name" in err.message


# --- valid values and normalisation -------------------------------------------------------------


def test_san_normalisation() -> None:
    spec = parse(
        {
            CM + "dns-names": " A.Example.COM ,*.example.com, a.example.com., localhost",
            CM + "ip-sans": "10.0.0.1, 2001:DB8:0:0:0:0:0:1,10.0.0.1",
            CM + "uri-sans": "urn:uuid:1234,https://example.com/x",
            CM + "email-sans": "Admin@Example.COM",
            CM + "other-names": "1.3.6.1.4.1.311.20.2.3=user@example.com",
        }
    )
    assert spec.dns_names == ("a.example.com", "*.example.com", "localhost")
    assert spec.ip_addresses == ("10.0.0.1", "2001:db8::1")
    assert spec.uris == ("urn:uuid:1234", "https://example.com/x")
    assert spec.emails == ("Admin@example.com",)
    assert spec.other_names == (OtherName("1.3.6.1.4.1.311.20.2.3", "user@example.com"),)


def test_key_options() -> None:
    assert parse(with_cn()).key == KeySpec(KeyAlgorithm.RSA, 2048, KeyEncoding.PKCS1, False)
    assert parse(with_cn(key_size="3072", key_encoding="pkcs8")).key == KeySpec(
        KeyAlgorithm.RSA, 3072, KeyEncoding.PKCS8
    )
    assert parse(with_cn(key_algorithm="ecdsa")).key == KeySpec(
        KeyAlgorithm.ECDSA, 256, KeyEncoding.PKCS8
    )
    assert parse(with_cn(key_algorithm="ECDSA", key_size="521")).key.size == 521
    assert parse(with_cn(key_algorithm="ED25519", reuse_private_key="TRUE")).key == KeySpec(
        KeyAlgorithm.ED25519, None, KeyEncoding.PKCS8, True
    )


def test_other_options() -> None:
    spec = parse(
        with_cn(
            duration="1h30m",
            renew_before="1.5m",
            key_usages="Server Auth, client auth,server auth",
            is_ca="True",
            fs_group="4294967294",
            certificate_file="cert.pem",
            ca_file="ca.pem",
            privatekey_file="key.pem",
            pkcs12_enable="true",
            pkcs12_filename="tls.p12",
            pkcs12_password="s3cret",
            countries="de,Fr",
            serialnumber="SN 42",
            issuer_name="vault",
            issuer_kind="VaultIssuer",
            issuer_group="vault.example.com",
        )
    )
    assert spec.duration_seconds == 5400
    assert spec.renew_before_seconds == 90
    assert spec.key_usages == ("server auth", "client auth")
    assert spec.is_ca is True
    assert spec.fs_group == 4294967294
    assert spec.files == FileNames("cert.pem", "ca.pem", "key.pem")
    assert spec.pkcs12 == Pkcs12Spec(filename="tls.p12", password="s3cret")
    assert spec.subject == SubjectSpec(
        common_name="app", countries=("DE", "FR"), serial_number="SN 42"
    )
    assert spec.issuer == IssuerRef("vault", "VaultIssuer", "vault.example.com")


def test_renew_before_against_the_default_duration() -> None:
    assert parse(with_cn(renew_before="2159h")).renew_before_seconds == 2159 * 3600
    err = invalid(with_cn(renew_before="2160h"))
    assert CM + "renew-before" in err.message
    assert DEFAULT_DURATION_SECONDS == 2160 * 3600


def test_key_usages_vocabulary() -> None:
    assert {"digital signature", "key encipherment", "server auth", "client auth"} <= KEY_USAGES
    assert len(KEY_USAGES) == 23
    err = invalid(with_cn(key_usages="server auth,serverauth"))
    assert '"serverauth"' in err.message
    for usage in KEY_USAGES:
        assert usage in err.message


# --- every invalid class names the full key -----------------------------------------------------

LONG_LABEL = "a" * 64
INVALID_CASES: list[tuple[str, str, str]] = [
    # (attribute without prefix, value, fragment the message must contain)
    ("dns-names", "foo_bar.example.com", '"foo_bar"'),
    ("dns-names", "-a.example.com", "'-'"),
    ("dns-names", f"{LONG_LABEL}.example.com", "63"),
    ("dns-names", ".".join(["abcdefghi"] * 26), "253"),
    ("dns-names", "a.*.example.com", "wildcard"),
    ("dns-names", "f*.example.com", "wildcard"),
    ("dns-names", "*", "wildcard"),
    ("dns-names", "a..example.com", "empty label"),
    ("dns-names", "a.example.com,,b.example.com", "empty entry"),
    ("dns-names", "a.example.com,", "empty entry"),
    ("dns-names", "10.0.0.1", "ip-sans"),
    ("dns-names", "bücher.example", "punycode"),
    ("dns-names", "a b.example.com", '"a b"'),
    ("ip-sans", "10.0.0.256", '"10.0.0.256"'),
    ("ip-sans", "fe80::1%eth0", "zone"),
    ("ip-sans", "example.com", '"example.com"'),
    ("uri-sans", "example.com/path", "absolute URI"),
    ("uri-sans", "https://exa mple.com", "whitespace"),
    ("uri-sans", "https://", "empty authority"),
    ("uri-sans", "spiffe:", "absolute URI"),
    ("uri-sans", "http://[::1/x", "not a valid URI"),
    ("uri-sans", "https://example.com:99999/", "not a valid URI"),
    ("uri-sans", "https://bücher.example/", "non-ASCII"),
    ("email-sans", "nobody", "local@domain"),
    ("email-sans", "a@b_c.example", '"b_c"'),
    ("email-sans", "a..b@example.com", "before '@'"),
    ("email-sans", "@example.com", "local@domain"),
    ("email-sans", "a@*.example.com", "wildcard"),
    ("other-names", "2.5.4.3", "OID=value"),
    ("other-names", "2.5.4.3=", "OID=value"),
    ("other-names", "3.5.4.3=x", "not an OID"),
    ("other-names", "2=x", "not an OID"),
    ("other-names", "1.40.1=x", "not an OID"),
    ("other-names", "2.05.4=x", "not an OID"),
    ("other-names", "cn=x", "not an OID"),
    ("common-name", "x" * 65, "64"),
    ("common-name", "a\x00b", "control"),
    ("literal-subject", "not a dn", "RFC 4514"),
    ("literal-subject", "C=DEU", "not a valid subject"),
    ("literal-subject", "CN=#0101", "hex"),
    ("organizations", "Example,", "empty entry"),
    ("organizations", "x" * 65, "64"),
    ("countries", "DEU", '"DEU"'),
    ("countries", "1A", '"1A"'),
    ("postalcodes", "1" * 41, "40"),
    ("serialnumber", "ünprintable", "serial number"),
    ("serialnumber", "1" * 65, "serial number"),
    ("duration", "1d", '"d"'),
    ("duration", "0", "at least 1s"),
    ("duration", "0s", "at least 1s"),
    ("duration", "-1h", "at least 1s"),
    ("duration", "500ms", "at least 1s"),
    ("duration", "90", "unit"),
    ("duration", "one hour", "Go duration"),
    ("duration", "${POD_UID}", "Go duration"),
    ("renew-before", "0s", "at least 1s"),
    ("renew-before", "3000h", "shorter than"),
    ("renew-before", "-5m", "at least 1s"),
    ("key-algorithm", "DSA", "RSA, ECDSA or Ed25519"),
    ("key-size", "1024", "2048"),
    ("key-size", "8193", "8192"),
    ("key-size", "2k", '"2k"'),
    ("key-size", "+2048", '"+2048"'),
    ("key-size", "256", "key-algorithm"),
    ("key-encoding", "DER", "PKCS1 or PKCS8"),
    ("reuse-private-key", "yes", '"true" or "false"'),
    ("is-ca", "1", '"true" or "false"'),
    ("pkcs12-enable", "on", '"true" or "false"'),
    ("key-usages", "server-auth", "server auth"),
    ("key-usages", "signing,", "empty entry"),
    ("issuer-name", "Bad_Name", "Kubernetes object name"),
    ("issuer-name", "a" * 254, "253"),
    ("certificate-file", "a/b", "'/'"),
    ("ca-file", ".hidden", "'.'"),
    ("privatekey-file", "..", "'.'"),
    ("privatekey-file", " key.pem", "spaces"),
    ("certificate-file", "a\x00b", "control"),
    ("ca-file", "é" * 128, "255 bytes"),
    ("certificate-file", "tls.key", "tls.key"),
    ("fs-group", "0", "1 to 4294967294"),
    ("fs-group", "-1", "1 to 4294967294"),
    ("fs-group", "4294967295", "1 to 4294967294"),
    ("fs-group", "root", '"root"'),
    ("pkcs12-password", "pw", "pkcs12-enable is not true"),
    ("pkcs12-filename", "ks.p12", "pkcs12-enable is not true"),
]


@pytest.mark.parametrize("prefix", [CM, OWN])
@pytest.mark.parametrize(("name", "value", "fragment"), INVALID_CASES)
def test_invalid_value_names_the_full_key(
    prefix: str, name: str, value: str, fragment: str
) -> None:
    identity = {prefix + "dns-names": "ok.example.com"} if name != "dns-names" else {}
    err = invalid({**identity, prefix + name: value})
    assert prefix + name in err.message
    assert err.attribute == prefix + name
    assert fragment in err.message


@pytest.mark.parametrize(
    ("attrs", "key", "fragment"),
    [
        ({"issuer-kind": "ClusterIssuer"}, "issuer-kind", "issuer-kind needs"),
        ({"issuer-group": "example.com"}, "issuer-group", "issuer-group needs"),
        ({"issuer-name": "ca", "issuer-kind": "Cluster-Issuer"}, "issuer-kind", "not a valid kind"),
        ({"issuer-name": "ca", "issuer-kind": "clusterissuer"}, "issuer-kind", "ClusterIssuer?"),
        ({"issuer-name": "ca", "issuer-group": "Example.COM"}, "issuer-group", "API group"),
        ({"key-algorithm": "Ed25519", "key-size": "256"}, "key-size", "Ed25519"),
        ({"key-algorithm": "ECDSA", "key-size": "255"}, "key-size", "256, 384 or 521"),
        ({"key-algorithm": "ECDSA", "key-encoding": "PKCS1"}, "key-encoding", "PKCS8"),
        ({"key-algorithm": "Ed25519", "key-encoding": "pkcs1"}, "key-encoding", "PKCS8"),
        ({"duration": "1h", "renew-before": "1h"}, "renew-before", "duration"),
        ({"literal-subject": "CN=a", "organizations": "x"}, "literal-subject", "organizations"),
        ({"literal-subject": "CN=a", "serialnumber": "1"}, "literal-subject", "serialnumber"),
        ({"pkcs12-enable": "true"}, "pkcs12-password", "required"),
        (
            {"pkcs12-enable": "true", "pkcs12-password": "p", "pkcs12-filename": "tls.crt"},
            "pkcs12-filename",
            "tls.crt",
        ),
    ],
)
def test_invalid_combination_names_the_full_key(
    attrs: dict[str, str], key: str, fragment: str
) -> None:
    for prefix in (CM, OWN):
        context = {
            prefix + "dns-names": "ok.example.com",
            **{prefix + k: v for k, v in attrs.items()},
        }
        err = invalid(context)
        assert prefix + key in err.message
        assert fragment in err.message


def test_literal_subject_alone_is_an_identity_but_not_with_common_name() -> None:
    assert parse({CM + "literal-subject": "CN=a,O=b"}).subject.literal_subject == "CN=a,O=b"
    err = invalid({CM + "literal-subject": "CN=a", CM + "common-name": "a"})
    assert CM + "literal-subject" in err.message
    assert CM + "common-name" in err.message


def test_a_certificate_must_identify_something() -> None:
    err = invalid({CM + "issuer-name": "ca", CM + "organizations": "Example"})
    assert "identify nothing" in err.message
    assert CM + "dns-names" in err.message


# --- secrets ------------------------------------------------------------------------------------


SECRET = "Pa55-w0rd-never-shown"


@pytest.mark.parametrize(
    "attrs",
    [
        {CM + "pkcs12-password": SECRET},
        {CM + "pkcs12-password": SECRET, CM + "pkcs12-enable": "maybe"},
        {CM + "pkcs12-password": SECRET, OWN + "pkcs12-password": SECRET},
        {CM + "pkcs12-password": SECRET + "x" * 5000, CM + "pkcs12-enable": "true"},
        {CM + "pkcs12-password": SECRET, CM + "pkcs12-enable": "true", CM + "fs-group": "x"},
    ],
)
def test_password_never_appears_in_errors(attrs: dict[str, str]) -> None:
    err = invalid({CM + "dns-names": "a.example.com", **attrs})
    assert SECRET not in err.message
    assert SECRET not in str(err)


def test_password_not_in_repr() -> None:
    spec = parse(with_cn(pkcs12_enable="true", pkcs12_password=SECRET))
    assert spec.pkcs12 is not None and spec.pkcs12.password == SECRET
    assert SECRET not in repr(spec)


# --- property tests -----------------------------------------------------------------------------

LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
DNS_NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(lambda n: len(n) <= 253)


def _looks_like_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@given(
    names=st.lists(DNS_NAME, min_size=1, max_size=5),
    upper=st.booleans(),
    wildcard=st.booleans(),
)
def test_valid_dns_names_round_trip(names: list[str], upper: bool, wildcard: bool) -> None:
    assume(not any(_looks_like_ip(n) for n in names))
    if wildcard:
        names = ["*." + names[0], *names[1:]]
        assume(len(names[0]) <= 253)
    text = ", ".join(n.upper() if upper else n for n in names)
    spec = parse({CM + "dns-names": text})
    assert spec.dns_names == tuple(dict.fromkeys(names))


KEYS = st.one_of(
    st.builds(
        lambda p, n: p + n, st.sampled_from([OWN, CM]), st.sampled_from(sorted(ATTRIBUTE_NAMES))
    ),
    st.sampled_from([*POD_CONTEXT, "example.com/x", "x"]),
    st.text(max_size=30),
)
VALUES = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="$ {},.=:/@*-aZ09_", max_size=30),
    st.sampled_from(["true", "false", "2160h", "ECDSA", "256", "${POD_NAME}", "CN=x", "2.5.4.3=x"]),
)


@given(extra=st.dictionaries(KEYS, VALUES, max_size=8), with_pod=st.booleans())
def test_arbitrary_input_only_ever_raises_invalid_argument(
    extra: dict[str, str], with_pod: bool
) -> None:
    context = {**(POD_CONTEXT if with_pod else {}), **extra}
    try:
        spec, _ = parse_volume_context(context)
    except InvalidArgument as exc:
        assert exc.message
        if exc.attribute is not None and exc.attribute.isprintable() and exc.attribute.isascii():
            assert exc.attribute in exc.message
    else:
        assert isinstance(spec, CertificateSpec)
        assert CertificateSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@given(password=st.text(min_size=1, max_size=20), extra=st.dictionaries(KEYS, VALUES, max_size=6))
def test_generated_password_never_appears_in_errors(password: str, extra: dict[str, str]) -> None:
    secret = "SECRET#" + password
    assume(not any(secret in k or secret in v for k, v in extra.items()))
    context = {**POD_CONTEXT, **extra, CM + "pkcs12-password": secret}
    try:
        spec, _ = parse_volume_context(context)
    except InvalidArgument as exc:
        assert secret not in exc.message
    else:
        assert secret not in repr(spec)


# Reference for Go's time.ParseDuration, written independently of the implementation: a regex
# for the grammar and exact rational arithmetic, truncating each component to nanoseconds.
_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9}
_UNIT_NS |= {"m": 60 * 10**9, "h": 3600 * 10**9}
_COMPONENT = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def reference_duration(text: str) -> float | None:
    sign = -1 if text.startswith("-") else 1
    body = text[1:] if text.startswith(("-", "+")) else text
    if body == "0":
        return 0.0
    pos, total = 0, 0
    if not body:
        return None
    while pos < len(body):
        match = _COMPONENT.match(body, pos)
        if not match or match.group(1) in ("", "."):
            return None
        total += int(Fraction(match.group(1).rstrip(".") or "0") * _UNIT_NS[match.group(2)])
        pos = match.end()
    if total > (1 << 63) - (0 if sign < 0 else 1):
        return None
    return sign * total / 1e9


COMPONENTS = st.lists(
    st.tuples(
        st.from_regex(r"\A[0-9]{0,12}\Z"),
        st.one_of(st.just(""), st.from_regex(r"\A\.[0-9]{0,12}\Z")),
        st.sampled_from(sorted(_UNIT_NS)),
    ),
    min_size=1,
    max_size=4,
)


@given(sign=st.sampled_from(["", "-", "+"]), components=COMPONENTS)
def test_go_duration_agrees_with_reference(
    sign: str, components: list[tuple[str, str, str]]
) -> None:
    text = sign + "".join(w + f + u for w, f, u in components)
    expected = reference_duration(text)
    if expected is None:
        with pytest.raises(ValueError):
            parse_go_duration(text)
    else:
        assert parse_go_duration(text) == pytest.approx(expected, rel=1e-15, abs=1e-12)


@given(st.text(max_size=20))
def test_go_duration_on_arbitrary_text(text: str) -> None:
    expected = reference_duration(text)
    if expected is None:
        with pytest.raises(ValueError):
            parse_go_duration(text)
    else:
        assert parse_go_duration(text) == pytest.approx(expected, rel=1e-15, abs=1e-12)


# Cases from Go's own time package tests (value in nanoseconds; None = error).
GO_CASES: list[tuple[str, int | None]] = [
    ("0", 0),
    ("5s", 5 * 10**9),
    ("-5s", -5 * 10**9),
    ("+5s", 5 * 10**9),
    ("-0", 0),
    ("+0", 0),
    ("5.6s", 5_600_000_000),
    ("5.s", 5 * 10**9),
    (".5s", 500_000_000),
    ("1.004s", 1_004_000_000),
    ("100.00100s", 100_001_000_000),
    ("10ns", 10),
    ("11us", 11_000),
    ("12µs", 12_000),
    ("12μs", 12_000),
    ("13ms", 13_000_000),
    ("15m", 15 * 60 * 10**9),
    ("16h", 16 * 3600 * 10**9),
    ("3h30m", 210 * 60 * 10**9),
    ("10.5s4m", 250_500_000_000),
    ("-2m3.4s", -123_400_000_000),
    ("1h2m3s4ms5us6ns", 3_723_004_005_006),
    ("39h9m14.425s", 140_954_425_000_000),
    ("0.830103483285477580700h", 2_988_372_539_827),
    ("9223372036854775807ns", (1 << 63) - 1),
    ("9223372036s854ms775us807ns", (1 << 63) - 1),
    ("-9223372036854775808ns", -(1 << 63)),
    ("", None),
    ("3", None),
    ("-", None),
    ("s", None),
    (".", None),
    ("-.", None),
    (".s", None),
    ("+.s", None),
    ("1d", None),
    ("\x85\x85", None),
    ("9223372036854775808ns", None),
    ("9223372036854775.808us", None),
    ("9223372036854ms775us808ns", None),
]


@pytest.mark.parametrize(("text", "nanoseconds"), GO_CASES)
def test_go_duration_matches_go(text: str, nanoseconds: int | None) -> None:
    if nanoseconds is None:
        with pytest.raises(ValueError):
            parse_go_duration(text)
    else:
        assert parse_go_duration(text) == pytest.approx(nanoseconds / 1e9, rel=1e-15)


def test_text_that_is_not_utf8_is_refused_with_an_encodable_message() -> None:
    err = invalid({**SEED_ATTRIBUTES, "example.com/x": "\ud800"})
    assert "example.com/x" in err.message
    err = invalid({**SEED_ATTRIBUTES, "\udcff": "x"})
    err.message.encode("utf-8")


# --- what the parser accepts, the CSR builder can encode -----------------------------------------


def test_parsed_eck_volume_becomes_a_csr_that_openssl_reads(tmp_path: Path) -> None:
    spec = parse(
        {
            CM + "issuer-name": "ca-cluster-issuer",
            CM + "issuer-kind": "ClusterIssuer",
            CM + "dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc.cluster.local,*.es.local",
            CM + "ip-sans": "10.1.2.3,fd00::1",
            CM
            + "uri-sans": "spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}",
            CM + "email-sans": "ops@example.com",
            CM + "other-names": "2.5.4.3=${POD_NAME}.node.es.${POD_NAMESPACE}.es.local",
            CM + "common-name": "${POD_NAME}",
            CM + "organizations": "Example",
            CM + "key-algorithm": "ECDSA",
            CM + "key-usages": "server auth,client auth,digital signature",
        }
    )
    csr_path = tmp_path / "req.pem"
    csr_path.write_bytes(build_csr(generate_private_key(spec.key), spec))
    result = subprocess.run(
        ["openssl", "req", "-in", str(csr_path), "-noout", "-text", "-verify"],
        capture_output=True,
        text=True,
        check=True,
    )
    text = result.stdout + result.stderr
    assert "verify OK" in text
    assert "DNS:es-transport-0.elastic.svc.cluster.local" in text
    assert "DNS:*.es.local" in text
    assert "IP Address:10.1.2.3" in text
    assert "URI:spiffe://cluster.local/ns/elastic/sa/elasticsearch" in text
    assert "email:ops@example.com" in text
    assert "es-transport-0.node.es.elastic.es.local" in text
    assert "CN=es-transport-0" in text.replace(" = ", "=")


@given(extra=st.dictionaries(KEYS, VALUES, max_size=8))
def test_every_accepted_spec_encodes(extra: dict[str, str]) -> None:
    try:
        spec, _ = parse_volume_context({**POD_CONTEXT, **extra})
    except InvalidArgument:
        return
    name = build_subject(spec.subject)
    name.public_bytes()
    x509.SubjectAlternativeName(build_general_names(spec)).public_bytes()
    usages_to_extensions(spec.key_usages, is_ca=spec.is_ca)


# --- pod info is checked before it is expanded (issue 8: template injection) ---------------------


@pytest.mark.parametrize(
    ("suffix", "value"),
    [
        ("pod.name", "a,evil.attacker.com"),
        ("pod.name", "x,O=Evil Corp"),
        ("pod.name", "Es-0"),
        ("pod.name", "a" * 254),
        ("pod.name", "es-0 "),
        ("pod.namespace", "elastic.evil"),
        ("pod.namespace", "a" * 64),
        ("pod.uid", "not-a-uuid"),
        ("pod.uid", "0c5e5e0e-3b1f-4c55-9c6a-1f2f0b7c9d11,x"),
        ("serviceAccount.name", "sa,evil.attacker.com"),
    ],
)
def test_pod_info_that_breaks_the_kubernetes_name_rules_is_refused_naming_the_key(
    suffix: str, value: str
) -> None:
    key = POD_INFO_PREFIX + suffix
    err = invalid(
        {CM + "dns-names": "${POD_NAME}.svc", CM + "organizations": "${POD_NAME}"},
        pod={**POD_CONTEXT, key: value},
    )
    assert err.attribute == key
    assert err.message.startswith(f"{key} is ")
    rule = {"pod.namespace": "DNS-1123 label", "pod.uid": "UUID"}.get(suffix, "DNS-1123 subdomain")
    assert rule in err.message


def test_pod_info_at_the_limits_of_the_name_rules_is_accepted() -> None:
    name = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters
    pod = {
        **POD_CONTEXT,
        POD_INFO_PREFIX + "pod.name": name,
        POD_INFO_PREFIX + "pod.namespace": "n" * 63,
        POD_INFO_PREFIX + "pod.uid": "0C5E5E0E-3B1F-4C55-9C6A-1F2F0B7C9D11",
    }
    _spec, info = parse_volume_context({**pod, CM + "common-name": "app"})
    assert info.name == name and len(name) == 253


EVIL = PodInfo(
    name="a,evil.attacker.com",
    namespace="x,O=Evil Corp",
    uid="0c5e5e0e-3b1f-4c55-9c6a-1f2f0b7c9d11",
    service_account="sa",
)


def test_lists_are_split_before_they_are_expanded() -> None:
    # Even a pod value that got past the name rules stays inside its own entry.
    assert expand_entries("${POD_NAME}.svc, b.example.com", EVIL, CM + "dns-names") == (
        "a,evil.attacker.com.svc",
        "b.example.com",
    )
    assert expand_entries("${POD_NAMESPACE}", EVIL, CM + "organizations") == ("x,O=Evil Corp",)


def test_a_literal_subject_cannot_gain_attributes_through_a_template() -> None:
    text = expand_template(
        "CN=${POD_NAME},OU=${POD_NAMESPACE}", EVIL, CM + "literal-subject", escape=rfc4514_escape
    )
    name = x509.Name.from_rfc4514_string(text)
    assert [(a.oid, a.value) for a in name] == [
        (x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "x,O=Evil Corp"),
        (x509.NameOID.COMMON_NAME, "a,evil.attacker.com"),
    ]
    for special in ("#lead", "trail ", 'q"uo+te;<>\\'):
        escaped = rfc4514_escape(special)
        assert x509.Name.from_rfc4514_string(f"CN={escaped}").rfc4514_string() == (
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, special)]).rfc4514_string()
        )


def test_templated_literal_subject_keeps_its_structure_end_to_end() -> None:
    spec = parse({CM + "literal-subject": "CN=${POD_NAME},O=Example"})
    assert spec.subject.literal_subject == "CN=es-transport-0,O=Example"


# --- per-volume metadata limits (issue 8: tmpfs exhaustion) ---------------------------------------


def test_too_many_passthrough_annotations_are_refused_naming_the_limit() -> None:
    annotations = {f"example.com/a{i}": "x" for i in range(MAX_ANNOTATIONS + 1)}
    err = invalid({CM + "common-name": "app", **annotations})
    assert f"{MAX_ANNOTATIONS + 1} attributes under other prefixes" in err.message
    assert f"at most {MAX_ANNOTATIONS} are allowed per volume" in err.message
    # The limit itself is fine.
    allowed = dict(list(annotations.items())[:MAX_ANNOTATIONS])
    assert len(parse({CM + "common-name": "app", **allowed}).annotations) == MAX_ANNOTATIONS


def test_passthrough_annotations_bigger_than_the_byte_limit_are_refused() -> None:
    annotations = {f"example.com/a{i}": "x" * 3000 for i in range(3)}
    err = invalid({CM + "common-name": "app", **annotations})
    assert f"at most {MAX_ANNOTATION_BYTES} are allowed per volume" in err.message


def test_volume_context_bigger_than_the_total_limit_is_refused() -> None:
    big = {OWN + name: "x" * 4000 for name in ("organizations", "localities", "provinces")}
    big.update(
        {OWN + n: "y" * 4000 for n in ("organizationalunits", "streetaddresses", "postalcodes")}
    )
    big.update({OWN + n: "a.b," * 1000 for n in ("dns-names", "uri-sans", "email-sans")})
    big[OWN + "common-name"] = "app"
    err = invalid(big)
    assert f"at most {MAX_CONTEXT_BYTES} are allowed per volume" in err.message


def test_an_overlong_attribute_key_is_refused_and_quoted_short() -> None:
    err = invalid({CM + "common-name": "app", "example.com/" + "k" * 10_000: "x"})
    assert "characters long; at most 317" in err.message
    assert len(err.message) < 400


@given(value=st.text(min_size=1, max_size=80))
def test_no_pod_value_can_add_a_san_or_a_subject_attribute(value: str) -> None:
    for suffix in ("pod.name", "pod.namespace", "serviceAccount.name"):
        context = {
            **POD_CONTEXT,
            POD_INFO_PREFIX + suffix: value,
            CM
            + "dns-names": "${POD_NAME}-${POD_NAMESPACE}-${SERVICE_ACCOUNT_NAME}.svc,b.example.com",
            CM + "organizations": "${POD_NAME}${POD_NAMESPACE}${SERVICE_ACCOUNT_NAME}",
        }
        try:
            spec, _pod = parse_volume_context(context)
        except InvalidArgument:
            continue
        assert len(spec.dns_names) == 2
        assert len(spec.subject.organizations) == 1
        literal = {
            **{k: v for k, v in context.items() if k != CM + "organizations"},
            CM + "literal-subject": "CN=${POD_NAME}${POD_NAMESPACE}${SERVICE_ACCOUNT_NAME},O=Ex",
        }
        subject = parse_volume_context(literal)[0].subject.literal_subject
        assert subject is not None
        assert len(x509.Name.from_rfc4514_string(subject)) == 2
