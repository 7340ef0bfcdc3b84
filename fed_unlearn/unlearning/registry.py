"""The method registry: one table, filled by each method module when it is imported.

A method module defines an :class:`~fed_unlearn.unlearning.base.UnlearningMethod`
subclass and decorates it with :func:`register_method`; everything the rest of the
system needs (its settings, the scenarios it serves, whether a service may use it, its
client routine) is read from the class. The table is written only at import time
(like Opacus' accountant registry); nothing changes it afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from ..deletion import SCENARIOS
from .base import ClientRoutine, UnlearningMethod

M = TypeVar("M", bound=type[UnlearningMethod])

_REGISTRY: dict[str, type[UnlearningMethod]] = {}
#: name -> method class of every registered method (read-only view).
METHODS: Mapping[str, type[UnlearningMethod]] = MappingProxyType(_REGISTRY)
#: Types a setting may have: what a Flower run config / ConfigRecord can carry.
SETTING_TYPES = ("int", "float", "str", "bool")


def register_method(cls: M) -> M:
    """Class decorator: add a method to the registry under ``cls.name``.

    Raises
    ------
    ValueError
        If the name is missing or taken by another class, the settings class is not a
        dataclass of ``int``/``float``/``str``/``bool`` fields with defaults, or a
        scenario is unknown.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"{cls.__qualname__}: a method needs a lower-case `name`, got {name!r}")
    other = _REGISTRY.get(name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name '{name}' is already registered by {other.__module__}.{other.__qualname__}")
    cfg = cls.config_class
    if not is_dataclass(cfg):
        raise ValueError(f"method '{name}': config_class must be a dataclass, got {cfg!r}")
    for f in fields(cfg):
        if str(f.type) not in SETTING_TYPES and f.type not in (int, float, str, bool):
            raise ValueError(
                f"method '{name}': setting '{f.name}' has type {f.type}; settings are int, float, str or bool"
            )
    unknown = sorted(set(cls.scenarios) - set(SCENARIOS))
    if unknown or not cls.scenarios:
        raise ValueError(
            f"method '{name}': unknown scenario(s) {unknown or cls.scenarios}; valid: {', '.join(SCENARIOS)}"
        )
    _REGISTRY[name] = cls
    return cls


def method_class(name: str) -> type[UnlearningMethod]:
    """The registered class of ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the valid names.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown unlearning method '{name}'; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_method(name: str, run_config: Mapping[str, Any] | None = None) -> UnlearningMethod:
    """Build the method ``name`` with its settings from ``run_config`` (``<name>.<field>`` keys).

    Raises
    ------
    ValueError
        If ``name`` is not registered or a setting is invalid.
    """
    return method_class(name).from_run_config(run_config or {})


def client_routine(name: str) -> ClientRoutine:
    """The client-side routine of method ``name`` (run by a forgetting client on ``train.unlearn``).

    Raises
    ------
    ValueError
        If the method is unknown or has no client routine.
    """
    routine = method_class(name).client_routine
    if routine is None:
        with_routine = sorted(n for n, c in _REGISTRY.items() if c.client_routine is not None)
        raise ValueError(f"method '{name}' has no client-side routine; methods with one: {', '.join(with_routine)}")
    return routine


def methods_for(scenario: str) -> list[str]:
    """Names of the registered methods that serve deletion ``scenario``."""
    return [n for n, c in _REGISTRY.items() if scenario in c.scenarios]


def online_methods() -> list[str]:
    """Names of the methods a long-running erasure service may use."""
    return [n for n, c in _REGISTRY.items() if c.serves_online]
