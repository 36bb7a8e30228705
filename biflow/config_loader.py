"""The generic loader behind :mod:`biflow.config`: YAML or a dict -> nested dataclasses, strictly.

Unknown keys (with a did-you-mean), wrong types and broken ranges raise :class:`ConfigError`
naming the full key path; ``--set a.b=value`` overrides are YAML scalars; numbers written as
people write them (``1e-4``, ``1_000``) load as numbers. A dataclass may declare a classmethod
``expand(data, path)`` that rewrites its raw mapping before the fields are checked (model sizes
such as ``B/2``). The settings themselves, and ``load_config``, live in :mod:`biflow.config`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from biflow.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, with the key path that caused it."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the safe cases."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"yes", "no"} <= set(allowed):
            value = "yes" if value else "no"  # YAML 1.1 reads a bare yes/no as a boolean
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, f"{path} key"): _coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)  # "1e5" as people write it (YAML 1.1 reads it as a string)
        if number is not None and number.is_integer():
            return int(number)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _number(value)  # "1e-4", "2e-3": strings to PyYAML (YAML 1.1 wants a dot)
        if number is not None:
            return number
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


_NUMBER = re.compile(r"[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][+-]?\d+)?")


def _number(value: Any) -> float | None:
    """A string written as a decimal number (``1e-4``, ``2E3``, ``1_000``, ``.5``), as a
    float; None for anything else (``nan``, ``inf`` and words included)."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        try:
            return float(value.strip())
        except ValueError:  # "1__0" and the like
            return None
    return None


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    expand = getattr(cls, "expand", None)
    if expand is not None:
        data = expand(data, path)
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        if key not in hints or key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {(path + '.' if path else '') + close[0]!r}? " if close else ""
            raise ConfigError(f"unknown key {key_path!r}; {hint}allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], key_path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (YAML-safe: tuples become lists)."""

    def convert(v: Any) -> Any:
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    import yaml

    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def set_key(data: dict[str, Any], keys: list[str], value: Any, item: str = "") -> None:
    """``data[k0][k1]... = value``, making the sections on the way."""
    node = data
    for part in keys[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item or '.'.join(keys)!r}: {part!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        keys, value = parse_override(item)
        set_key(data, keys, value, item)
    return data


def read_yaml(source: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name ``what`` and the path."""
    import yaml  # lazy: model code (and the device check) runs where PyYAML is not installed

    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _positive(cfg: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise ConfigError(f"{path}.{name} must be > 0, got {value}")


def _ranges(path: str, rules: list[tuple[str, bool, str]], cfg: Any) -> None:
    """``rules``: (field, holds, rule in words); the first broken one raises ``path.field=value: must be rule``."""
    for name, ok, rule in rules:
        if not ok:
            value = getattr(cfg, name)
            raise ConfigError(f"{path}.{name}={list(value) if isinstance(value, tuple) else value}: must be {rule}")


def _unit_interval(cfg: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{path}.{name} must be in [0, 1], got {value}")
