"""Projected gradient ascent (PGA) baseline: ascent on the client's data inside an L2 ball.

Reference: A. Halimi, S. Kadhe, A. Rawat, N. Baracaldo, "Federated Unlearning: How to
Efficiently Erase a Client in FL?" (2022, arXiv:2207.05521); settings from the authors'
code (IBM/federated-unlearning).

On the departing client ``u``, from the global model ``w_t`` (FedAvg of round ``t-1`` over
``N`` examples) and its own last local model ``w_u`` (``n_u`` examples), which it keeps:

1. reference model, the FedAvg of the *other* clients' last local models::

       w_ref = (N w_t - n_u w_u) / (N - n_u)

   (with equal sizes, the authors' ``K/(K-1) w_t - 1/(K-1) w_u``);
2. radius ``delta = sqrt( mean_i ||w_ref - w_rand,i||^2 / 3 )`` over 10 freshly
   initialised models ``w_rand,i`` (the authors' code thresholds the *squared* distance
   at a third of its mean over random models);
3. from ``theta = w_ref``, ``E`` epochs of minibatch SGD with momentum on the negated
   cross-entropy (ascent), gradient norm clipped at ``c``, each step followed by the
   projection ``theta <- w_ref + delta (theta - w_ref) / ||theta - w_ref||`` when
   ``||theta - w_ref|| > delta``;
4. early stop once the accuracy on the client's data falls to ``tau`` or below.

The server takes ``theta_u`` as the new global model (``w + sum_U (theta_u - w)`` for
concurrent departures), and the remaining clients recover ("post-training").

Needed beyond a normal round: the departing client's own last local model (kept on the
client, never on the server) and ``N`` of the last round (one number). If the client
has no stored local model (e.g. it restarted), or it stays in the federation (sample
or class deletion: no reference for "without those samples" exists without history),
the reference is the global model ``w_t`` itself; the reply says which (``pga-reference``:
1 = the other clients' average, 0 = the global model).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..aggregation import ClientUpdate, Weights
from ..deletion import DeletionRequest
from ..training import Minibatches, local_steps, predict_logits, trainable
from .base import ClientRoutine, LocalRoutineMethod, RoutineInput, forget_loss
from .registry import register_method


@dataclass(frozen=True)
class PGAConfig:
    """Settings of projected gradient ascent (run-config keys ``pga.*``).

    Attributes
    ----------
    lr, momentum : float
        SGD step size and momentum of the ascent.
    epochs, batch_size : int
        Passes over the forget set and minibatch size.
    clip : float
        Gradient-norm clipping (``<= 0`` disables it).
    stop_accuracy : float
        ``tau``: stop once the accuracy on the forget set is at or below it.
    num_random : int
        Random models averaged for the radius.
    radius_fraction : float
        ``delta^2`` as a fraction of the mean squared distance to random models (1/3).
    """

    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 5
    batch_size: int = 32
    clip: float = 1.0
    stop_accuracy: float = 0.1
    num_random: int = 10
    radius_fraction: float = 1.0 / 3.0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.momentum < 0 or self.epochs < 1 or self.batch_size < 1 or self.num_random < 1:
            raise ValueError(f"pga needs lr > 0, momentum >= 0, epochs, batch-size, num-random >= 1; got {self}")
        if not 0 <= self.stop_accuracy <= 1 or not self.radius_fraction > 0:
            raise ValueError(f"pga needs stop-accuracy in [0, 1] and radius-fraction > 0; got {self}")


def reference_weights(
    global_weights: Weights, last_local: Weights, total_examples: int, own_examples: int
) -> dict[str, np.ndarray]:
    """``w_ref = (N w_t - n_u w_u) / (N - n_u)``: the FedAvg of the other clients' last models.

    Raises
    ------
    ValueError
        If ``N <= n_u`` (no other client) or the arrays do not match.
    """
    if not total_examples > own_examples > 0:
        raise ValueError(f"need N > n_u > 0 for the reference model, got N={total_examples}, n_u={own_examples}")
    if set(global_weights) != set(last_local):
        raise ValueError("the stored local model does not match the global model's arrays")
    n, m = float(total_examples), float(own_examples)
    return {
        k: ((n * np.asarray(g, np.float64) - m * np.asarray(last_local[k], np.float64)) / (n - m)).astype(
            np.asarray(g).dtype
        )
        for k, g in global_weights.items()
    }


def random_like(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer re-initialised (its own init scheme), seeded."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters as one flat vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)]).clone()


def radius(model_ref: nn.Module, cfg: PGAConfig, seed: int) -> float:
    """``delta = sqrt(radius_fraction * mean_i ||w_ref - w_rand,i||^2)``."""
    ref = flat_params(model_ref)
    sq = [float(torch.sum((ref - flat_params(random_like(model_ref, seed + i))) ** 2)) for i in range(cfg.num_random)]
    return float(np.sqrt(cfg.radius_fraction * np.mean(sq)))


def project(model: nn.Module, ref: torch.Tensor, delta: float) -> bool:
    """Project the parameters onto the ball ``||theta - ref|| <= delta`` in place; whether it moved them."""
    theta = flat_params(model)
    dist = float(torch.norm(theta - ref))
    if dist <= delta:
        return False
    proj = ref + (theta - ref) * (delta / dist)
    torch.nn.utils.vector_to_parameters(proj, trainable(model))
    return True


def projected_ascent(
    model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: PGAConfig, delta: float, seed: int
) -> dict[str, float]:
    """Steps 3-4 in place on ``model`` (which starts at ``w_ref``); returns steps, projections, final accuracy."""
    if len(x) == 0:
        raise ValueError("projected gradient ascent needs a non-empty forget set")
    ref = flat_params(model)
    opt = torch.optim.SGD(trainable(model), lr=cfg.lr, momentum=cfg.momentum)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def acc() -> float:
        return float(np.mean(np.argmax(predict_logits(model, x), axis=1) == y))

    state = {"acc": acc(), "projections": 0}
    if state["acc"] <= cfg.stop_accuracy:
        return {"train-steps": 0, "projections": 0, "forget-acc-end": state["acc"]}

    def after(t: int, loss: float) -> bool:
        with torch.no_grad():
            state["projections"] += int(project(model, ref, delta))
        state["acc"] = acc()
        return state["acc"] <= cfg.stop_accuracy

    batches = Minibatches(len(x), cfg.batch_size, np.random.default_rng(seed))
    stats = local_steps(
        model,
        batches,
        cfg.epochs * batches.per_epoch,
        lambda idx, t: -F.cross_entropy(model(xt[idx]), yt[idx]),
        optimizer=opt,
        clip_norm=cfg.clip,
        after_step=after,
    )
    return {"train-steps": stats.steps, "projections": state["projections"], "forget-acc-end": state["acc"]}


def client_unlearn(inp: RoutineInput) -> dict[str, Any]:
    """The departing client's side: reference model, radius, projected ascent (in place on ``inp.model``)."""
    model, instruction = inp.model, inp.instruction
    global_weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    exact = (
        bool(instruction.get("pga-leaves", False))
        and inp.last_local is not None
        and int(instruction.get("pga-round-examples", 0)) > 0
    )
    if exact and inp.last_local is not None:
        ref = reference_weights(
            global_weights, inp.last_local, int(instruction["pga-round-examples"]), inp.last_local_n
        )
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ref.items()})
    start = forget_loss(model, inp.forget)
    delta = radius(model, inp.settings, inp.seed)
    out = projected_ascent(model, *inp.forget, inp.settings, delta, inp.seed)
    end = forget_loss(model, inp.forget)
    return {**out, "radius": delta, "pga-reference": int(exact), "forget-loss-start": start, "forget-loss-end": end}


@register_method
class ProjectedGradientAscent(LocalRoutineMethod):
    """Departing clients run PGA from their reference model; the server applies their motion."""

    name = "pga"
    config_class = PGAConfig
    client_routine: ClassVar[ClientRoutine | None] = client_unlearn
    client_keeps_last_local = True

    def __init__(self, config: PGAConfig | None = None) -> None:
        super().__init__(config)
        self._last_round_examples = 0
        self._leave = True

    def observe(self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]) -> None:
        """Remember ``N``, the examples behind the last ordinary round (one number, not history)."""
        self._last_round_examples = int(sum(u.num_examples for u in updates))

    def begin(self, requests: Sequence[int], leave: bool, request: DeletionRequest | None = None) -> None:  # noqa: D102
        self._leave = leave

    def departing_config(self, global_weights: Weights) -> dict[str, Any]:  # noqa: D102
        return {
            **super().departing_config(global_weights),
            "pga-round-examples": self._last_round_examples,
            "pga-leaves": self._leave,
        }
