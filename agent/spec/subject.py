"""The subject attributes: common-name, serialnumber, the subject lists, literal-subject."""

from __future__ import annotations

import re

from cryptography import x509

from agent.spec.attribute_names import SUBJECT_LISTS
from agent.spec.attribute_state import (
    NO_TEXT,
    Attr,
    ParseState,
    check_text,
    has_control,
    split_list,
)
from agent.spec.model import SubjectSpec
from agent.spec.templating import quote

_PRINTABLE_RE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]+")


def subject(state: ParseState) -> SubjectSpec:
    literal = state.attrs.get("literal-subject")
    common = state.attrs.get("common-name")
    serial = state.attrs.get("serialnumber")
    if literal is not None:
        others = [state.attrs[n] for n in ("common-name", *SUBJECT_LISTS) if n in state.attrs]
        if serial is not None:
            others.append(serial)
        if others:
            literal.fail(
                "cannot be combined with "
                + ", ".join(a.key for a in others)
                + "; put those fields into the literal subject instead"
            )
        return SubjectSpec(literal_subject=_check_literal_subject(literal))
    fields: dict[str, tuple[str, ...]] = {}
    for name, (field_name, limit) in SUBJECT_LISTS.items():
        fields[field_name] = state.attempt(NO_TEXT, subject_list, state, name, limit)
    common_name = None
    if common is not None:
        common_name = state.attempt(None, check_text, common, common.value.strip(), 64)
    serial_number = None
    if serial is not None:
        serial_number = state.attempt(None, _check_serial, serial)
    return SubjectSpec(
        common_name=common_name,
        serial_number=serial_number,
        organizations=fields["organizations"],
        organizational_units=fields["organizational_units"],
        countries=fields["countries"],
        provinces=fields["provinces"],
        localities=fields["localities"],
        street_addresses=fields["street_addresses"],
        postal_codes=fields["postal_codes"],
    )


def subject_list(state: ParseState, name: str, limit: int) -> tuple[str, ...]:
    attr = state.attrs.get(name)
    if attr is None:
        return ()
    entries = split_list(attr)
    if name == "countries":
        for entry in entries:
            if len(entry) != 2 or not entry.isascii() or not entry.isalpha():
                attr.fail(f"{quote(entry)} is not a country: use ISO 3166 two-letter codes")
        return tuple(entry.upper() for entry in entries)
    return tuple(check_text(attr, entry, limit) for entry in entries)


def _check_serial(attr: Attr) -> str:
    text = attr.value.strip()
    if len(text) > 64 or not _PRINTABLE_RE.fullmatch(text):
        attr.fail(
            f"{quote(attr.value)} is not a valid subject serial number: at most 64 of A-Z, a-z, "
            "0-9, space and '()+,-./:=?"
        )
    return text


def _check_literal_subject(attr: Attr) -> str:
    text = attr.value.strip()
    rule = "use an RFC 4514 distinguished name such as CN=my-app,O=Example,C=DE"
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        reason = f" ({exc})" if str(exc) else ""
        attr.fail(f"{quote(text)} is not a valid subject{reason}: {rule}")
    if len(name) == 0:
        attr.fail(f"{quote(text)} names no subject attributes: {rule}")
    try:
        name.public_bytes()  # the CSR builder must be able to encode it
    except ValueError as exc:
        attr.fail(f"{quote(text)} cannot be encoded ({exc}): {rule}")
    for attribute in name:
        # cryptography keeps a #hex value as raw DER bytes in a str; its tag byte is a control
        # character, so this check also refuses the hex form we cannot encode faithfully.
        if not isinstance(attribute.value, str) or has_control(attribute.value):
            attr.fail(
                f"{quote(text)} contains control characters or a hex-encoded (#...) value, "
                "which are not supported"
            )
    return text
