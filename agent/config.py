"""The agent's configuration: flags, environment variables and a YAML file, in that precedence.

Every ``serve`` flag ``--some-flag`` is also read from ``CERT_AGENT_SOME_FLAG`` and from the key
``some-flag`` (or ``some_flag``) of the ``--config`` file, so a DaemonSet can set the node id from
the downward API and keep everything else in a ConfigMap.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config_checks import build_config
from agent.config_model import AgentConfig, ConfigError, NodeCAConfig, socket_path_from_endpoint
from agent.config_settings import (
    DEFAULT_ENDPOINT,
    DEFAULT_KUBELET_ROOT,
    DEFAULT_METRICS_ADDRESS,
    ENV_PREFIX,
    SETTINGS,
    Setting,
    env_name,
)
from agent.spec.durations import parse_go_duration

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_KUBELET_ROOT",
    "DEFAULT_METRICS_ADDRESS",
    "ENV_PREFIX",
    "SETTINGS",
    "AgentConfig",
    "ConfigError",
    "NodeCAConfig",
    "Setting",
    "add_serve_arguments",
    "env_name",
    "resolve",
    "socket_path_from_endpoint",
]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every setting as a flag whose default is None, so unset flags fall through."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of these settings")
    for setting in SETTINGS:
        default = f" (default: {setting.default})" if setting.default not in (None, False) else ""
        env = f" [env {env_name(setting.flag)}]"
        if setting.kind == "bool":
            parser.add_argument(
                f"--{setting.flag}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=setting.help + env,
            )
        elif setting.kind == "list":
            # Repeatable, and each value may itself be comma-separated.
            parser.add_argument(
                f"--{setting.flag}", action="append", default=None, help=setting.help + env
            )
        else:
            parser.add_argument(
                f"--{setting.flag}", default=None, help=setting.help + default + env
            )


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Merge flags over environment over the config file over defaults, then validate."""
    environ = os.environ if environ is None else environ
    file_values = _read_config_file(
        getattr(args, "config", None) or environ.get("CERT_AGENT_CONFIG")
    )
    raw: dict[str, Any] = {}
    for setting in SETTINGS:
        attr = setting.flag.replace("-", "_")
        value = getattr(args, attr, None)
        source = f"--{setting.flag}"
        if value is None and env_name(setting.flag) in environ:
            value, source = environ[env_name(setting.flag)], env_name(setting.flag)
        if value is None:
            for key in (setting.flag, attr):
                if key in file_values:
                    value, source = file_values[key], f"config key {setting.flag!r}"
                    break
        if value is None:
            value, source = setting.default, f"default of --{setting.flag}"
        raw[setting.flag] = _convert(setting, value, source)
    return build_config(raw)


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml  # only with a config file or a YAML setting (a start without one skips it)

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config file {path} must hold a mapping of setting: value")
    known = {s.flag for s in SETTINGS} | {s.flag.replace("-", "_") for s in SETTINGS}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"--config file {path} has unknown settings: {', '.join(unknown)}")
    return data


def _convert(setting: Setting, value: Any, source: str) -> Any:
    if value is None:
        return None
    try:
        if setting.kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if setting.kind == "int":
            return int(value)
        if setting.kind == "float":
            return float(value)
        if setting.kind in ("duration", "duration-or-zero"):
            seconds = parse_go_duration(str(value))
            if seconds < 0 or (seconds == 0 and setting.kind == "duration"):
                raise ValueError("must be positive")
            return seconds
        if setting.kind == "yaml":
            # A mapping from the config file as is; from a flag or env as YAML (or JSON) text.
            return _yaml_value(value) if isinstance(value, str) else value
        if setting.kind == "list":
            items = value if isinstance(value, list) else [value]
            parts = [p for i in items for p in str(i).split(",")]
            return [p.strip() for p in parts if p.strip()]
        return str(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: invalid value {value!r}: {exc}") from exc


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc
