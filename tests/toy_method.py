"""A method that lives outside the package: registered here, used by name everywhere.

``toy-shrink``: the departing clients pull their copy of the model toward zero for a few
steps of plain gradient ascent on their forget set, scaled by ``factor``; the server applies
their motion. Nothing in ``fed_unlearn``, ``server``, ``clients`` or ``simulations`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from fed_unlearn.training import Minibatches, local_steps
from fed_unlearn.unlearning import ClientRoutine, LocalRoutineMethod, RoutineInput, register_method
from fed_unlearn.unlearning.base import forget_loss


@dataclass(frozen=True)
class ToyConfig:
    """Settings of the toy method (run-config keys ``toy-shrink.*``).

    Attributes
    ----------
    steps : int
        Ascent steps on the forget set.
    lr : float
        Ascent step size.
    """

    steps: int = 3
    lr: float = 0.05


def toy_routine(inp: RoutineInput) -> dict[str, Any]:
    """A few ascent steps on the forget set; reports them and the loss before and after."""
    model, (x, y) = inp.model, inp.forget
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    start = forget_loss(model, inp.forget)

    def ascend(params: list[torch.Tensor], grads: tuple[torch.Tensor, ...], t: int) -> None:
        for p, g in zip(params, grads, strict=True):
            p.add_(inp.settings.lr * g)

    stats = local_steps(
        model,
        Minibatches(len(x), 32, np.random.default_rng(inp.seed)),
        inp.settings.steps,
        lambda idx, t: F.cross_entropy(model(xt[idx]), yt[idx]),
        update=ascend,
    )
    return {"train-steps": stats.steps, "forget-loss-start": start, "forget-loss-end": forget_loss(model, inp.forget)}


@register_method
class ToyShrink(LocalRoutineMethod):
    """Departing clients ascend a few steps; their motion is applied."""

    name = "toy-shrink"
    config_class = ToyConfig
    scenarios = ("client", "samples")
    client_routine: ClassVar[ClientRoutine | None] = toy_routine
