"""Reading settings dataclasses from Flower's run config: the one reader every settings class uses.

A setting is a dataclass field; its run-config key is either named in the field's metadata
(``setting(default, "unlearn.method", "...")``: the run's own sections,
:mod:`fed_unlearn.config`, :mod:`fed_unlearn.deletion`) or derived from a prefix and the
field name (``puf.scale``, ``service.recovery-rounds``: a method's or the service's
settings). Values are checked against the type of the field's default, naming the key.
This module imports nothing of the project, so every settings class can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, field, fields
from typing import Any


def setting(default: Any, key: str, help: str) -> Any:  # noqa: A002  (the field's help text)
    """A dataclass field that is a run-config setting: its key and what it does (shown in the reference)."""
    return field(default=default, metadata={"key": key, "help": help})


def typed_value(key: str, value: Any, default: Any) -> Any:
    """``value`` of ``key`` as the type of ``default`` (ints for floats, integral floats for ints), finite."""
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(value, bool) and isinstance(default, bool)):
            raise ValueError(f"run-config '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)):
            raise ValueError(f"run-config '{key}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"run-config '{key}' must be a finite number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)  # "3.0" where a count is expected
        if not isinstance(value, int):
            raise ValueError(f"run-config '{key}' must be an integer, got {value!r}")
        return value
    if not isinstance(value, type(default)):
        raise ValueError(f"run-config '{key}' must be {type(default).__name__}, got {value!r}")
    return value


def _build(cls: type, rc: Mapping[str, Any], key_of: Callable[[Field[Any]], str | None], **fixed: Any) -> Any:
    """``cls`` from the run config: each field's value read under ``key_of(field)`` (``None``: not a setting)."""
    kwargs: dict[str, Any] = dict(fixed)
    for f in fields(cls):
        key = key_of(f)
        if key is None or f.name in kwargs or key not in rc:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
        kwargs[f.name] = typed_value(key, rc[key], default)
    return cls(**kwargs)


def read_settings(cls: type, rc: Mapping[str, Any], **fixed: Any) -> Any:
    """Build the settings dataclass ``cls`` from the run config (its fields' keys; defaults for absent keys).

    ``fixed`` gives fields that are not plain settings (nested sections, parsed values).

    Raises
    ------
    ValueError
        On a value of the wrong type, not finite, or out of range, naming the key.
    """
    return _build(cls, rc, lambda f: f.metadata.get("key"), **fixed)


def config_from_run_config(cls: type, run_config: Mapping[str, Any], prefix: str) -> Any:
    """Build the config dataclass ``cls`` from ``<prefix>.<field-name>`` run-config keys.

    Field names map to hyphenated keys (``recovery_rounds`` -> ``prefix.recovery-rounds``).
    Missing keys take the dataclass default; ints are accepted for float fields.

    Raises
    ------
    ValueError
        On a value of the wrong type, naming the key.
    """
    return _build(cls, run_config, lambda f: f"{prefix}.{f.name.replace('_', '-')}")
