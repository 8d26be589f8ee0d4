"""What the attribute families share: one attribute as written, the parse's state, small checks.

``ParseState`` collects errors instead of stopping at the first (``attempt``), so a pod author
sees every problem at once, and names an attribute by the prefix the user chose (``key_for``).
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn, ParamSpec, TypeVar

from agent.errors import InvalidArgument
from agent.spec.attribute_names import OWN_PREFIX
from agent.spec.durations import parse_go_duration_ns
from agent.spec.model import PodIPSans
from agent.spec.templating import quote

LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
K8S_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DIGITS_RE = re.compile(r"[0-9]+")

T = TypeVar("T")
P = ParamSpec("P")
NO_TEXT: tuple[str, ...] = ()


@dataclass(frozen=True)
class Attr:
    """One of our attributes: the key as written, the raw value and the value after templating."""

    name: str
    key: str
    raw: str
    value: str
    # A list attribute's entries, each expanded on its own (see LIST_ATTRIBUTES).
    entries: tuple[str, ...] | None = None

    def fail(self, detail: str) -> NoReturn:
        origin = ""
        if self.value != self.raw:
            origin = f" (after templating {quote(self.raw)})"
        raise InvalidArgument(f"{self.key}: {detail}{origin}", self.key)


def has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def split_list(attr: Attr) -> list[str]:
    """Comma-separated entries, trimmed; an empty entry is a mistake, not something to skip."""
    if attr.entries is not None:
        entries = list(attr.entries)
    else:
        entries = [entry.strip() for entry in attr.value.split(",")]
    if any(not entry for entry in entries):
        attr.fail(f"empty entry in {quote(attr.value)}; remove the extra comma")
    return entries


def dedupe(items: list[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(items))


def parse_bool(attr: Attr | None) -> bool:
    if attr is None:
        return False
    text = attr.value.strip().lower()
    if text not in ("true", "false"):
        attr.fail(f'{quote(attr.value)} is not a boolean; use "true" or "false"')
    return text == "true"


def parse_int(attr: Attr, low: int, high: int, what: str) -> int:
    text = attr.value.strip()
    if not _DIGITS_RE.fullmatch(text) or not low <= int(text) <= high:
        attr.fail(f"{quote(attr.value)} is not a valid {what}: use an integer from {low} to {high}")
    return int(text)


def closest(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word.lower(), sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


class ParseState:
    """One parse: the context, our attributes as written, annotations, errors so far."""

    def __init__(self, volume_context: Mapping[str, str], node_name: str = "") -> None:
        self.context = volume_context
        self.node_name = node_name
        self.pod_ip_sans = PodIPSans.NONE
        self.errors: list[InvalidArgument] = []
        self.attrs: dict[str, Attr] = {}
        self.annotations: dict[str, str] = {}
        self.prefix = OWN_PREFIX

    # Collect an error and carry on with a stand-in value, so all problems are reported at once.
    def attempt(self, fallback: T, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except InvalidArgument as exc:
            self.errors.append(exc)
            return fallback

    def raise_collected(self) -> None:
        if not self.errors:
            return
        if len(self.errors) == 1:
            raise self.errors[0]
        shown = [e.message for e in self.errors[:6]]
        if len(self.errors) > 6:
            shown.append(f"and {len(self.errors) - 6} more")
        raise InvalidArgument(
            f"{len(self.errors)} problems with the volume attributes: " + "; ".join(shown),
            self.errors[0].attribute,
        )

    def key_for(self, name: str) -> str:
        """The key for ``name`` as the user wrote it, or as they would write it."""
        attr = self.attrs.get(name)
        return attr.key if attr else self.prefix + name


def check_text(attr: Attr, text: str, limit: int) -> str:
    if len(text) > limit:
        attr.fail(f"{quote(text)} is {len(text)} characters long; at most {limit} are allowed")
    if has_control(text):
        attr.fail(f"{quote(text)} contains control characters")
    return text


def whole_seconds(attr: Attr, what: str) -> int:
    text = attr.value.strip()
    try:
        nanoseconds = parse_go_duration_ns(text)
    except ValueError as exc:
        attr.fail(f"{exc}; write a Go duration such as 2160h, 90m or 1h30m")
    if nanoseconds < 1_000_000_000:
        attr.fail(f"{quote(text)} is too short: the {what} must be at least 1s")
    return nanoseconds // 1_000_000_000
