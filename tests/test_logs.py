"""Structured logging: JSON/text shapes, levels; no private key or password is ever logged."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.observe.logs import REDACTED, configure_logging, redact

LEVELS = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def _pem(key: Any, fmt: serialization.PrivateFormat, password: bytes | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption).decode()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    """Real PEM private keys in every shape the agent (or its CA) can hold."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(65537, 2048)
    return {
        "pkcs8": _pem(ec_key, serialization.PrivateFormat.PKCS8),
        "sec1": _pem(ec_key, serialization.PrivateFormat.TraditionalOpenSSL),
        "pkcs1": _pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL),
        "encrypted": _pem(ec_key, serialization.PrivateFormat.PKCS8, b"hunter2-pass"),
        "ed25519": _pem(ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8),
    }


def body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM block: none of them may appear in any log output."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def assert_no_secret(output: str, pem: str) -> None:
    assert "PRIVATE KEY-----" not in output
    for line in body_lines(pem):
        assert line not in output
    # Bytes rendered with repr() put the lines together with literal "\n" between them.
    for line in body_lines(pem):
        assert line[:40] not in output


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_shape_with_extras_and_exception() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    log = logging.getLogger("agent.volumes.manager")
    log.debug("hidden at info")
    log.info(
        "published %s",
        "vol-1",
        extra={"volume_id": "vol-1", "pod": "es-0", "namespace": "es", "issuer": "local"},
    )
    try:
        raise RuntimeError("disk full")
    except RuntimeError:
        log.exception("could not write payload", extra={"volume_id": "vol-1"})

    first, second = json_lines(stream)
    assert set(first) == {"ts", "level", "logger", "msg", "volume_id", "pod", "namespace", "issuer"}
    assert first["level"] == "info"
    assert first["logger"] == "agent.volumes.manager"
    assert first["msg"] == "published vol-1"
    assert (first["volume_id"], first["pod"], first["namespace"]) == ("vol-1", "es-0", "es")
    ts = dt.datetime.fromisoformat(first["ts"])
    assert first["ts"].endswith("Z") and ts.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - ts).total_seconds()) < 60

    assert second["level"] == "error"
    assert second["msg"] == "could not write payload"
    assert second["exc"].startswith("Traceback") and "RuntimeError: disk full" in second["exc"]


def test_non_json_extras_are_stringified_and_reserved_names_kept() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    logging.getLogger("t").debug("x", extra={"path": os.path.sep, "ts": "mine", "obj": object()})
    (line,) = json_lines(stream)
    assert line["extra_ts"] == "mine" and line["ts"] != "mine"
    assert line["obj"].startswith("<object object")
    assert line["level"] == "debug"


def test_text_format_on_a_terminal() -> None:
    controller, terminal = os.openpty()
    try:
        with os.fdopen(terminal, "w", closefd=False) as tty:
            configure_logging("info", "auto", stream=tty)  # auto: a TTY gets readable text
            logging.getLogger("agent.volumes.scheduler").warning(
                "renewal failed", extra={"volume_id": "vol 1", "attempt": 2}
            )
            tty.flush()
        output = os.read(controller, 65536).decode()
    finally:
        os.close(controller)
        os.close(terminal)
    assert not output.lstrip().startswith("{")
    assert "WARNING" in output and "agent.volumes.scheduler: renewal failed" in output
    assert 'volume_id="vol 1"' in output and "attempt=2" in output


def test_auto_is_json_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)
    logging.getLogger("x").info("hello")
    assert json_lines(stream)[0]["msg"] == "hello"


def test_level_filtering_and_reconfiguration_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("warning", "json", stream=first)
    log = logging.getLogger("agent.x")
    log.info("dropped")
    log.warning("kept")
    configure_logging("DEBUG", "text", stream=second)
    log.debug("now visible")
    assert [line["msg"] for line in json_lines(first)] == ["kept"]
    assert "now visible" in second.getvalue()
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_cert_agent_handler", False)]
    assert len(ours) == 1


@pytest.mark.parametrize("level", ["verbose", "", "infos"])
def test_invalid_level_is_named(level: str) -> None:
    with pytest.raises(ValueError, match=f"invalid log level '{level}'"):
        configure_logging(level)


def test_invalid_format_is_named() -> None:
    with pytest.raises(ValueError, match="invalid log format 'xml'"):
        configure_logging("info", "xml")


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("kind", ["pkcs8", "sec1", "pkcs1", "encrypted", "ed25519"])
def test_private_keys_never_reach_the_log_at_any_level(
    keys: dict[str, str], kind: str, fmt: str
) -> None:
    pem = keys[kind]
    stream = io.StringIO()
    configure_logging("debug", fmt, stream=stream)
    log = logging.getLogger("agent.pki.keys")
    for level in LEVELS:
        log.log(level, "key in the message: " + pem)
        log.log(level, "key as an argument: %s", pem)
        log.log(level, "key as bytes: %r", pem.encode())
        log.log(level, "key inside a container: %s", {"files": {"tls.key": pem.encode()}})
        log.log(
            level,
            "key in extras",
            extra={"payload": pem, "raw": pem.encode(), "nested": {"tls.key": [pem]}},
        )
        log.log(level, "key cut short: %s", pem[: len(pem) // 2])
        try:
            raise ValueError(f"could not load key {pem}")
        except ValueError:
            log.log(level, "load failed", exc_info=True)
        try:
            try:
                raise OSError(pem.encode())
            except OSError as inner:
                raise RuntimeError("wrapped") from inner
        except RuntimeError:
            log.log(level, "chained failure", exc_info=True, stack_info=True)
    output = stream.getvalue()
    assert_no_secret(output, pem)
    assert output.count(REDACTED) >= len(LEVELS) * 8
    if fmt == "json":
        lines = json_lines(stream)  # still valid JSON after redaction
        assert len(lines) == len(LEVELS) * 8
        assert {line["level"] for line in lines} == {
            "debug",
            "info",
            "warning",
            "error",
            "critical",
        }
        assert all("Traceback" in line["exc"] for line in lines if line["msg"] == "load failed")


def test_password_extras_are_redacted(keys: dict[str, str]) -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    logging.getLogger("agent.pki.pkcs12").info(
        "wrote keystore",
        extra={
            "password": "hunter2-pass",
            "pkcs12_password": "s3cret-one",
            "attributes": {"csi.cert-agent.io/pkcs12-password": "s3cret-two", "fs-group": "1000"},
            "service_account_token": "eyJhbGciOi.token",
            "volume_id": "vol-1",
        },
    )
    output = stream.getvalue()
    for secret in ("hunter2-pass", "s3cret-one", "s3cret-two", "eyJhbGciOi"):
        assert secret not in output
    (line,) = json_lines(stream)
    assert line["password"] == REDACTED and line["pkcs12_password"] == REDACTED
    assert line["attributes"] == {
        "csi.cert-agent.io/pkcs12-password": REDACTED,
        "fs-group": "1000",
    }
    assert line["volume_id"] == "vol-1"


def test_child_loggers_and_other_records_pass_through_unchanged() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    logging.getLogger("kubernetes.client.rest").info("status 201 for %s", "/apis/x")
    certificate = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    logging.getLogger("agent").info("issued %s", certificate)
    first, second = json_lines(stream)
    assert first["msg"] == "status 201 for /apis/x"
    assert second["msg"] == f"issued {certificate}"  # certificates are public: not redacted


def test_redact_function() -> None:
    text = "a -----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY----- b"
    assert redact(text) == f"a {REDACTED} b"
    two = f"{text} and {text}"
    assert redact(two) == f"a {REDACTED} b and a {REDACTED} b"
    assert redact("plain text") == "plain text"
