"""PUF: unlearning with negated, scaled pseudo-gradients.

Reference: A. Mora, C. Mazzocca, R. Montanari, P. Bellavista, "Federated Unlearning
Made Practical: Seamless Integration via Negated Pseudo-Gradients" (2025, arXiv:2504.05822).

In the unlearning round every client trains locally as in any round; the departing
clients need no special code. With ``w_t`` the global model sent out, ``w_k`` the model
client ``k`` returns, the pseudo-gradient ``Delta_k = w_k - w_t``, ``S`` the remaining and
``U`` the departing clients:

PUF-regular (everyone trains)::

    N = sum_{k in S u U} n_k
    w_{t+1} = w_t + sum_{k in S} (n_k / N) Delta_k  -  eta_u * sum_{u in U} (n_u / N) Delta_u

PUF-special (only the departing clients train that round)::

    N_U = sum_{u in U} n_u
    w_{t+1} = w_t - eta_u * sum_{u in U} (n_u / N_U) Delta_u

``eta_u`` is the unlearning scale. The reference code uses ``eta_u = 20`` for regular
and ``eta_u = 2`` for special with 10 clients; with equal-size clients both give an
ascent step of ``2 * Delta_u`` per departing client. ``scale = 0`` (the default) keeps
that effective step for any federation size: ``eta_u = 2 K`` for regular, with ``K`` the
number of clients in the round (20 for 10 clients), and ``eta_u = 2`` for special.
Recovery afterwards is ordinary FedAvg over ``S``. Several departures in one round are the sums over ``U`` above.
Nothing beyond that round's replies is needed: no per-client history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..aggregation import ClientUpdate, Weights, weighted_delta_sum
from .base import UnlearningMethod
from .registry import register_method

PUF_VARIANTS = ("regular", "special")
#: Ascent step of the reference settings, in units of a departing client's pseudo-gradient.
REFERENCE_STEP = 2.0


@dataclass(frozen=True)
class PUFConfig:
    """Settings of PUF (run-config keys ``puf.*``).

    Attributes
    ----------
    variant : {"regular", "special"}
        ``regular``: remaining clients train in the unlearning round too.
        ``special``: only the departing clients train in it.
    scale : float
        The unlearning scale ``eta_u`` (> 0). ``0`` (default) picks the reference
        setting for the federation size: ``2 K`` for regular with ``K`` clients in the
        round (20 with 10 clients, as the reference), 2 for special.
    """

    variant: str = "regular"
    scale: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in PUF_VARIANTS:
            raise ValueError(f"puf.variant must be one of {', '.join(PUF_VARIANTS)}, got '{self.variant}'")
        if self.scale < 0 or not np.isfinite(self.scale):
            raise ValueError(f"puf.scale must be a finite number >= 0, got {self.scale}")

    def eta(self, num_clients: int) -> float:
        """The scale applied in a round with ``num_clients`` participating clients."""
        if self.scale > 0:
            return self.scale
        return REFERENCE_STEP * num_clients if self.variant == "regular" else REFERENCE_STEP


def puf_update(
    global_weights: Weights,
    remaining: Sequence[ClientUpdate],
    departing: Sequence[ClientUpdate],
    eta: float,
    variant: str = "regular",
) -> dict[str, np.ndarray]:
    """Apply the PUF rule (module docstring) to one round's replies.

    Parameters
    ----------
    global_weights : Mapping[str, np.ndarray]
        ``w_t``, the model the clients started from.
    remaining, departing : sequence of ClientUpdate
        Replies of ``S`` and ``U``. ``special`` ignores ``remaining``.
    eta : float
        Unlearning scale ``eta_u``.
    variant : {"regular", "special"}

    Returns
    -------
    dict
        ``w_{t+1}`` with the dtypes of ``global_weights``.
    """
    if not departing:
        raise ValueError("PUF needs at least one departing client's update")
    if variant not in PUF_VARIANTS:
        raise ValueError(f"unknown PUF variant '{variant}'")
    rem = sorted(remaining, key=lambda u: u.client_id) if variant == "regular" else []
    dep = sorted(departing, key=lambda u: u.client_id)
    total = float(sum(u.num_examples for u in rem) + sum(u.num_examples for u in dep))
    coefs = [u.num_examples / total for u in rem] + [-eta * u.num_examples / total for u in dep]
    step = weighted_delta_sum([u.weights for u in rem + dep], coefs, global_weights)
    return {
        k: (np.asarray(g, np.float64) + step[k]).astype(np.asarray(g).dtype)
        if np.issubdtype(np.asarray(g).dtype, np.floating)
        else np.array(g, copy=True)
        for k, g in global_weights.items()
    }


@register_method
class PUF(UnlearningMethod):
    """PUF as a registry method: departing clients run an ordinary training round."""

    name = "puf"
    config_class = PUFConfig
    config: PUFConfig

    @property
    def remaining_clients_train(self) -> bool:  # noqa: D102
        return self.config.variant == "regular"

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:  # noqa: D102
        k = len(departing) + (len(remaining) if self.config.variant == "regular" else 0)
        return puf_update(global_weights, remaining, departing, self.config.eta(k), self.config.variant)


@register_method
class FixedPUF(PUF):
    """The reference PUF: the fixed scale of the paper, never calibrated (for comparison)."""

    name = "puf-fixed"
    calibratable = False
