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
    def departing_clients_train(self) -> bool:
        """Whether the departing clients are sent an instruction in the unlearning round."""
        return True

    def prepare_global(self, global_weights: Weights) -> Weights:
        """The model sent out in the unlearning round (default: the global model unchanged)."""
        return global_weights

    @property
    def departing_task(self) -> str:
        """Message action for departing clients: ``"train"`` = an ordinary training round."""
        return "train"

    def departing_config(self, global_weights: Weights) -> dict[str, Any]:
        """Extra settings sent to the departing clients with their instruction.

        For ``departing_task == "unlearn"`` the client runs the routine registered under
        ``unlearn-method`` (:data:`fed_unlearn.unlearning.CLIENT_ROUTINES`).
        """
        return {"unlearn-method": self.name}

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


def apply_departing_motion(
    global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
) -> "dict[str, np.ndarray]":
    """``w + sum_{u in U} (theta_u - w) + sum_{k in S} (n_k / N_S) (w_k - w)``.

    The combination for methods whose departing clients run a local unlearning routine:
    each departure's unlearning motion is applied in full (concurrent departures add up),
    plus a FedAvg step of the remaining clients if any trained in that round.
    """
    from ..aggregation import pseudo_gradient, weighted_sum

    if not departing:
        raise ValueError("needs at least one departing client's update")
    deltas = [pseudo_gradient(u.weights, global_weights) for u in sorted(departing, key=lambda u: u.client_id)]
    coefs = [1.0] * len(deltas)
    rem = sorted(remaining, key=lambda u: u.client_id)
    if rem:
        n_s = float(sum(u.num_examples for u in rem))
        deltas += [pseudo_gradient(u.weights, global_weights) for u in rem]
        coefs += [u.num_examples / n_s for u in rem]
    step = weighted_sum(deltas, coefs, {k: np.zeros(np.shape(v)) for k, v in global_weights.items()})
    return {k: (np.asarray(g, np.float64) + step[k]).astype(np.asarray(g).dtype) for k, g in global_weights.items()}
