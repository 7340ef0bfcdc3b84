"""FedEraser baseline: calibrated retraining from stored client updates.

Reference: G. Liu, X. Ma, Y. Yang, C. Wang, J. Liu, "FedEraser: Enabling Efficient
Client-Level Data Removal from Federated Learning Models", IEEE/ACM IWQoS 2021.

Unlike every other method here, FedEraser **stores history**: during ordinary training
the server keeps, at every ``interval``-th round ``t_j``, the global model ``W_j`` the
round started from and every client's update ``U_{k,j} = w_{k,j} - W_j`` with its
example count. That storage lives inside this method object (owned by the strategy)
and its peak size is reported (``history_bytes``): ``J x (K + 1)`` model copies for
``J`` checkpoints and ``K`` clients, growing with clients x rounds.

Unlearning (remaining clients ``S``, old aggregated update of checkpoint ``j``
``U_j = sum_{k in S} (n_k / N_S) U_{k,j}``):

    w~_1 = W_1 + U_1                                  (no communication: W_1 = w_0)
    for j = 2 .. J:                                   (one server round each)
        remaining clients calibrate: E_cal = max(1, round(r * E)) local epochs from w~_j
        U^_j = sum_{k in S} (n_k / N_S) (w^_k - w~_j)
        w~_{j+1} = w~_j + ||U_j||_l * U^_j,l / ||U^_j,l||     per layer l (state-dict array)

i.e. the calibration training gives the direction and the stored updates the step
length, per layer, as in the authors' code (``unlearning_step_once``). Rounds between
checkpoints are skipped (the speed-up of ``interval > 1``). ``J - 1`` server rounds
(one, with no training, when ``J = 1``), then recovery as for every method.

FedEraser was designed for client removal. For sample or class deletion the
requesting clients stay in ``S`` and calibrate on their retained data, but the stored
step lengths still include the deleted samples' contribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..aggregation import ClientUpdate, Weights, pseudo_gradient
from ..deletion import DeletionRequest
from .base import RemainingOnlyMethod
from .registry import register_method


@dataclass(frozen=True)
class FedEraserConfig:
    """Settings of FedEraser (run-config keys ``federaser.*``).

    Attributes
    ----------
    interval : int
        ``Delta t``: a checkpoint is stored every ``interval`` rounds (1 = every round).
    calibration_ratio : float
        ``r``: calibration training runs ``max(1, round(r * E))`` of the ``E`` local epochs.
    """

    interval: int = 1
    calibration_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.interval < 1 or not 0 < self.calibration_ratio <= 1:
            raise ValueError(f"federaser needs interval >= 1 and calibration-ratio in (0, 1]; got {self}")


@dataclass
class Checkpoint:
    """What FedEraser stores for one round."""

    server_round: int
    start: dict[str, np.ndarray]
    updates: dict[int, tuple[dict[str, np.ndarray], int]]

    @property
    def nbytes(self) -> int:  # noqa: D102
        return sum(a.nbytes for a in self.start.values()) + sum(
            a.nbytes for u, _ in self.updates.values() for a in u.values()
        )


def aggregated_update(ckpt: Checkpoint, clients: Sequence[int]) -> dict[str, np.ndarray]:
    """``U_j = sum_{k in S} (n_k / N_S) U_{k,j}`` over the stored updates of ``clients`` (float64).

    Raises
    ------
    ValueError
        If none of ``clients`` has an update stored at this checkpoint.
    """
    rows = [(ckpt.updates[c][0], ckpt.updates[c][1]) for c in sorted(clients) if c in ckpt.updates]
    if not rows:
        raise ValueError(f"no stored update of clients {sorted(clients)} at round {ckpt.server_round}")
    total = float(sum(n for _, n in rows))
    out: dict[str, np.ndarray] = {}
    for k, start in ckpt.start.items():
        acc = np.zeros(np.shape(start), np.float64)
        for u, n in rows:
            acc += (n / total) * np.asarray(u[k], np.float64)
        out[k] = acc
    return out


def calibrated_step(old_update: Weights, new_update: Weights, eps: float = 1e-12) -> dict[str, np.ndarray]:
    """``||U_l|| * U^_l / ||U^_l||`` per array: the old step length in the calibrated direction.

    An array whose calibrated update is zero (or non-float) gets a zero step.
    """
    out = {}
    for k, new in new_update.items():
        new = np.asarray(new, np.float64)
        norm_new = float(np.linalg.norm(new))
        out[k] = (
            np.zeros_like(new)
            if norm_new <= eps
            else float(np.linalg.norm(np.asarray(old_update[k], np.float64))) * new / norm_new
        )
    return out


def _add(w: Weights, step: Weights) -> dict[str, np.ndarray]:
    return {
        k: (np.asarray(v, np.float64) + step[k]).astype(np.asarray(v).dtype)
        if np.issubdtype(np.asarray(v).dtype, np.floating)
        else np.array(v, copy=True)
        for k, v in w.items()
    }


@register_method
class FedEraser(RemainingOnlyMethod):
    """Calibrated reconstruction from the stored per-client updates of the remaining clients."""

    name = "federaser"
    config_class = FedEraserConfig
    serves_online = False
    keeps_history = True
    config: FedEraserConfig

    def __init__(self, config: FedEraserConfig | None = None) -> None:
        super().__init__(config)
        self.checkpoints: list[Checkpoint] = []
        self._peak_bytes = 0
        self._remaining: list[int] | None = None
        self._current: dict[str, np.ndarray] | None = None
        self._step = 0
        self._rounds: int | None = None

    # -- history --------------------------------------------------------------------
    def observe(self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]) -> None:
        """Store the round's start model and every client's update at checkpoint rounds."""
        if (server_round - 1) % self.config.interval:
            return
        start = {k: np.array(v, copy=True) for k, v in global_weights.items()}
        ups = {}
        for u in updates:
            delta = pseudo_gradient(u.weights, global_weights)
            ups[u.client_id] = (
                {k: d.astype(np.asarray(global_weights[k]).dtype) for k, d in delta.items()},
                int(u.num_examples),
            )
        self.checkpoints.append(Checkpoint(server_round, start, ups))
        self._peak_bytes = max(self._peak_bytes, self.history_bytes_now())

    def history_bytes_now(self) -> int:
        """Bytes held right now."""
        return sum(c.nbytes for c in self.checkpoints)

    def history_bytes(self) -> int:
        """Peak bytes of stored history (the memory cost FedEraser pays for unlearning)."""
        return self._peak_bytes

    # -- unlearning -----------------------------------------------------------------
    @property
    def num_rounds(self) -> int:  # noqa: D102
        return self._rounds if self._rounds is not None else max(1, len(self.checkpoints) - 1)

    def rounds_needed(self, rounds_before: int) -> int:  # noqa: D102
        return max(1, math.ceil(rounds_before / self.config.interval) - 1)

    @property
    def remaining_clients_train(self) -> bool:  # noqa: D102
        return self.num_rounds > 1 or len(self.checkpoints) > 1

    def begin(self, requests: Sequence[int], leave: bool, request: DeletionRequest | None = None) -> None:
        """The request: the clients that stay are those stored minus the leaving ones."""
        if not self.checkpoints:
            raise RuntimeError("FedEraser has no stored rounds: it must observe training before a request")
        stored = set().union(*(c.updates for c in self.checkpoints))
        self._remaining = sorted(stored - (set(requests) if leave else set()))
        if not self._remaining:
            raise ValueError("FedEraser: no remaining client has stored updates")
        self._rounds = max(1, len(self.checkpoints) - 1)

    def prepare_global(self, global_weights: Weights) -> Weights:
        """Step 0: ``w~_1 = W_1 + U_1``, then ``w~_j`` (the model being reconstructed)."""
        if self._step == 0:
            if self._remaining is None:
                raise RuntimeError("FedEraser.begin() was not called before unlearning")
            first = self.checkpoints[0]
            self._current = _add(first.start, aggregated_update(first, self._remaining))
        assert self._current is not None
        return self._current

    def remaining_config(self) -> dict[str, Any]:
        """Calibration training: a fraction of the local epochs."""
        return {"local-epochs-ratio": self.config.calibration_ratio}

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """``w~_{j+1} = w~_j + ||U_j|| U^_j / ||U^_j||`` per layer (no-op round when ``J = 1``)."""
        assert self._current is not None and self._remaining is not None
        if self._step + 1 < len(self.checkpoints):
            if not remaining:
                raise ValueError("FedEraser calibration needs at least one remaining client's update")
            n = float(sum(u.num_examples for u in remaining))
            cal = {k: np.zeros(np.shape(v)) for k, v in self._current.items()}
            for u in remaining:
                for k, d in pseudo_gradient(u.weights, self._current).items():
                    cal[k] += (u.num_examples / n) * d
            old = aggregated_update(self.checkpoints[self._step + 1], self._remaining)
            self._current = _add(self._current, calibrated_step(old, cal))
        self._step += 1
        out = self._current
        if self._step >= self.num_rounds:
            self.checkpoints = []  # the stored history holds the departed data's influence: drop it
        return out
