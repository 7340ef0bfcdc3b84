"""NoT baseline: federated unlearning by weight negation, then fine-tuning.

Reference: Y. H. Khalil, L. Brunswic, S. Lamghari, X. Li, M. Beitollahi, X. Chen,
"NoT: Federated Unlearning via Weight Negation", CVPR 2025.

In the unlearning round the server negates the parameters of selected layers of the
global model, ``w_l <- -w_l`` for ``l`` in ``L`` (default: the first weight layer), which
perturbs the model far from its optimum without any data or stored history; the
remaining clients then train from the negated model and FedAvg (and the recovery
rounds) re-learn from retained data only:

    w' = w with w'_l = -w_l for l in L;   w_{t+1} = sum_{k in S} (n_k / N_S) w_k   (trained from w')

The departing clients take no part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..aggregation import ClientUpdate, Weights, fedavg
from ..spectral import layer_of
from .base import RemainingOnlyMethod
from .registry import register_method


@dataclass(frozen=True)
class NegationConfig:
    """Settings of NoT (run-config keys ``not.*``).

    Attributes
    ----------
    layers : str
        Comma-separated layer names (state-dict prefixes such as ``net.1``) whose weight and
        bias are negated; empty (default) = the first layer that has a weight matrix.
    """

    layers: str = ""


def negated_layers(global_weights: Weights, layers: str) -> list[str]:
    """The layer names NoT negates (validated against the model)."""
    available = [layer_of(k) for k, v in global_weights.items() if k.endswith("weight") and np.ndim(v) >= 2]
    if not available:
        raise ValueError("NoT needs a model with at least one weight matrix")
    chosen = [s.strip() for s in layers.split(",") if s.strip()] or available[:1]
    unknown = sorted(set(chosen) - {layer_of(k) for k in global_weights})
    if unknown:
        raise ValueError(f"not.layers names unknown layer(s) {unknown}; layers: {sorted(set(available))}")
    return chosen


def negate(global_weights: Weights, layers: Sequence[str]) -> dict[str, np.ndarray]:
    """``w`` with every parameter of ``layers`` negated (other arrays copied unchanged)."""
    return {
        k: (-np.asarray(v) if layer_of(k) in set(layers) else np.array(v, copy=True)) for k, v in global_weights.items()
    }


@register_method
class Negation(RemainingOnlyMethod):
    """NoT: negate selected layers of the global model, then FedAvg over the remaining clients."""

    name = "not"
    config_class = NegationConfig
    config: NegationConfig

    def prepare_global(self, global_weights: Weights) -> dict[str, np.ndarray]:  # noqa: D102
        return negate(global_weights, negated_layers(global_weights, self.config.layers))

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:  # noqa: D102
        if not remaining:
            raise ValueError("NoT needs at least one remaining client's update")
        return dict(fedavg(remaining))
