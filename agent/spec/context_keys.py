"""Sorting the volume context's keys: sizes, our attributes, foreign annotations, mistakes."""

from __future__ import annotations

import difflib
import re

from agent.errors import InvalidArgument, shorten
from agent.spec.attribute_names import (
    ATTRIBUTE_NAMES,
    COMPAT_PREFIX,
    MAX_ANNOTATION_BYTES,
    MAX_ANNOTATIONS,
    MAX_CONTEXT_BYTES,
    MAX_KEY_CHARS,
    MAX_VALUE_BYTES,
    OWN_PREFIX,
    POD_INFO_PREFIX,
    SECRET_ATTRIBUTES,
)
from agent.spec.attribute_state import K8S_SUBDOMAIN_RE, Attr, ParseState, closest
from agent.spec.templating import quote

_K8S_NAME_PART_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def check_sizes(state: ParseState) -> None:
    total = 0
    for key in sorted(state.context):
        value = state.context[key]
        try:
            key_size = len(key.encode("utf-8"))
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidArgument(
                f"{quote(key)}: key or value is not valid UTF-8", shorten(key)
            ) from None
        if len(key) > MAX_KEY_CHARS:
            raise InvalidArgument(
                f"volume attribute key {quote(key)} is {len(key)} characters long; at most "
                f"{MAX_KEY_CHARS} are allowed (a 253-character prefix, '/', a 63-character "
                "name)",
                shorten(key),
            )
        if size > MAX_VALUE_BYTES:
            raise InvalidArgument(
                f"{key}: value is {size} bytes long; at most {MAX_VALUE_BYTES} are allowed", key
            )
        total += key_size + size
    if total > MAX_CONTEXT_BYTES:
        raise InvalidArgument(
            f"the volume attributes take {total} bytes (keys and values); at most "
            f"{MAX_CONTEXT_BYTES} are allowed per volume"
        )


def classify(state: ParseState) -> None:
    seen: dict[str, str] = {}
    conflicts: set[str] = set()
    counts = {OWN_PREFIX: 0, COMPAT_PREFIX: 0}
    for key in sorted(state.context):
        value = state.context[key]
        if key.startswith(POD_INFO_PREFIX):
            continue
        prefix = next((p for p in (OWN_PREFIX, COMPAT_PREFIX) if key.startswith(p)), None)
        if prefix is None:
            state.attempt(None, foreign, state, key, value)
            continue
        counts[prefix] += 1
        name = key[len(prefix) :]
        if name not in ATTRIBUTE_NAMES:
            close = closest(name, ATTRIBUTE_NAMES)
            hint = f" (did you mean {prefix}{close}?)" if close else ""
            state.errors.append(
                InvalidArgument(f"unknown volume attribute {quote(key)}{hint}", key)
            )
            continue
        if name in seen:
            conflicts.add(name)
            state.errors.append(
                InvalidArgument(
                    f"{seen[name]} and {key} are both set; use only one of the two prefixes",
                    key,
                )
            )
            continue
        seen[name] = key
        # An empty value means "not set", as in cert-manager's csi-driver.
        empty = value == "" if name in SECRET_ATTRIBUTES else not value.strip()
        if not empty:
            state.attrs[name] = Attr(name, key, value, value)
    for name in conflicts:  # a conflict must not leave one side in use
        state.attrs.pop(name, None)
    check_annotation_limits(state)
    if counts[COMPAT_PREFIX] > counts[OWN_PREFIX]:
        state.prefix = COMPAT_PREFIX


def check_annotation_limits(state: ParseState) -> None:
    """Attributes under other prefixes are stored per volume and sent to cert-manager: cap
    how many and how big, so a pod cannot fill the node's tmpfs with them."""
    count = len(state.annotations)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in state.annotations.items())
    first = min(state.annotations, default=None)
    if count > MAX_ANNOTATIONS:
        state.errors.append(
            InvalidArgument(
                f"{count} attributes under other prefixes (passed on as CertificateRequest "
                f"annotations); at most {MAX_ANNOTATIONS} are allowed per volume",
                first,
            )
        )
    elif size > MAX_ANNOTATION_BYTES:
        state.errors.append(
            InvalidArgument(
                f"the attributes under other prefixes (passed on as CertificateRequest "
                f"annotations) take {size} bytes; at most {MAX_ANNOTATION_BYTES} are allowed "
                "per volume",
                first,
            )
        )


def foreign(state: ParseState, key: str, value: str) -> None:
    if "/" not in key:
        close = closest(key, ATTRIBUTE_NAMES)
        hint = f" (did you mean {OWN_PREFIX}{close}?)" if close else ""
        raise InvalidArgument(
            f"unknown volume attribute {quote(key)}{hint}; attributes are named "
            f"{OWN_PREFIX}<name> or {COMPAT_PREFIX}<name>",
            key,
        )
    prefix, _, name = key.partition("/")
    # A misspelt prefix must not turn a SAN into a harmless-looking annotation.
    ratio, ours = max(
        (difflib.SequenceMatcher(None, prefix.lower() + "/", p).ratio(), p)
        for p in (OWN_PREFIX, COMPAT_PREFIX)
    )
    if name.lower() in ATTRIBUTE_NAMES and ratio >= 0.8:
        raise InvalidArgument(
            f"unknown volume attribute {quote(key)} (did you mean {ours}{name.lower()}?)", key
        )
    if (
        len(prefix) > 253
        or not K8S_SUBDOMAIN_RE.fullmatch(prefix)
        or len(name) > 63
        or not _K8S_NAME_PART_RE.fullmatch(name)
    ):
        raise InvalidArgument(
            f"{quote(key)} is not a valid annotation key (prefix/name: a DNS subdomain, '/', "
            "then at most 63 of A-Z, a-z, 0-9, '-', '_', '.'); attributes under other "
            "prefixes are passed on as CertificateRequest annotations",
            key,
        )
    state.annotations[key] = value
