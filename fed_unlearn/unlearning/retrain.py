"""Retrain baseline: federated retraining from scratch without the deleted data.

The exact-unlearning reference every approximate method is measured against
(Bourtoule et al., "Machine Unlearning", IEEE S&P 2021, call it the *naive* exact method;
Liu et al. 2021 and Halimi et al. 2022 use it as the federated upper bar). At the
request the global model is reset to the initial model and the remaining clients
(on their retained data) run as many FedAvg rounds as the federation had run before
the request, with the same per-round minibatch seeds:

    w~_0 = w_0;   w~_{j+1} = sum_{k in S} (n_k / N_S) w_k(w~_j),   j = 0 .. d-2

so in this harness it reproduces the gold federation exactly (a check of the harness:
its distance to the gold is 0), at 100 % of the gold's client-compute and ``d-1``
server rounds. It keeps one model, the initial one (reproducible from the seed anyway);
no per-client history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..aggregation import ClientUpdate, Weights, fedavg
from .base import RemainingOnlyMethod
from .registry import register_method


@dataclass(frozen=True)
class RetrainConfig:
    """Retraining has no settings (run-config prefix ``retrain.``)."""


@register_method
class Retrain(RemainingOnlyMethod):
    """Reset to the initial model; FedAvg over the remaining clients for as many rounds as before."""

    name = "retrain"
    config_class = RetrainConfig
    serves_online = False

    def __init__(self, config: RetrainConfig | None = None) -> None:
        super().__init__(config)
        self._initial: dict[str, np.ndarray] | None = None
        self._rounds_before = 0
        self._step = 0

    @property
    def num_rounds(self) -> int:  # noqa: D102
        return max(1, self._rounds_before)

    def rounds_needed(self, rounds_before: int) -> int:  # noqa: D102
        return max(1, rounds_before)

    def observe(self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]) -> None:
        """Keep the model the first round started from (the initial model); count the rounds."""
        if self._initial is None:
            self._initial = {k: np.array(v, copy=True) for k, v in global_weights.items()}
        self._rounds_before += 1

    def prepare_global(self, global_weights: Weights) -> Weights:
        """The initial model in the first unlearning round, then the model being retrained."""
        if self._step == 0:
            if self._initial is None:
                raise RuntimeError("retrain needs the initial model: no ordinary round was observed before the request")
            return self._initial
        return global_weights

    def remaining_config(self) -> dict[str, Any]:
        """Replay the minibatch seeds of the original round ``j + 1`` (the gold's)."""
        return {"seed-round": self._step + 1}

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:  # noqa: D102
        if not remaining:
            raise ValueError("retraining needs at least one remaining client's update")
        self._step += 1
        return dict(fedavg(remaining))
