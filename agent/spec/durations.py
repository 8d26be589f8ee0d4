"""Go's duration syntax (``2160h``, ``1h30m``, ``1.5h``), as cert-manager's attributes use it.

Parsed exactly as Go's ``time.ParseDuration`` does, in integer nanoseconds, so a value that
cert-manager's csi-driver accepts means the same here.
"""

from __future__ import annotations

from agent.spec.templating import quote

_MAX_GO_DURATION_NS = (1 << 63) - 1

_DURATION_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}


def _is_digit(ch: str) -> bool:
    return "0" <= ch <= "9"  # str.isdigit() would accept other scripts' digits


def parse_go_duration_ns(text: str) -> int:
    """Go's time.ParseDuration in integer nanoseconds (fractions truncated per component)."""
    s = text
    negative = False
    if s and s[0] in "+-":
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"{quote(text)} is not a duration")
    total = 0
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and _is_digit(s[j]):
            j += 1
        whole = s[i:j]
        fraction = ""
        if j < len(s) and s[j] == ".":
            k = j + 1
            while k < len(s) and _is_digit(s[k]):
                k += 1
            fraction = s[j + 1 : k]
            j = k
        if not whole and not fraction:
            raise ValueError(
                f"{quote(text)} is not a duration: expected a number at {quote(s[i:])}"
            )
        u = j
        while u < len(s) and s[u] != "." and not _is_digit(s[u]):
            u += 1
        unit = s[j:u]
        if not unit:
            raise ValueError(f"{quote(text)} is missing a unit after {quote(s[i:j])}")
        scale = _DURATION_UNITS_NS.get(unit)
        if scale is None:
            raise ValueError(
                f"{quote(text)} has unknown unit {quote(unit)}; use ns, us, ms, s, m or h "
                "(there is no day unit: 30 days is 720h)"
            )
        total += int(whole or "0") * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)
        if total > _MAX_GO_DURATION_NS + (1 if negative else 0):
            raise ValueError(f"{quote(text)} is too large (at most about 2562047h)")
        i = u
    return -total if negative else total


def parse_go_duration(text: str) -> float:
    """Parse a Go duration (``2160h``, ``1h30m``, ``1.5h``, ``-90s``) into seconds.

    Units: ns, us (or µs), ms, s, m, h; no days. Raises ValueError with a readable reason.
    """
    return parse_go_duration_ns(text) / 1_000_000_000
