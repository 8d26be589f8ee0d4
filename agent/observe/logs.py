"""Logging setup: JSON lines for log collectors, readable lines on a terminal, and redaction.

Keys and passwords are never logged on purpose; the redaction filter is defence in depth against
an accidental ``log.debug("%s", payload)``: any PEM private key block and any password-like extra
becomes ``[REDACTED]`` in the message, its arguments, the extras and exception text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

REDACTED = "[REDACTED]"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "json", "text")

# From BEGIN to END, or to the end of the text when a message was cut short. "[^-]" also covers
# bytes rendered with escaped newlines (b'-----BEGIN ...\n...').
_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)
# Extras whose name says they hold a secret.
_SECRET_NAME = re.compile(r"password|passphrase|passwd|token", re.IGNORECASE)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}

_HANDLER_MARK = "_cert_agent_handler"


def redact(text: str) -> str:
    """``text`` with every PEM private key block replaced by ``[REDACTED]``."""
    if "PRIVATE KEY-----" not in text:
        return text
    return _PEM_KEY.sub(REDACTED, text)


# Extra names already looked at, and whether they name a secret: a handful of fixed names,
# checked on every record (the filter runs for each log line of each publish).
_secret_names: dict[str, bool] = {}


def _is_secret_name(name: str) -> bool:
    known = _secret_names.get(name)
    if known is None:
        known = _SECRET_NAME.search(name) is not None
        if len(_secret_names) < 1024:  # extras are literal names in the code; a bound anyway
            _secret_names[name] = known
    return known


_PLAIN_TYPES = (int, float, bool, type(None))


def _redact_value(value: Any) -> Any:
    if type(value) in _PLAIN_TYPES:
        return value  # the common case after str, without the isinstance checks below
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes | bytearray):
        text = redact(bytes(value).decode("utf-8", "replace"))
        return text if REDACTED in text else value
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) else _redact_value(v)
            for k, v in value.items()
        }
    if type(value) in (list, tuple):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Any other object is shown through str(); check what that would print.
    text = str(value)
    redacted = redact(text)
    return redacted if redacted != text else value


class RedactingFilter(logging.Filter):
    """Removes private keys and passwords from a record before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)  # bad format args: keep the template, never the args
        # Freeze the formatted message so no later formatter re-applies the raw args.
        record.msg, record.args = redact(message), None
        fields = vars(record)
        for name in [k for k in fields if k not in _RECORD_FIELDS]:
            fields[name] = REDACTED if _is_secret_name(name) else _redact_value(fields[name])
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        # The formatted text above stands in for the exception object from here on.
        record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


# One encoder for every line (json.dumps with options builds a new one per call).
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry[f"extra_{key}" if key in entry or key in ("exc", "stack") else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return _JSON.encode(entry)


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z INFO    agent.volumes.manager: msg k=v ...`` for terminals."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = " ".join(f"{k}={_text_value(v)}" for k, v in _extras(record).items())
        if fields:
            line += " " + fields
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=\n') else text


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send the agent's logs to ``stream`` (stderr): JSON lines when it is not a terminal
    (``fmt="auto"``), else readable text. Replaces a handler installed by an earlier call and
    leaves any other handler alone."""
    number = LEVELS.get(level.strip().lower())
    if number is None:
        raise ValueError(
            f"invalid log level {level!r}: use one of debug, info, warning, error, critical"
        )
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"invalid log format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "text" if _isatty(out) else "json"
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(number)
    logging.captureWarnings(True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
