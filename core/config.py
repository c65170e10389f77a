"""YAML + `key=value` override loading for every stage's pydantic config model.

One loader for all stages so that every command validates the same way: unknown keys, wrong
types and impossible values are rejected before any work starts, with the offending key named.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from neco.errors import InputError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(InputError):
    """A configuration file or override is malformed or fails validation."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and a YAML-typed value (`lr=1e-4` -> float)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted-key overrides applied (nested dicts are created)."""
    result: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


SHIPPED_CONFIGS = "neco.configs"
"""The package that holds the repository's configs/*.yaml in an installed distribution."""


def shipped_config_dir() -> Path | None:
    """The folder of the configs shipped with the package, or None when they are not installed.

    An installed wheel maps `configs/` to `neco.configs` (package data); a source checkout run
    without installing has them beside `neco/`.
    """
    try:
        folder = Path(str(resources.files(SHIPPED_CONFIGS)))
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parent.parent / "configs"
    return folder if folder.is_dir() else None


def shipped_config_names() -> list[str]:
    """Names (file stems) of the shipped configs, for `--config NAME` and error messages."""
    folder = shipped_config_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder is not None else []


def resolve_config_path(path: str | Path) -> Path:
    """An existing file wins; otherwise `NAME`, `NAME.yaml` or `configs/NAME.yaml` name a shipped config.

    So `--config configs/demo.yaml` as written in the README works from any folder once the
    package is installed, and `--config demo` is a short form of it.
    """
    given = Path(path)
    if given.is_file():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    folder = shipped_config_dir()
    if folder is not None and len(parts) == 1 and given.suffix in ("", ".yaml"):
        shipped = folder / f"{Path(parts[0]).stem}.yaml"
        if shipped.is_file():
            return shipped
    names = ", ".join(shipped_config_names()) or "none installed"
    raise ConfigError(f"config file {str(given)!r} does not exist (shipped configs by name: {names})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (a path, or a shipped config's name); an empty file is an empty mapping."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def load_config(
    model: type[ConfigT],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> ConfigT:
    """Build `model` from an optional YAML file plus overrides, or raise `ConfigError`.

    The pydantic model should set `extra="forbid"` so that typos are errors, not silent
    defaults.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        source = f" ({path})" if path is not None else ""
        lines = [f"invalid {model.__name__} config{source}:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def field_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every field's default as `dotted.key -> value` (nested models flattened; required fields left out).

    `--help` reads the defaults from here, so the pydantic model stays their one source.
    """
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            out.update(field_defaults(nested, f"{key}."))
        elif not field.is_required():
            out[key] = field.get_default(call_default_factory=True)
    return out
