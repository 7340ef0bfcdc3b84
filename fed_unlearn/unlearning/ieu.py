"""IEU baseline: gradient ascent with decoupled weight decay, then noisy weights.

IEU combines gradient ascent, noisy weights and weight decay; the formulas below are
exactly what runs (no reference implementation was available to compare with). It
combines the three classic ingredients of approximate unlearning: ascent
on the forget set (e.g. Halimi et al. 2022, before projection), shrinking the weights
towards zero (weight decay erodes what training wrote into them), and Gaussian
perturbation of the weights (as in noisy-fine-tuning / certified-removal style methods,
Golatkar et al. 2020, Guo et al. 2020).

On each client holding data to forget, from the global model ``theta_0``, for ``E``
epochs of minibatches ``B`` of its forget set::

    theta <- (1 - eta * lambda) theta + eta * grad_theta CE(theta; B)     (ascent, decoupled decay)

then once, per parameter array ``l`` with ``rms_l = sqrt(mean(theta_l^2))``::

    theta_l <- theta_l + sigma * rms_l * xi_l,    xi_l ~ N(0, I)  (seeded)

(noise relative to each layer's scale, so one ``sigma`` suits every layer). The server
applies ``w + sum_U (theta_u - w)`` (forget-set-weighted mean for a class removed from
every client) and the remaining clients recover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..training import trainable
from .base import ClientRoutine, LocalRoutineMethod, RoutineInput, forget_loss
from .gradient_ascent import GradientAscentConfig, gradient_ascent
from .registry import register_method


@dataclass(frozen=True)
class IEUConfig:
    """Settings of IEU (run-config keys ``ieu.*``).

    Attributes
    ----------
    lr : float
        Ascent step ``eta``.
    epochs, batch_size : int
        Passes over the forget set and minibatch size.
    weight_decay : float
        ``lambda`` of the decoupled decay.
    noise : float
        ``sigma``: noise standard deviation relative to each array's RMS.
    """

    lr: float = 0.01
    epochs: int = 1
    batch_size: int = 32
    weight_decay: float = 0.05
    noise: float = 0.05

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1 or self.weight_decay < 0 or self.noise < 0:
            raise ValueError(
                f"ieu needs lr > 0, epochs >= 1, batch-size >= 1, weight-decay >= 0, noise >= 0; got {self}"
            )
        if self.lr * self.weight_decay >= 1:
            raise ValueError(
                "ieu needs lr * weight-decay < 1 (the decay factor must stay positive), "
                f"got {self.lr * self.weight_decay}"
            )


def ieu_unlearn(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: IEUConfig, seed: int) -> int:
    """The IEU update of the module docstring, in place; returns the number of ascent steps."""
    if len(x) == 0:
        raise ValueError("IEU needs a non-empty forget set")
    ascent = GradientAscentConfig(lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size)
    steps = gradient_ascent(model, x, y, ascent, seed, weight_decay=cfg.weight_decay)
    add_relative_noise(model, cfg.noise, seed)
    return steps


def add_relative_noise(model: nn.Module, sigma: float, seed: int) -> None:
    """``theta_l += sigma * rms(theta_l) * N(0, I)`` per parameter array, seeded (numpy), in place."""
    if sigma == 0:
        return
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4_243]))
    with torch.no_grad():
        for p in trainable(model):
            rms = float(torch.sqrt(torch.mean(p.double() ** 2)))
            p.add_(torch.from_numpy(sigma * rms * rng.standard_normal(tuple(p.shape))).to(p.dtype))


def client_unlearn(inp: RoutineInput) -> dict[str, Any]:
    """The forgetting client's side of IEU, with the settings the server sent."""
    start = forget_loss(inp.model, inp.forget)
    steps = ieu_unlearn(inp.model, *inp.forget, inp.settings, inp.seed)
    end = forget_loss(inp.model, inp.forget)
    return {"train-steps": steps, "forget-loss-start": start, "forget-loss-end": end}


@register_method
class IEU(LocalRoutineMethod):
    """Forgetting clients run IEU locally; the server applies their motion, then recovery."""

    name = "ieu"
    config_class = IEUConfig
    client_routine: ClassVar[ClientRoutine | None] = client_unlearn
