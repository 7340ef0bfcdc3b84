"""Fine-tuning baseline: the departing clients simply stop participating.

The unlearning round and every later round are FedAvg over the remaining clients
only; the departing clients' influence fades only as far as continued training
overwrites it. The natural lower bar for any unlearning method (used as a baseline
by, e.g., Halimi et al. 2022 and Mora et al. 2025): it costs nothing extra, but the
model still holds what it learned from the departed data.

    w_{t+1} = sum_{k in S} (n_k / N_S) w_k
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..aggregation import ClientUpdate, Weights, fedavg
from .base import RemainingOnlyMethod
from .registry import register_method


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tuning has no settings (run-config prefix ``fine-tune.``)."""


@register_method
class FineTune(RemainingOnlyMethod):
    """Continue FedAvg with the remaining clients only."""

    name = "fine-tune"
    config_class = FineTuneConfig

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:  # noqa: D102
        if not remaining:
            raise ValueError("fine-tuning needs at least one remaining client's update")
        return dict(fedavg(remaining))
