"""Reading the configuration: defaults, then the TOML file, then ISTHMUS_* variables, then flags."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config.base import CONFIG_ENV, ENV_PREFIX
from gateway.config.settings import Settings


class ConfigError(Exception):
    """A configuration problem, naming the key and the reason."""


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from file, environment and flag overrides (dotted keys)."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    file_source = "defaults"
    file_path = path or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    if file_path is not None:
        data = _read_toml(file_path)
        file_source = str(file_path)
    # Which override set each dotted key, so an error names the variable or flag to fix.
    sources: dict[str, str] = {}
    for dotted, (variable, value) in _env_overrides(env).items():
        _put(data, dotted, value)
        sources[dotted] = f"environment {variable}"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _put(data, dotted, value)
            sources[dotted] = "command line"
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file_source, sources)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _env_overrides(env: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """dotted key -> (the variable that set it, its value)."""
    found: dict[str, tuple[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or "__" not in name:
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        found[dotted] = (name, _env_value(raw))
    return found


def _env_value(raw: str) -> Any:
    """Read an environment value as a TOML value when it is one (42, true, [..]), else text."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _put(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _describe(exc: ValidationError, file_source: str, sources: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown setting"
        source = _source_of(key, file_source, sources)
        lines.append(f"config error: {key}: {reason} (from {source})")
    return "\n".join(lines)


def _source_of(key: str, file_source: str, sources: Mapping[str, str]) -> str:
    """The override that set `key` or a section above it, else the file (or defaults)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:end]))
        if found is not None:
            return found
    return file_source
