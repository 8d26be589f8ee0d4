"""The fake API server refuses PCR statuses exactly where the real one does (422), so the signer
tests prove the agent's statuses pass the real rules; and it serves the PCR field selectors."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fake_pcr import PCRS, install, pcr_body, validate_status
from tests.fakekube import ApiError, FakeKube, make_test_ca

Obj = dict[str, Any]
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
CA_KEY, CA_CERT = make_test_ca("fake test CA")


def pod(name: str, node: str = "node-1") -> Obj:
    return {
        "metadata": {"name": name, "namespace": "apps", "uid": f"uid-{name}"},
        "spec": {"nodeName": node, "serviceAccountName": "web"},
    }


def leaf(public_key: Any, not_before: dt.datetime, lifetime: dt.timedelta) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(CA_CERT.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("web-0.apps.pod.cluster.local")]), True
        )
        .sign(CA_KEY, hashes.SHA256())
    )


def rfc3339(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def issued(cert: x509.Certificate, refresh: dt.datetime | None = None) -> Obj:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    return {
        "conditions": [
            {
                "type": "Issued",
                "status": "True",
                "reason": "Issued",
                "message": "ok",
                "lastTransitionTime": rfc3339(NOW),
            }
        ],
        "certificateChain": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "notBefore": rfc3339(nb),
        "beginRefreshAt": rfc3339(refresh or nb + (na - nb) / 2),
        "notAfter": rfc3339(na),
    }


def denied(reason: str = "PodMismatch") -> Obj:
    return {
        "conditions": [
            {
                "type": "Denied",
                "status": "True",
                "reason": reason,
                "message": "no",
                "lastTransitionTime": rfc3339(NOW),
            }
        ]
    }


@pytest.fixture
def created(fake: FakeKube) -> tuple[FakeKube, Obj, Any]:
    install(fake)
    made = pcr_body(name="web-0-pcr", pod=pod("web-0"), signer="cert-agent.io/pod-identity")
    return fake, fake.create(PCRS, "apps", made.body), made.key


def put_status(fake: FakeKube, obj: Obj, status: Obj) -> Obj:
    body = copy.deepcopy(obj)
    body["status"] = status
    return fake.update(PCRS, "apps", body, status_only=True)


def test_a_valid_issued_status_is_accepted_once(created: tuple[FakeKube, Obj, Any]) -> None:
    fake, obj, key = created
    assert obj["spec"]["maxExpirationSeconds"] == 86400  # defaulted like the API server
    cert = leaf(key.public_key(), NOW, dt.timedelta(hours=24))
    stored = put_status(fake, obj, issued(cert))
    with pytest.raises(ApiError) as err:
        put_status(fake, stored, denied())
    assert err.value.code == 422 and "immutable after" in err.value.message


def _other_key() -> Any:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


BAD_STATUSES: dict[str, tuple[Callable[[Any], Obj], str]] = {
    "wrong key": (
        lambda key: issued(leaf(_other_key(), NOW, dt.timedelta(hours=2))),
        "not issued to the requested key",
    ),
    "too short": (
        lambda key: issued(leaf(key, NOW, dt.timedelta(minutes=59))),
        "lifetime must be >= 1 hour",
    ),
    "too long": (
        lambda key: issued(leaf(key, NOW, dt.timedelta(hours=25))),
        "maxExpirationSeconds",
    ),
    "refresh too early": (
        lambda key: issued(leaf(key, NOW, dt.timedelta(hours=2)), NOW + dt.timedelta(minutes=9)),
        "beginRefreshAt",
    ),
    "refresh too late": (
        lambda key: issued(
            leaf(key, NOW, dt.timedelta(hours=2)), NOW + dt.timedelta(hours=1, minutes=51)
        ),
        "beginRefreshAt",
    ),
    "not before in the past": (
        lambda key: issued(leaf(key, NOW - dt.timedelta(minutes=6), dt.timedelta(hours=2))),
        "within 5 minutes",
    ),
    "not before differs": (
        lambda key: {
            **issued(leaf(key, NOW, dt.timedelta(hours=2))),
            "notBefore": rfc3339(NOW + dt.timedelta(seconds=1)),
        },
        "status.notBefore",
    ),
    "key in the chain": (
        lambda key: {
            **issued(leaf(key, NOW, dt.timedelta(hours=2))),
            "certificateChain": issued(leaf(key, NOW, dt.timedelta(hours=2)))["certificateChain"]
            + "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        },
        "CERTIFICATE PEM blocks",
    ),
    "denied with a chain": (
        lambda key: {
            **denied(),
            "certificateChain": issued(leaf(key, NOW, dt.timedelta(hours=2)))["certificateChain"],
        },
        "non-condition status fields must be empty",
    ),
    "bad reason": (lambda key: denied("no good"), "condition reason"),
    "two terminal conditions": (
        lambda key: {
            "conditions": denied()["conditions"]
            + issued(leaf(key, NOW, dt.timedelta(hours=2)))["conditions"]
        },
        "at most one condition",
    ),
    "unknown condition type": (
        lambda key: {"conditions": [{**denied()["conditions"][0], "type": "Approved"}]},
        "Unsupported value",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STATUSES))
def test_statuses_that_break_the_rules_are_refused(
    created: tuple[FakeKube, Obj, Any], case: str
) -> None:
    fake, obj, key = created
    make, message = BAD_STATUSES[case]
    with pytest.raises(ApiError) as err:
        put_status(fake, obj, make(key.public_key()))
    assert err.value.code == 422
    assert message in err.value.message
    assert "status" not in fake.get(PCRS, "apps", "web-0-pcr")  # nothing written


def test_spec_is_immutable_and_status_only_moves_to_a_terminal_state(
    created: tuple[FakeKube, Obj, Any],
) -> None:
    fake, obj, _key = created
    changed = copy.deepcopy(obj)
    changed["spec"]["podName"] = "web-1"
    with pytest.raises(ApiError, match="immutable"):
        fake.update(PCRS, "apps", changed)
    assert validate_status(obj, {"conditions": []}, NOW) == []  # nothing changes: fine


def test_field_selectors_of_pcrs(created: tuple[FakeKube, Obj, Any]) -> None:
    from tests.fakekube import _selected

    fake, obj, _key = created
    other = pcr_body(name="far", pod=pod("far-0", "node-2"), signer="example.com/x").body
    far = fake.create(PCRS, "apps", other)
    for selector, expected in (
        ("spec.nodeName=node-1,spec.signerName=cert-agent.io/pod-identity", {"web-0-pcr"}),
        ("spec.nodeName=node-2", {"far"}),
        ("spec.podName=web-0", {"web-0-pcr"}),
        ("spec.signerName!=example.com/x", {"web-0-pcr"}),
    ):
        hits = {o["metadata"]["name"] for o in (obj, far) if _selected(PCRS, o, None, selector)}
        assert hits == expected, selector
    with pytest.raises(ApiError):
        _selected(PCRS, obj, None, "spec.serviceAccountName=web")
