"""MPRU: class unlearning as an output filter (projection-redistribution), data-free.

Reference: M. Peng, D. Gunamardi, I. Tjuawinata, K.-Y. Lam, "MPRU: Modular
Projection-Redistribution Unlearning as Output Filter for Classification Pipelines"
(2025, arXiv:2510.26230): treat learning class ``f`` as the last step of a sequence and
undo it by a layer appended to the model: *project* the output onto the classes that
remain and *redistribute* the removed class's probability over them. No data, no
retraining, any model.

The filter implemented here (our reading of the redistribution: in proportion to the
probabilities the model gives the remaining classes, i.e. the model's own conditional
distribution given "not ``f``")::

    p'(f|x) = 0,      p'(k|x) = p(k|x) / (1 - p(f|x))    for k != f

It keeps the order of the remaining classes and sums to 1. In a federation the filter
is applied to the global model by the server alone, exactly, as an edit of the output
layer: the row of ``f`` in the last weight matrix is set to 0 and its bias to ``-1e4``,
so ``softmax`` gives ``f`` a probability of ``exp(-1e4) = 0`` in floating point and the
other classes exactly ``p(k|x) / (1 - p(f|x))`` (softmax is invariant to the common
factor). No client trains in the unlearning round; recovery rounds, if any, cannot
revive the class (its logit gets no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..aggregation import ClientUpdate, Weights
from ..deletion import DeletionRequest
from .base import UnlearningMethod
from .registry import register_method

#: Logit given to the removed class: exp(-1e4) underflows to exactly 0.
DEAD_LOGIT = -1.0e4


def redistribute(probs: np.ndarray, removed: Sequence[int]) -> np.ndarray:
    """The MPRU output filter on probability rows: removed classes 0, the rest renormalised.

    Raises
    ------
    ValueError
        If every class is removed.
    """
    p = np.asarray(probs, np.float64)
    keep = np.ones(p.shape[1], bool)
    keep[list(removed)] = False
    if not keep.any():
        raise ValueError("every class is removed")
    out = np.where(keep[None, :], p, 0.0)
    return out / np.clip(out.sum(axis=1, keepdims=True), 1e-300, None)


def output_layer(weights: Weights) -> tuple[str, str | None]:
    """``(weight key, bias key)`` of the model's output layer: the last 2-D weight of the state dict."""
    keys = [k for k, v in weights.items() if k.endswith("weight") and np.ndim(v) == 2]
    if not keys:
        raise ValueError("MPRU needs a model whose last layer is a weight matrix")
    w = keys[-1]
    b = w[: -len("weight")] + "bias"
    return w, (b if b in weights else None)


def filter_weights(weights: Weights, removed: Sequence[int]) -> dict[str, np.ndarray]:
    """The model with the MPRU filter built into its output layer (see the module docstring)."""
    wkey, bkey = output_layer(weights)
    if bkey is None:
        raise ValueError("MPRU's exact filter needs an output bias")
    out = {k: np.array(v, copy=True) for k, v in weights.items()}
    classes = out[wkey].shape[0]
    bad = [c for c in removed if not 0 <= c < classes]
    if bad:
        raise ValueError(f"class(es) {bad} do not exist: the output layer has {classes} classes")
    for c in removed:
        out[wkey][c, :] = 0.0
        out[bkey][c] = DEAD_LOGIT
    return out


@dataclass(frozen=True)
class MPRUConfig:
    """MPRU has no settings (run-config prefix ``mpru.``); the class is ``unlearn.class``."""


@register_method
class MPRU(UnlearningMethod):
    """Server-side, data-free: append the filter to the global model; nobody trains."""

    name = "mpru"
    config_class = MPRUConfig
    scenarios = ("class",)

    def __init__(self, config: MPRUConfig | None = None) -> None:
        super().__init__(config)
        self.removed: tuple[int, ...] = ()

    def begin(self, requests: Sequence[int], leave: bool, request: DeletionRequest | None = None) -> None:
        """MPRU removes a class: the request names it."""
        if request is None or request.scenario != "class":
            raise ValueError("mpru unlearns a class: it needs a class deletion request")
        self.removed = (request.forget_class,)

    @property
    def remaining_clients_train(self) -> bool:  # noqa: D102
        return False

    @property
    def departing_clients_train(self) -> bool:  # noqa: D102
        return False

    def prepare_global(self, global_weights: Weights) -> dict[str, np.ndarray]:  # noqa: D102
        if not self.removed:
            raise RuntimeError("mpru was not told which class to remove")
        return filter_weights(global_weights, self.removed)

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:  # noqa: D102
        return {k: np.array(v, copy=True) for k, v in global_weights.items()}
