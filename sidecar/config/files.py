"""Reading a config file (TOML or YAML) into a validated Config, and writing one back out (secrets redacted)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgspec
import yaml

from sidecar.config.checks import semantic_errors
from sidecar.config.model import Config, ConfigError
from sidecar.config.schema import dec_hook, enc_hook, walk
from sidecar.secrets import REDACTED, redact_urls


def parse_document(text: str, fmt: str) -> object:
    """TOML or YAML text -> plain Python objects."""
    if fmt == "toml":
        return tomllib.loads(text)
    if fmt == "yaml":
        return yaml.safe_load(text) or {}
    raise ValueError(f"unknown config format {fmt!r}")


def validate(document: object, source: str = "") -> Config:
    """Plain objects -> Config, or ConfigError listing every problem."""
    errors = list(walk(document, msgspec.inspect.type_info(Config), ""))
    if errors:
        raise ConfigError(errors, source)
    try:
        config = msgspec.convert(document, Config, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:  # the walker should have caught it; keep the message
        raise ConfigError([str(exc)], source) from None
    semantic = list(semantic_errors(config))
    if semantic:
        raise ConfigError(semantic, source)
    return config


def format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ConfigError([f"{path}: unknown config format (use .toml, .yaml or .yml)"], str(path))


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"], str(path)) from None
    try:
        document = parse_document(text, format_of(path))
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: not valid {format_of(path).upper()}: {exc}"], str(path)) from None
    return validate(document, str(path))


def to_builtins(config: Config, redact: bool = True) -> dict[str, Any]:
    """The effective config as plain objects (defaults filled in); secrets are files, never values."""
    data = msgspec.to_builtins(config, enc_hook=enc_hook)
    if redact:
        _redact(data)
    return data


_SECRET_KEYS = {"password", "token", "secret"}


def _redact(node: object) -> None:
    """Secret-named keys, and credentials inside any URL (`nats://user:pass@host`), become <redacted>."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if isinstance(value, str):
            node[key] = REDACTED if key in _SECRET_KEYS and value else redact_urls(value)  # type: ignore[index]
        else:
            _redact(value)


def dumps(config: Config, fmt: str = "toml") -> str:
    data = to_builtins(config)
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(data), indent=2).decode()
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False)
    return msgspec.toml.encode(drop_none(data)).decode()


def drop_none(node: Any) -> Any:
    """TOML has no null: an unset optional setting is simply absent."""
    if isinstance(node, dict):
        return {k: drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [drop_none(v) for v in node]
    return node

