"""AMUN: Adversarial Machine UNlearning, federated.

Reference: A. Ebrahimpour-Boroojeny, H. Sundaram, V. Chandrasekaran, "AMUN: Adversarial
Machine UNlearning" (2025, arXiv:2503.00917).

On a client holding data to forget, from the global model ``theta_0``:

1. **Adversarial examples** of every forget sample ``(x, y)``: untargeted L2 PGD on inputs
   in ``[0, 1]``, ``T = 50`` steps of size ``alpha = eps / 10``::

       delta <- Proj_{||delta||_2 <= eps} ( delta + alpha * g / ||g||_2 ),   g = grad_delta CE(f(x + delta), y)
       x + delta clipped to [0, 1]

   starting with ``eps = 0.04``; samples the model still classifies correctly are
   attacked again with ``eps`` doubled (up to ``max-doublings`` times), so each forget
   sample gets an adversarial example close to it. Its label is the model's prediction
   on it, ``y_adv = argmax f(x_adv)``.
2. **Fine-tuning** on ``D_f U D_adv`` (forget samples with their labels, adversarial
   examples with theirs), optionally with the client's retained data too, by SGD with
   learning rate 0.01, momentum 0.9 and weight decay 5e-4 for ``epochs`` epochs. The
   model keeps fitting the forget samples but learns that their immediate neighbourhood
   belongs elsewhere: its confidence on them drops to that of unseen points, which is
   what a retrained model shows (and what a membership-inference attack reads).

In the federation (the reading of "combined as for PUF"): the round is an ordinary
training round for the remaining clients, the forgetting clients run AMUN locally, and
the server applies ``w + sum_{k in S} (n_k/N_S) Delta_k + s * sum_{u in U} c_u (theta_u - w)``
(``c_u = 1`` per request, forget-set-weighted for a class spread over clients;
``s = amun.scale``). AMUN's update already points away from the forget set, so unlike
PUF's training pseudo-gradient it is added, not negated. Recovery follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..aggregation import ClientUpdate, Weights
from .base import ClientRoutine, RoutineInput, UnlearningMethod, apply_departing_motion, forget_loss
from .registry import register_method


@dataclass(frozen=True)
class AMUNConfig:
    """Settings of AMUN (run-config keys ``amun.*``).

    Attributes
    ----------
    epsilon : float
        Initial L2 radius of the PGD attack.
    pgd_steps : int
        PGD steps per attack (step size ``epsilon / 10``).
    max_doublings : int
        How often ``epsilon`` may be doubled for samples still classified correctly.
    epochs, batch_size : int
        Fine-tuning epochs over ``D_f U D_adv`` (and retained data) and minibatch size.
    lr, momentum, weight_decay : float
        SGD settings of the fine-tuning.
    use_retain : bool
        Also fine-tune on the client's retained data (sample deletion; a departing
        client has none).
    scale : float
        ``s``: weight of the forgetting clients' motion in the aggregation.
    """

    epsilon: float = 0.04
    pgd_steps: int = 50
    max_doublings: int = 8
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0005
    use_retain: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        if (
            not self.epsilon > 0
            or self.pgd_steps < 1
            or self.max_doublings < 0
            or self.epochs < 0
            or self.batch_size < 1
        ):
            raise ValueError(
                f"amun needs epsilon > 0, pgd-steps >= 1, max-doublings >= 0, epochs >= 0, batch-size >= 1; got {self}"
            )
        if not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0 or not self.scale > 0:
            raise ValueError(f"amun needs lr > 0, momentum >= 0, weight-decay >= 0, scale > 0; got {self}")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(len(t), -1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (t.ndim - 1)))


def pgd_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int, lo: float = 0.0, hi: float = 1.0
) -> torch.Tensor:
    """Untargeted L2 PGD: ``x + delta`` with ``||delta_i|| <= eps_i``, in ``[lo, hi]``, raising the loss on ``y``.

    ``eps``: one radius per sample. Step size ``eps / 10``; normalised-gradient steps.
    """
    model.eval()
    eps = eps.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + (eps / 10) * g / _flat_norm(g)
            delta = delta * torch.clamp(eps / _flat_norm(delta), max=1.0)  # back into the ball
            delta = torch.clamp(x + delta, lo, hi) - x  # and into the input domain
    return (x + delta).detach()


def adversarial_examples(
    model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: AMUNConfig, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AMUN's adversarial set: ``(x_adv, y_adv, eps_used)``; ``y_adv`` = the model's prediction on ``x_adv``.

    Samples still classified as ``y`` after ``max_doublings`` doublings keep their last
    attack (their ``y_adv`` may equal ``y``).
    """
    lo, hi = (0.0, 1.0) if x.min() >= 0 and x.max() <= 1 else (float(x.min()), float(x.max()))
    out_x, out_y, out_eps = [], [], []
    for s in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[s : s + batch_size]))
        yb = torch.from_numpy(np.ascontiguousarray(y[s : s + batch_size]))
        eps = torch.full((len(xb),), cfg.epsilon, dtype=torch.float64)
        adv = pgd_l2(model, xb, yb, eps, cfg.pgd_steps, lo, hi)
        for _ in range(cfg.max_doublings):
            with torch.no_grad():
                still = model(adv).argmax(1) == yb
            if not bool(still.any()):
                break
            eps = torch.where(still, eps * 2, eps)
            idx = torch.nonzero(still).flatten()
            adv[idx] = pgd_l2(model, xb[idx], yb[idx], eps[idx], cfg.pgd_steps, lo, hi)
        with torch.no_grad():
            out_y.append(model(adv).argmax(1).numpy())
        out_x.append(adv.numpy())
        out_eps.append(eps.numpy())
    return np.concatenate(out_x), np.concatenate(out_y), np.concatenate(out_eps)


def amun_unlearn(
    model: nn.Module,
    forget: tuple[np.ndarray, np.ndarray],
    cfg: AMUNConfig,
    seed: int,
    retain: tuple[np.ndarray, np.ndarray] | None = None,
    augment: str = "none",
) -> dict[str, float]:
    """Steps 1-2 of the module docstring, in place on ``model``; returns diagnostics."""
    from ..training import TrainSettings, train_local

    x, y = forget
    if len(x) == 0:
        raise ValueError("AMUN needs a non-empty forget set")
    x_adv, y_adv, eps = adversarial_examples(model, x, y, cfg)
    xs, ys = [x, x_adv], [y, y_adv]
    if cfg.use_retain and retain is not None and len(retain[0]):
        xs.append(retain[0])
        ys.append(retain[1])
    # step 2 is ordinary local SGD on forget + adversarial (+ retained) examples
    settings = TrainSettings(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    steps = train_local(model, np.concatenate(xs), np.concatenate(ys), settings, seed, augment=augment).steps
    return {
        "train-steps": steps,
        "adversarial-n": len(x_adv),
        "flipped": float(np.mean(y_adv != y)),
        "mean-epsilon": float(np.mean(eps)),
        "max-epsilon": float(np.max(eps)),
    }


def client_unlearn(inp: RoutineInput) -> dict[str, Any]:
    """The forgetting client's side of AMUN, with the settings the server sent."""
    start = forget_loss(inp.model, inp.forget)
    out = amun_unlearn(inp.model, inp.forget, inp.settings, inp.seed, retain=inp.retain, augment=inp.augment)
    return {**out, "forget-loss-start": start, "forget-loss-end": forget_loss(inp.model, inp.forget)}


@register_method
class AMUN(UnlearningMethod):
    """Remaining clients train; forgetting clients run AMUN; the server adds both motions."""

    name = "amun"
    config_class = AMUNConfig
    client_routine: ClassVar[ClientRoutine | None] = client_unlearn
    config: AMUNConfig

    @property
    def remaining_clients_train(self) -> bool:  # noqa: D102
        return True

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:  # noqa: D102
        if self.config.scale == 1.0:
            return apply_departing_motion(global_weights, remaining, departing, self.joint_request)
        scaled = [
            ClientUpdate(
                u.client_id,
                {
                    k: np.asarray(global_weights[k], np.float64)
                    + self.config.scale
                    * (np.asarray(u.weights[k], np.float64) - np.asarray(global_weights[k], np.float64))
                    for k in global_weights
                },
                u.num_examples,
            )
            for u in departing
        ]
        return apply_departing_motion(global_weights, remaining, scaled, self.joint_request)
