"""Configs from flat settings: ``section.field=value`` strings (the CLI's ``--set``, the app's
controls, the trainer's presets) parsed by each field's type hint and applied to any dataclass
config, which is then rebuilt and so re-validated.

The one way every entry point turns settings into a config: ``apply_overrides(config, items)``
takes strings, ``with_values(config, {"section.field": value})`` takes typed values (the app's
sliders, the audit's what-if), and ``build(cls, nested_dict)`` rebuilds from a dict.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from .errors import ConfigError


def require_finite(config: Any, section: str = "") -> None:
    """Raise ConfigError naming the first float field of a dataclass config that is NaN or infinite.

    Every config calls this first thing in ``__post_init__``: range checks written as comparisons
    pass NaN through silently (``nan > kappa`` is False, so an erasure never triggers) and let
    infinities in. Checks this instance's own fields (tuples included); nested sections check
    themselves. ``section`` prefixes the field name in the message, e.g. ``threshold``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        bad = next((v for v in items if isinstance(v, float) and not math.isfinite(v)), None)
        if bad is not None:
            name = f"{section}.{f.name}" if section else f.name
            raise ConfigError(f"{name} must be a finite number, got {value!r}; give a real value "
                              f"(NaN and infinity would silently change what it does)")


def _coerce(text: str, hint: Any, where: str) -> Any:
    """Parse a ``--set`` value according to the field's type hint."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        if text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
            return None
        return _coerce(text, args[0], where)
    if origin is tuple:
        parts = [p for p in text.split(",")]
        inner = args[0] if args else str
        return tuple(_coerce(p, inner, where) for p in parts)
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} expects true/false, got {text!r}")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ConfigError(f"{where} expects a {hint.__name__}, got {text!r}") from None
    if hint is str:
        return text.encode().decode("unicode_escape") if "\\" in text else text
    raise ConfigError(f"{where} cannot be set from the command line")


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of a dataclass config with ``section.field=value`` (or ``field=value``) applied.

    Values are parsed by the field's type; the copy is re-validated by each ``__post_init__``.
    """
    data = dataclasses.asdict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        cls: Any = type(config)
        target = data
        for depth, name in enumerate(path):
            hints = typing.get_type_hints(cls)
            if name not in hints:
                valid = ", ".join(sorted(hints))
                raise ConfigError(f"unknown config field {key!r}: {name!r} is not one of {valid}")
            if depth < len(path) - 1:
                cls = hints[name]
                if not dataclasses.is_dataclass(cls):
                    raise ConfigError(f"{'.'.join(path[:depth + 1])} is a value, not a section")
                target = target[name]
            else:
                if dataclasses.is_dataclass(hints[name]):
                    raise ConfigError(f"{key} is a section; set one of its fields, e.g. {key}.<field>=...")
                target[name] = _coerce(text.strip(), hints[name], key)
    return build(type(config), data)


def build(cls: Any, data: dict[str, Any]) -> Any:
    """A dataclass config (nested sections included) from a complete nested dict of its fields,
    validated by each ``__post_init__``."""
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = data[f.name]
        kwargs[f.name] = build(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) else value
    return cls(**kwargs)


def with_values(config: Any, values: Mapping[str, Any]) -> Any:
    """Like ``apply_overrides`` with typed values: ``{"threshold.kappa": 0.5, "erase.enabled": False}``.
    Values are formatted and parsed by the same type hints, so both paths validate alike."""
    return apply_overrides(config, [f"{key}={_format(value)}" for key, value in values.items()])


def _format(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_format(v) for v in value)
    if isinstance(value, str) and "\\" in value:
        return value.encode("unicode_escape").decode()  # _coerce un-escapes strings holding a backslash
    return str(value)
