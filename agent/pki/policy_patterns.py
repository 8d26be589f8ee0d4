"""The pattern language of the issuance policy (docs/policy.md, "Patterns").

A pattern is compared with one requested value. Patterns are split into segments by a separator
that depends on what they match: ``.`` for DNS names, email domains, namespaces, otherName
values and subject fields; ``/`` for URIs. In a pattern:

- a segment that is exactly ``**`` matches one or more whole segments (in a URI: any run of
  characters but ``?`` and ``#``, since URIs have empty segments such as the one in ``//``);
- a segment that is exactly ``*`` matches exactly one non-empty segment;
- ``*`` inside a segment (``es-*``) matches any run of characters within that one segment;
- ``${POD_NAME}``, ``${POD_NAMESPACE}``, ``${POD_UID}``, ``${SERVICE_ACCOUNT_NAME}``,
  ``${CLUSTER_DOMAIN}`` and ``${TRUST_DOMAIN}`` stand for the requesting pod's values and the
  agent's settings; their values are literal text (a ``*`` in a value is never a glob);
- everything else is literal. DNS names and email domains compare case-insensitively, all
  other values exactly.

A pattern never matches across the separator except through ``**``, so ``*.team-a.svc`` can
never match ``evil.com.team-a.svc.attacker.org``. Patterns are checked when the policy is loaded
(``compile_pattern`` raises PatternError naming the problem); matching itself never fails.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

VARIABLES: tuple[str, ...] = (
    "POD_NAME",
    "POD_NAMESPACE",
    "POD_UID",
    "SERVICE_ACCOUNT_NAME",
    "CLUSTER_DOMAIN",
    "TRUST_DOMAIN",
)
_VARIABLE_RE = re.compile(r"\$\{([^}]*)\}")


class PatternError(ValueError):
    """A pattern in the policy file is malformed; the message says why."""


class Kind(enum.Enum):
    """What a pattern matches, which decides its separator and case rule."""

    NAME = "name"  # DNS names, namespaces: '.'-separated, case-insensitive
    TEXT = "text"  # otherName values, subject fields: '.'-separated, exact
    URI = "uri"  # URIs: '/'-separated, exact; '*' also stops at '?' and '#'
    EMAIL = "email"  # local@domain: local part exact ('*' stops at '@'), domain as NAME

    @property
    def separator(self) -> str:
        return "/" if self is Kind.URI else "."

    @property
    def segment_class(self) -> str:
        return "[^/?#]" if self is Kind.URI else r"[^.]"


@dataclass(frozen=True)
class Pattern:
    """One validated pattern, as written in the policy file."""

    text: str
    kind: Kind

    @property
    def variables(self) -> frozenset[str]:
        return frozenset(_VARIABLE_RE.findall(self.text))

    def expand(self, values: Mapping[str, str]) -> str | None:
        """The pattern with its variables filled in (for messages), None if one is unknown."""
        missing = [name for name in self.variables if not values.get(name)]
        if missing:
            return None
        return _VARIABLE_RE.sub(lambda m: values[m.group(1)], self.text)

    def matches(self, value: str, values: Mapping[str, str]) -> bool:
        """Whether ``value`` matches; a pattern whose variable has no value matches nothing."""
        needed = tuple(sorted(self.variables))
        if any(not values.get(name) for name in needed):
            return False
        bound = tuple((name, values[name]) for name in needed)
        regex = _regex(self.text, self.kind, bound)
        if self.kind is Kind.EMAIL:
            return _email_matches(regex, value)
        if self.kind is Kind.NAME:
            value = value.lower()
        return regex.fullmatch(value) is not None


def compile_pattern(text: str, kind: Kind, *, variables: bool = True) -> Pattern:
    """Validate ``text`` as a pattern of ``kind``; raise PatternError naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise PatternError("a pattern must be a non-empty string")
    if text != text.strip():
        raise PatternError(f"{text!r} has leading or trailing spaces")
    for name in _VARIABLE_RE.findall(text):
        if not variables:
            raise PatternError(f"{text!r}: variables are not allowed here")
        if name not in VARIABLES:
            known = ", ".join("${" + v + "}" for v in VARIABLES)
            raise PatternError(f"{text!r}: unknown variable ${{{name}}}; known: {known}")
    stripped = _VARIABLE_RE.sub("x", text)
    if "${" in stripped:
        raise PatternError(f"{text!r}: unterminated ${{")
    if kind is Kind.EMAIL:
        local, at, domain = text.rpartition("@")
        if not at or not local or not domain:
            raise PatternError(f"{text!r} is not an email pattern: write local@domain")
        if "**" in local:
            raise PatternError(f"{text!r}: '**' is not allowed before the '@'")
        _check_double_stars(domain, Kind.NAME, text)
    else:
        _check_double_stars(text, kind, text)
    # Compile once with placeholder values so any regex problem shows at load time.
    _regex(text, kind, tuple((name, "x") for name in sorted(_VARIABLE_RE.findall(text))))
    return Pattern(text=text, kind=kind)


def _check_double_stars(text: str, kind: Kind, shown: str) -> None:
    masked = _VARIABLE_RE.sub("x", text)
    for segment in masked.split(kind.separator):
        if "**" in segment and segment != "**":
            raise PatternError(
                f"{shown!r}: '**' must be a whole segment (as in **.example.com); "
                "use '*' to match within one segment"
            )


@functools.lru_cache(maxsize=4096)
def _regex(text: str, kind: Kind, bound: tuple[tuple[str, str], ...]) -> re.Pattern[str]:
    values = dict(bound)
    if kind is Kind.EMAIL:
        local, _, domain = text.rpartition("@")
        local_re = _translate(local, "@", "[^@]", values)
        domain_re = _translate(domain, ".", r"[^.]", values)
        return re.compile(f"(?:{local_re})@(?i:{domain_re})")
    flags = re.IGNORECASE if kind is Kind.NAME else 0
    return re.compile(_translate(text, kind.separator, kind.segment_class, values), flags)


def _translate(text: str, separator: str, segment: str, values: Mapping[str, str]) -> str:
    """Regex source for a pattern: literal text escaped, globs per the module docstring."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("${", i):
            end = text.index("}", i)
            out.append(re.escape(values[text[i + 2 : end]]))
            i = end + 1
        elif text.startswith("**", i):
            if separator == "/":
                # URI segments may be empty ("spiffe://td/..."): '**' spans anything but ?#.
                out.append("[^?#]+")
            else:
                out.append(f"{segment}+(?:{re.escape(separator)}{segment}+)*")
            i += 2
        elif text[i] == "*":
            lone = (i == 0 or text[i - 1] == separator) and (i + 1 == n or text[i + 1] == separator)
            out.append(f"{segment}+" if lone else f"{segment}*")
            i += 1
        else:
            out.append(re.escape(text[i]))
            i += 1
    return "".join(out)


def _email_matches(regex: re.Pattern[str], value: str) -> bool:
    local, at, domain = value.rpartition("@")
    if not at:
        return False
    return regex.fullmatch(f"{local}@{domain.lower()}") is not None
