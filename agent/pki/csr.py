"""Building the certificate signing request for a volume, and the X.509 pieces issuers share.

The CSR carries everything the issuer needs (subject, SANs, requested usages, CA flag); the local CA
copies subject and SANs from it, and cert-manager's issuers read it the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from agent.errors import InvalidArgument
from agent.pki.keys import PrivateKey, signing_hash
from agent.spec.model import CertificateSpec, SubjectSpec

# cert-manager's KeyUsage names (apis/certmanager/v1 KeyUsage) -> x509.KeyUsage argument.
_KEY_USAGE_BITS: dict[str, str] = {
    "signing": "digital_signature",
    "digital signature": "digital_signature",
    "content commitment": "content_commitment",
    "key encipherment": "key_encipherment",
    "key agreement": "key_agreement",
    "data encipherment": "data_encipherment",
    "cert sign": "key_cert_sign",
    "crl sign": "crl_sign",
    "encipher only": "encipher_only",
    "decipher only": "decipher_only",
}

# cert-manager's extended key usage names -> OID.
_EXTENDED_KEY_USAGES: dict[str, ObjectIdentifier] = {
    "any": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "s/mime": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "ipsec end system": ObjectIdentifier("1.3.6.1.5.5.7.3.5"),
    "ipsec tunnel": ObjectIdentifier("1.3.6.1.5.5.7.3.6"),
    "ipsec user": ObjectIdentifier("1.3.6.1.5.5.7.3.7"),
    "timestamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp signing": ExtendedKeyUsageOID.OCSP_SIGNING,
    "microsoft sgc": ObjectIdentifier("1.3.6.1.4.1.311.10.3.3"),
    "netscape sgc": ObjectIdentifier("2.16.840.1.113730.4.1"),
}

KNOWN_USAGES: frozenset[str] = frozenset(_KEY_USAGE_BITS) | frozenset(_EXTENDED_KEY_USAGES)


def usages_to_extensions(
    usages: Iterable[str], *, is_ca: bool = False
) -> tuple[x509.KeyUsage, x509.ExtendedKeyUsage | None]:
    """Map cert-manager usage names to a KeyUsage and (when any is named) an ExtendedKeyUsage.

    Names are case-insensitive. A CA also gets ``cert sign``, as cert-manager does. An unknown name
    raises ``InvalidArgument`` (attribute ``key-usages``) listing the known ones. The KeyUsage may
    have no bit set (only extended usages named); ``key_usage_is_empty`` tells callers to omit it.
    """
    bits = dict.fromkeys(_KEY_USAGE_BITS.values(), False)
    ekus: list[ObjectIdentifier] = []
    for raw in usages:
        name = raw.strip().lower()
        if name in _KEY_USAGE_BITS:
            bits[_KEY_USAGE_BITS[name]] = True
        elif name in _EXTENDED_KEY_USAGES:
            oid = _EXTENDED_KEY_USAGES[name]
            if oid not in ekus:
                ekus.append(oid)
        else:
            known = ", ".join(sorted(KNOWN_USAGES))
            raise InvalidArgument(
                f"key-usages: unknown usage {raw!r}; known usages: {known}",
                attribute="key-usages",
            )
    if is_ca:
        bits["key_cert_sign"] = True
    if (bits["encipher_only"] or bits["decipher_only"]) and not bits["key_agreement"]:
        raise InvalidArgument(
            "key-usages: 'encipher only' and 'decipher only' need 'key agreement' as well",
            attribute="key-usages",
        )
    return x509.KeyUsage(**bits), (x509.ExtendedKeyUsage(ekus) if ekus else None)


def key_usage_is_empty(usage: x509.KeyUsage) -> bool:
    """True when no bit is set: such an extension must be left out (RFC 5280 needs one bit)."""
    return not (
        usage.digital_signature
        or usage.content_commitment
        or usage.key_encipherment
        or usage.data_encipherment
        or usage.key_agreement
        or usage.key_cert_sign
        or usage.crl_sign
    )


def build_subject(subject: SubjectSpec) -> x509.Name:
    """The subject name: ``literal_subject`` as given, else the separate fields in Go's order
    (C, ST, L, street, postalCode, O, OU, CN, serialNumber) so names match cert-manager's."""
    if subject.literal_subject:
        try:
            return x509.Name.from_rfc4514_string(subject.literal_subject)
        except ValueError as exc:
            raise InvalidArgument(
                f"literal-subject is not a valid RFC 4514 name: {exc}", attribute="literal-subject"
            ) from exc
    fields: list[tuple[ObjectIdentifier, str, Iterable[str]]] = [
        (NameOID.COUNTRY_NAME, "countries", subject.countries),
        (NameOID.STATE_OR_PROVINCE_NAME, "provinces", subject.provinces),
        (NameOID.LOCALITY_NAME, "localities", subject.localities),
        (NameOID.STREET_ADDRESS, "streetaddresses", subject.street_addresses),
        (NameOID.POSTAL_CODE, "postalcodes", subject.postal_codes),
        (NameOID.ORGANIZATION_NAME, "organizations", subject.organizations),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "organizationalunits", subject.organizational_units),
        (NameOID.COMMON_NAME, "common-name", _opt(subject.common_name)),
        (NameOID.SERIAL_NUMBER, "serialnumber", _opt(subject.serial_number)),
    ]
    attributes: list[x509.NameAttribute[str]] = []
    for oid, attribute, values in fields:
        for value in values:
            try:
                attributes.append(x509.NameAttribute(oid, value))
            except ValueError as exc:
                raise InvalidArgument(f"{attribute}: {exc}", attribute=attribute) from exc
    return x509.Name(attributes)


def build_general_names(spec: CertificateSpec) -> list[x509.GeneralName]:
    """The SANs in a fixed order: DNS, IP, URI, email, otherName."""
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in spec.dns_names]
    for ip in spec.ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise InvalidArgument(f"ip-sans: {ip!r} is not an IP address", "ip-sans") from exc
    names.extend(x509.UniformResourceIdentifier(u) for u in spec.uris)
    names.extend(x509.RFC822Name(e) for e in spec.emails)
    for other in spec.other_names:
        try:
            oid = ObjectIdentifier(other.oid)
        except ValueError as exc:
            raise InvalidArgument(
                f"other-names: {other.oid!r} is not a dotted OID", "other-names"
            ) from exc
        names.append(x509.OtherName(oid, der_utf8_string(other.value)))
    return names


def requested_names(spec: CertificateSpec) -> tuple[x509.Name, list[x509.GeneralName]]:
    """The subject and SANs ``spec`` asks for; INVALID_ARGUMENT when they identify nothing.

    What a CSR for ``spec`` carries, and what the local CA signs when it gets no CSR."""
    subject = build_subject(spec.subject)
    names = build_general_names(spec)
    if not names and len(subject) == 0:
        raise InvalidArgument(
            "the certificate would identify nothing: set common-name, literal-subject or at least "
            "one of dns-names, ip-sans, uri-sans, email-sans, other-names",
            attribute="common-name",
        )
    return subject, names


def build_csr(key: PrivateKey, spec: CertificateSpec) -> bytes:
    """A PEM CSR signed by ``key`` asking for ``spec``'s subject, SANs, usages and CA flag."""
    subject, names = requested_names(spec)
    key_usage, extended = usages_to_extensions(spec.key_usages, is_ca=spec.is_ca)
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=len(subject) == 0
        )
    if not key_usage_is_empty(key_usage):
        builder = builder.add_extension(key_usage, critical=True)
    if extended is not None:
        builder = builder.add_extension(extended, critical=False)
    builder = builder.add_extension(
        x509.BasicConstraints(ca=spec.is_ca, path_length=None), critical=True
    )
    csr = builder.sign(key, signing_hash(key))
    return csr.public_bytes(serialization.Encoding.PEM)


def der_utf8_string(value: str) -> bytes:
    """DER encoding of an ASN.1 UTF8String (the otherName value ECK and most tools expect)."""
    data = value.encode("utf-8")
    return b"\x0c" + _der_length(len(data)) + data


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _opt(value: str | None) -> tuple[str, ...]:
    return (value,) if value else ()
