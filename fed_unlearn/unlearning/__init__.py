"""Unlearning methods, chosen by name (run-config key ``unlearn.method``).

Each method lives in its own module of this package and registers itself with
:func:`register_method`; importing the package imports every module in it, so a new
method file is found without editing anything else.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    ClientRoutine,
    LocalRoutineMethod,
    RemainingOnlyMethod,
    RoutineInput,
    UnlearningMethod,
    apply_departing_motion,
    config_from_run_config,
)
from .registry import METHODS, client_routine, make_method, method_class, methods_for, online_methods, register_method

_INFRASTRUCTURE = {"base", "registry"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _INFRASTRUCTURE and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "ClientRoutine",
    "LocalRoutineMethod",
    "RemainingOnlyMethod",
    "RoutineInput",
    "UnlearningMethod",
    "apply_departing_motion",
    "client_routine",
    "config_from_run_config",
    "make_method",
    "method_class",
    "methods_for",
    "online_methods",
    "register_method",
]
