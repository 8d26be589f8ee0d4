"""PodCertificateRequests (certificates.k8s.io/v1beta1) for the fake API server, and a fake kubelet.

``install(fake)`` registers the kind with ``tests.fakekube.FakeKube``: namespaced, a ``status``
subresource, the field selectors the real server supports (``metadata.name``, ``spec.signerName``,
``spec.podName``, ``spec.nodeName``), and the API server's validation (pkg/apis/certificates/
validation), written from its rules:

create: signer name syntax (no ``kubernetes.io`` lifetimes over 24h), pod/service account/node
names and UIDs, ``maxExpirationSeconds`` required (the server defaults it to 86400; so does the
fake) in [3600, 7862400], the subject key (``stubPKCS10Request`` whose signature verifies, or
``pkixPublicKey`` with a ``proofOfPossession`` over the pod UID) of an allowed type;

spec updates: the spec is immutable; status updates (the rules a signer must meet): at most one
of Issued/Denied/Failed, with status True, no other condition types, metav1.Condition rules; a
terminal status never changes; Denied/Failed carry nothing but conditions; Issued needs a chain
of CERTIFICATE PEM blocks only whose leaf is issued to the requested key, notBefore/notAfter equal
to the leaf's, notBefore within 5 minutes of the server's clock, a lifetime of at least one hour
and at most maxExpirationSeconds, and beginRefreshAt at least 10 minutes inside both ends.

``FakeKubelet`` plays kubelet's side: a key of the asked type, the request (stub or legacy form).
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from tests.fakekube import _EXTRA_FIELDS, ApiError, Cause, FakeKube, Resource, invalid

Obj = dict[str, Any]
Problem = tuple[str, str, str]  # field, reason, message

GROUP, VERSION, PLURAL, KIND = (
    "certificates.k8s.io",
    "v1beta1",
    "podcertificaterequests",
    "PodCertificateRequest",
)
TERMINAL = ("Issued", "Denied", "Failed")
DEFAULT_MAX_EXPIRATION = 86400
MIN_MAX_EXPIRATION, MAX_MAX_EXPIRATION, K8S_MAX_MAX_EXPIRATION = 3600, 91 * 86400, 86400
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PEM = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n((?:[A-Za-z0-9+/=]+\r?\n)*)-----END \1-----\r?\n?"
)
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

FIELDS = {
    "spec.signerName": lambda o: (o.get("spec") or {}).get("signerName", ""),
    "spec.podName": lambda o: (o.get("spec") or {}).get("podName", ""),
    "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
}


# --------------------------------------------------------------------------- registration

PCRS = Resource(GROUP, VERSION, PLURAL, KIND, status_subresource=True)


class PcrAdmission:
    """The API server's defaulting and validation of PCRs (``FakeKube.kind_hooks``).

    ``version``: the Kubernetes release whose schema applies (1.36+ require
    ``stubPKCS10Request``; 1.35 has only ``pkixPublicKey`` + ``proofOfPossession``).
    ``admit_bad_keys``: skip the key checks at creation, for a request that got past a broken
    admission (to test that the signer verifies for itself). ``clock``: the server's "now".
    """

    def __init__(self) -> None:
        self.version = "1.37.0"
        self.admit_bad_keys = False
        # Signer names the agent may "sign" for (RBAC on signers); None: all of them.
        self.may_sign: set[str] | None = None
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)

    def schema_problems(self, obj: Obj) -> list[Problem]:
        try:
            kubernetes_validate.validate(obj, self.version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path) or "<root>"
            return [(where, "FieldValueInvalid", f"Invalid value: {where}: {exc.message}")]
        return []

    def on_create(self, res: Resource, obj: Obj) -> None:
        default_pcr(obj)
        problems = self.schema_problems(obj)
        if not problems:
            problems = validate_create(obj, check_key=not self.admit_bad_keys)
        if problems:
            raise invalid(res, obj["metadata"].get("name", ""), [Cause(*p) for p in problems])

    def on_update(self, res: Resource, old: Obj, new: Obj, status_only: bool) -> None:
        signer = (old.get("spec") or {}).get("signerName", "")
        if status_only and self.may_sign is not None and signer not in self.may_sign:
            # The API server's check on status writes: "sign" on signers/<signerName>.
            name = new["metadata"].get("name", "")
            raise ApiError(
                403,
                "Forbidden",
                f'podcertificaterequests.certificates.k8s.io "{name}" is forbidden: user not '
                f'permitted to sign requests with signerName "{signer}"',
                {"name": name, "group": GROUP, "kind": PLURAL},
            )
        problems = self.schema_problems(new) or validate_update(
            old, new, status_only=status_only, now=self.clock()
        )
        if problems:
            raise invalid(res, new["metadata"].get("name", ""), [Cause(*p) for p in problems])


def install(fake: FakeKube) -> PcrAdmission:
    """Serve PodCertificateRequests from ``fake``: the kind, its field selectors, admission."""
    fake.resources[(GROUP, PLURAL)] = PCRS
    _EXTRA_FIELDS[PLURAL] = FIELDS
    admission = PcrAdmission()
    fake.kind_hooks[PLURAL] = admission
    return admission


# --------------------------------------------------------------------------- create


def signer_name_problems(name: str, where: str = "spec.signerName") -> list[Problem]:
    domain, slash, path = name.partition("/")
    if not name:
        return [(where, "FieldValueRequired", "Required value")]
    if not slash or "/" in path:
        return [
            (
                where,
                "FieldValueInvalid",
                f'Invalid value: "{name}": must be a fully qualified domain and path of the '
                "form 'example.com/signer-name'",
            )
        ]
    labels = domain.split(".")
    if len(labels) < 2 or not all(_DNS_LABEL.match(label) for label in labels):
        return [(where, "FieldValueInvalid", f'Invalid value: "{domain}": invalid domain')]
    if not all(_DNS_SUBDOMAIN.match(p) for p in path.split(".")):
        return [(where, "FieldValueInvalid", f'Invalid value: "{path}": invalid path')]
    return []


def default_pcr(obj: Obj) -> None:
    """What the API server defaults on create."""
    spec = obj.setdefault("spec", {})
    if isinstance(spec, dict):
        spec.setdefault("maxExpirationSeconds", DEFAULT_MAX_EXPIRATION)


def validate_create(obj: Obj, *, check_key: bool = True) -> list[Problem]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "FieldValueRequired", "Required value")]
    problems = signer_name_problems(str(spec.get("signerName") or ""))
    for key, rule in (
        ("podName", _DNS_SUBDOMAIN),
        ("serviceAccountName", _DNS_SUBDOMAIN),
        ("nodeName", _DNS_SUBDOMAIN),
    ):
        if not rule.match(str(spec.get(key) or "")):
            problems.append((f"spec.{key}", "FieldValueInvalid", "Invalid value: must be a name"))
    for key in ("podUID", "serviceAccountUID", "nodeUID"):
        value = str(spec.get(key) or "")
        if not value:
            problems.append((f"spec.{key}", "FieldValueInvalid", "must not be empty"))
        elif len(value) > 128:
            problems.append((f"spec.{key}", "FieldValueTooLong", "must have at most 128 bytes"))
    max_exp = spec.get("maxExpirationSeconds")
    domain = str(spec.get("signerName") or "").partition("/")[0]
    k8s_signer = domain == "kubernetes.io" or domain.endswith(".kubernetes.io")
    top = K8S_MAX_MAX_EXPIRATION if k8s_signer else MAX_MAX_EXPIRATION
    if not isinstance(max_exp, int) or not MIN_MAX_EXPIRATION <= max_exp <= top:
        problems.append(
            (
                "spec.maxExpirationSeconds",
                "FieldValueInvalid",
                f"Invalid value: {max_exp}: must be in the range [{MIN_MAX_EXPIRATION}, {top}]",
            )
        )
    if problems or not check_key:
        return problems
    return _key_problems(spec)


def _key_problems(spec: Obj) -> list[Problem]:
    try:
        stub = base64.b64decode(spec.get("stubPKCS10Request") or "", validate=True)
        pkix = base64.b64decode(spec.get("pkixPublicKey") or "", validate=True)
        proof = base64.b64decode(spec.get("proofOfPossession") or "", validate=True)
    except ValueError:
        return [("spec", "FieldValueInvalid", "Invalid value: byte fields must be base64")]
    if stub:
        try:
            csr = x509.load_der_x509_csr(stub)
            key = csr.public_key()
        except ValueError:
            return [("spec.stubPKCS10Request", "FieldValueInvalid", "must be a valid PKCS#10 CSR")]
        if not csr.is_signature_valid:
            return [
                (
                    "spec.stubPKCS10Request",
                    "FieldValueInvalid",
                    "could not verify the signature of the stub PKCS#10 request",
                )
            ]
        if pkix and _spki(key) != pkix:  # type: ignore[arg-type]
            return [("spec.pkixPublicKey", "FieldValueInvalid", "must match stubPKCS10Request")]
        return _key_type_problems(key, "spec.stubPKCS10Request")  # type: ignore[arg-type]
    try:
        key = serialization.load_der_public_key(pkix)
    except ValueError:
        return [
            (
                "spec.pkixPublicKey",
                "FieldValueInvalid",
                "must be a valid PKIX-serialized public key",
            )
        ]
    problems = _key_type_problems(key, "spec.pkixPublicKey")  # type: ignore[arg-type]
    if problems:
        return problems
    if not verify_proof(key, str(spec.get("podUID")), proof):  # type: ignore[arg-type]
        return [
            (
                "spec.proofOfPossession",
                "FieldValueInvalid",
                "could not verify proof-of-possession signature",
            )
        ]
    return []


def _key_type_problems(key: PublicKey, where: str) -> list[Problem]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return []
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in ("secp256r1", "secp384r1", "secp521r1"):
            return []
        return [(where, "FieldValueInvalid", "elliptic public keys must use curve P256 or P384")]
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size in (3072, 4096):
            return []
        return [(where, "FieldValueInvalid", "RSA keys must have modulus size 3072 or 4096")]
    return [(where, "FieldValueInvalid", "unknown public key type")]


def verify_proof(key: PublicKey, pod_uid: str, proof: bytes) -> bool:
    data = pod_uid.encode()
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(proof, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(proof, data, ec.ECDSA(hashes.SHA256()))
        else:
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            key.verify(proof, data, pss, hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def requested_key(spec: Obj) -> bytes:
    """The SubjectPublicKeyInfo (DER) the certificate must be issued to."""
    stub = spec.get("stubPKCS10Request")
    if stub:
        csr = x509.load_der_x509_csr(base64.b64decode(stub))
        return _spki(csr.public_key())  # type: ignore[arg-type]
    return base64.b64decode(spec["pkixPublicKey"])


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- updates


def validate_update(old: Obj, new: Obj, *, status_only: bool, now: dt.datetime) -> list[Problem]:
    if not status_only:
        if new.get("spec") != old.get("spec"):
            return [("spec", "FieldValueInvalid", "field is immutable")]
        return []
    return validate_status(old, new.get("status") or {}, now)


def validate_status(old: Obj, status: Obj, now: dt.datetime) -> list[Problem]:
    conditions = status.get("conditions") or []
    problems = _condition_problems(conditions)
    if problems:
        return problems
    old_status = old.get("status") or {}
    if _terminal(old_status.get("conditions") or []):
        if _semantic(status) != _semantic(old_status):
            return [
                (
                    "status",
                    "FieldValueInvalid",
                    "immutable after PodCertificateRequest is issued, denied, or failed",
                )
            ]
        return []
    kind = _terminal(conditions)
    if kind in ("Denied", "Failed"):
        if set(status) - {"conditions"}:
            return [
                (
                    "status",
                    "FieldValueInvalid",
                    "non-condition status fields must be empty when denying or failing the "
                    "PodCertificateRequest",
                )
            ]
        return []
    if kind == "Issued":
        return _issued_problems(old["spec"], status, now)
    if _semantic(status) != _semantic(old_status):
        return [
            (
                "status",
                "FieldValueInvalid",
                'status is immutable unless transitioning to "Issued", "Denied", or "Failed"',
            )
        ]
    return []


def _semantic(status: Obj) -> Obj:
    """Go's semantic equality: an empty list or map equals a missing one."""
    return {k: v for k, v in status.items() if v not in (None, [], {}, "")}


def _terminal(conditions: list[Obj]) -> str | None:
    for c in conditions:
        if c.get("type") in TERMINAL and c.get("status") == "True":
            return str(c["type"])
    return None


def _condition_problems(conditions: Any) -> list[Problem]:
    if not isinstance(conditions, list):
        return [("status.conditions", "FieldValueInvalid", "must be a list")]
    problems: list[Problem] = []
    known, seen = 0, set()
    for i, c in enumerate(conditions):
        where = f"status.conditions[{i}]"
        kind = c.get("type")
        if kind in TERMINAL:
            known += 1
            if known > 1:
                problems.append(
                    (
                        f"{where}.type",
                        "FieldValueInvalid",
                        'There may be at most one condition with type "Issued", "Denied", or '
                        '"Failed"',
                    )
                )
            if c.get("status") != "True":
                problems.append(
                    (f"{where}.status", "FieldValueNotSupported", 'supported values: "True"')
                )
        else:
            problems.append(
                (
                    f"{where}.type",
                    "FieldValueNotSupported",
                    f'Unsupported value: "{kind}": supported values: "Issued", "Denied", "Failed"',
                )
            )
        if kind in seen:
            problems.append((f"{where}.type", "FieldValueDuplicate", "Duplicate value"))
        seen.add(kind)
        if not isinstance(kind, str) or not _QUALIFIED.match(kind):
            problems.append((f"{where}.type", "FieldValueInvalid", "must be a qualified name"))
        reason = c.get("reason")
        if not reason:
            problems.append((f"{where}.reason", "FieldValueRequired", "Required value"))
        elif len(reason) > 1024 or not _REASON.match(reason):
            problems.append(
                (
                    f"{where}.reason",
                    "FieldValueInvalid",
                    f'Invalid value: "{reason}": a condition reason must start with alphabetic '
                    "character, optionally followed by a string of alphanumeric characters or "
                    "'_,:', and must end with an alphanumeric character or '_'",
                )
            )
        if len(str(c.get("message") or "")) > 32768:
            problems.append((f"{where}.message", "FieldValueTooLong", "Too long"))
        if not c.get("lastTransitionTime"):
            problems.append((f"{where}.lastTransitionTime", "FieldValueRequired", "Required"))
        generation = c.get("observedGeneration", 0)
        if not isinstance(generation, int) or generation < 0:
            problems.append((f"{where}.observedGeneration", "FieldValueInvalid", "must be >= 0"))
    return problems


def _issued_problems(spec: Obj, status: Obj, now: dt.datetime) -> list[Problem]:
    chain = status.get("certificateChain") or ""
    where = "status.certificateChain"
    if len(chain) > 100 * 1024:
        return [(where, "FieldValueTooLong", "Too long: must have at most 102400 bytes")]
    blocks, rest = [], chain.encode()
    while rest.strip():
        m = _PEM.match(rest.lstrip())
        if m is None:
            break
        blocks.append(m)
        rest = rest.lstrip()[m.end() :]
    if not blocks:
        return [
            (where, "FieldValueInvalid", "issued certificate chain must contain at least one cert")
        ]
    if any(b.group(1) != b"CERTIFICATE" for b in blocks):
        return [
            (
                where,
                "FieldValueInvalid",
                "issued certificate chain must consist entirely of CERTIFICATE PEM blocks",
            )
        ]
    try:
        certs = [x509.load_der_x509_certificate(base64.b64decode(b.group(2))) for b in blocks]
    except ValueError:
        return [(where, "FieldValueInvalid", "certificate does not parse as valid X.509")]
    leaf = certs[0]
    for name in _dns_names(leaf):
        if not name or ".." in name or name.startswith(".") or name.endswith("."):
            return [(where, "FieldValueInvalid", f"leaf certificate has bad DNSName {name!r}")]
    if _spki(leaf.public_key()) != requested_key(spec):  # type: ignore[arg-type]
        return [
            (where, "FieldValueInvalid", "leaf certificate was not issued to the requested key")
        ]
    times = {}
    for key in ("notBefore", "notAfter", "beginRefreshAt"):
        value = status.get(key)
        if not value:
            return [(f"status.{key}", "FieldValueRequired", "must be present")]
        times[key] = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    nb, na, refresh = times["notBefore"], times["notAfter"], times["beginRefreshAt"]
    if nb != leaf.not_valid_before_utc:
        return [("status.notBefore", "FieldValueInvalid", "must be the leaf's NotBefore")]
    if abs((nb - now).total_seconds()) >= 300:
        return [
            (
                "status.notBefore",
                "FieldValueInvalid",
                "must be set to within 5 minutes of kube-apiserver's current time",
            )
        ]
    if na != leaf.not_valid_after_utc:
        return [("status.notAfter", "FieldValueInvalid", "must be the leaf's NotAfter")]
    lifetime = (na - nb).total_seconds()
    if lifetime < 3600:
        return [(where, "FieldValueInvalid", "leaf certificate lifetime must be >= 1 hour")]
    if lifetime > spec["maxExpirationSeconds"]:
        return [
            (
                where,
                "FieldValueInvalid",
                "leaf certificate lifetime must be <= spec.maxExpirationSeconds "
                f"({spec['maxExpirationSeconds']})",
            )
        ]
    if refresh < nb + dt.timedelta(minutes=10):
        return [("status.beginRefreshAt", "FieldValueInvalid", "must be >= notBefore + 10m")]
    if refresh > na - dt.timedelta(minutes=10):
        return [("status.beginRefreshAt", "FieldValueInvalid", "must be <= notAfter - 10m")]
    return []


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(ext.get_values_for_type(x509.DNSName))


# --------------------------------------------------------------------------- kubelet


KEY_MAKERS: dict[str, Callable[[], Any]] = {
    "ECDSAP256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ECDSAP384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ECDSAP521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ED25519": ed25519.Ed25519PrivateKey.generate,
    "RSA3072": lambda: rsa.generate_private_key(65537, 3072),
    "RSA4096": lambda: rsa.generate_private_key(65537, 4096),
}


@dataclass
class PodRequest:
    body: Obj
    key: Any  # the private key kubelet keeps


def pcr_body(
    *,
    name: str,
    pod: Obj,
    signer: str,
    key_type: str = "ECDSAP256",
    form: str = "stub",
    max_expiration: int | None = None,
    key: Any = None,
) -> PodRequest:
    """What kubelet creates for a pod's podCertificate projection (form ``stub`` or ``pkix``)."""
    key = key or KEY_MAKERS[key_type]()
    meta, pod_spec = pod["metadata"], pod["spec"]
    spec: Obj = {
        "signerName": signer,
        "podName": meta["name"],
        "podUID": meta["uid"],
        "serviceAccountName": pod_spec.get("serviceAccountName") or "default",
        "serviceAccountUID": "sa-" + meta["uid"][:8],
        "nodeName": pod_spec["nodeName"],
        "nodeUID": "node-" + pod_spec["nodeName"],
    }
    if max_expiration is not None:
        spec["maxExpirationSeconds"] = max_expiration
    if form == "stub":
        algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        csr = (
            x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, algorithm)
        )
        spec["stubPKCS10Request"] = base64.b64encode(
            csr.public_bytes(serialization.Encoding.DER)
        ).decode()
    else:
        spec["pkixPublicKey"] = base64.b64encode(_spki(key.public_key())).decode()
        spec["proofOfPossession"] = base64.b64encode(sign_uid(key, meta["uid"])).decode()
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": spec,
    }
    return PodRequest(body, key)


def sign_uid(key: Any, uid: str) -> bytes:
    data = uid.encode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    return key.sign(data, pss, hashes.SHA256())  # type: ignore[no-any-return]


def condition(pcr: Obj) -> Obj | None:
    """The terminal condition of a PCR, or None while pending."""
    for c in (pcr.get("status") or {}).get("conditions") or []:
        if c.get("type") in TERMINAL:
            return c  # type: ignore[no-any-return]
    return None
