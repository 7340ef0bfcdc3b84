"""What every unlearning method tells the strategy, independent of Flower.

A method decides three things about the *unlearning round* (the first round after
a departure request): who trains, what the departing clients are asked to do, and
how the replies are combined into the next global model. Every other round is
plain FedAvg over the clients still in the federation, and the strategy keeps no
per-client history, so a method must work from that round's replies alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..aggregation import ClientUpdate, Weights


class UnlearningMethod(ABC):
    """Base class of the unlearning methods in the registry."""

    #: Registry name, also the run-config prefix of the method's settings.
    name: ClassVar[str]

    @property
    @abstractmethod
    def remaining_clients_train(self) -> bool:
        """Whether the remaining clients also train in the unlearning round."""

    @property
    def departing_task(self) -> str:
        """Message action for departing clients: ``"train"`` = an ordinary training round."""
        return "train"

    def departing_config(self, global_weights: Weights) -> dict[str, Any]:
        """Extra settings sent to the departing clients with their instruction."""
        return {}

    @abstractmethod
    def aggregate(
        self,
        global_weights: Weights,
        remaining: Sequence[ClientUpdate],
        departing: Sequence[ClientUpdate],
    ) -> "dict[str, np.ndarray]":
        """Combine the unlearning round's replies into the next global model."""


def config_from_run_config(cls: type, run_config: Mapping[str, Any], prefix: str) -> Any:
    """Build the config dataclass ``cls`` from ``<prefix>.<field-name>`` run-config keys.

    Field names map to hyphenated keys (``recovery_rounds`` -> ``prefix.recovery-rounds``).
    Missing keys take the dataclass default; ints are accepted for float fields.

    Raises
    ------
    ValueError
        On a value of the wrong type, naming the key.
    """
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{prefix}.{f.name.replace('_', '-')}"
        if key not in run_config:
            continue
        value = run_config[key]
        want = f.type if isinstance(f.type, type) else {"float": float, "int": int, "str": str, "bool": bool}.get(str(f.type))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is not None and not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ValueError(f"run-config '{key}' must be {getattr(want, '__name__', want)}, got {value!r}")
        kwargs[f.name] = value
    return cls(**kwargs)
