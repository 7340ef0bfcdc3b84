"""Gradient-ascent baseline: the departing client maximises its own training loss.

The classic approximate-unlearning baseline (e.g. Halimi et al., "Federated Unlearning:
How to Efficiently Erase a Client in FL?", 2022, before their projection step): on the
departing client, for ``E`` epochs of minibatches ``B`` of its data,

    theta <- theta + eta * grad_theta CE(theta; B)

(optionally stopping once a minibatch loss reaches ``rho *`` the model's loss on the
client's held-out data); the server applies ``w + sum_{u in U} (theta_u - w)`` and the
remaining clients recover. Unbounded ascent is known to overshoot (the model can end
further from the gold than the original): that is what this baseline shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..metrics import cross_entropy
from ..training import Minibatches, local_steps, predict_logits
from .base import ClientRoutine, LocalRoutineMethod, RoutineInput, forget_loss
from .registry import register_method


@dataclass(frozen=True)
class GradientAscentConfig:
    """Settings of gradient ascent (run-config keys ``gradient-ascent.*``).

    Attributes
    ----------
    lr : float
        Ascent step size ``eta``.
    epochs : int
        Passes over the forget set ``E``.
    batch_size : int
        Minibatch size.
    target_ratio : float
        ``rho`` of the early stop (0, the default, disables it: plain ascent).
    """

    lr: float = 0.01
    epochs: int = 1
    batch_size: int = 32
    target_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1 or self.target_ratio < 0:
            raise ValueError(
                f"gradient-ascent needs lr > 0, epochs >= 1, batch-size >= 1, target-ratio >= 0; got {self}"
            )


def gradient_ascent(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: GradientAscentConfig,
    seed: int,
    reference_loss: float = float("nan"),
    weight_decay: float = 0.0,
) -> int:
    """Minibatch gradient ascent on ``(x, y)`` in place; returns the number of steps taken.

    ``theta <- (1 - eta * lambda) theta + eta * grad CE(theta; B)`` with ``lambda = weight_decay``
    (decoupled decay; 0 for the plain baseline, used by IEU).
    """
    if len(x) == 0:
        raise ValueError("gradient ascent needs a non-empty forget set")
    target = cfg.target_ratio * reference_loss if cfg.target_ratio > 0 and np.isfinite(reference_loss) else float("inf")
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    batches = Minibatches(len(x), cfg.batch_size, np.random.default_rng(seed))

    def ascend(params: list[torch.Tensor], grads: tuple[torch.Tensor, ...], t: int) -> None:
        for p, g in zip(params, grads, strict=False):
            if weight_decay:
                p.mul_(1.0 - cfg.lr * weight_decay)
            p.add_(cfg.lr * g)

    return local_steps(
        model,
        batches,
        cfg.epochs * batches.per_epoch,
        lambda idx, t: F.cross_entropy(model(xt[idx]), yt[idx]),
        update=ascend,
        after_step=lambda t, loss: loss >= target,
    ).steps


def client_unlearn(inp: RoutineInput) -> dict[str, Any]:
    """The departing client's side: local gradient ascent with the settings the server sent."""
    model, forget, heldout = inp.model, inp.forget, inp.heldout
    ref = (
        float(np.mean(cross_entropy(predict_logits(model, heldout[0]), heldout[1])))
        if len(heldout[0])
        else float("nan")
    )
    start = forget_loss(model, forget)
    steps = gradient_ascent(model, *forget, inp.settings, seed=inp.seed, reference_loss=ref)
    end = forget_loss(model, forget)
    return {"train-steps": steps, "forget-loss-start": start, "forget-loss-end": end, "reference-loss": ref}


@register_method
class GradientAscent(LocalRoutineMethod):
    """Departing clients run gradient ascent locally; their motion is applied in full."""

    name = "gradient-ascent"
    config_class = GradientAscentConfig
    client_routine: ClassVar[ClientRoutine | None] = client_unlearn
