"""Local training and batched inference, shared by every client and every method."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TrainSettings:
    """Local SGD settings of a client round.

    Attributes
    ----------
    epochs : int
        Local epochs over the client's train split.
    batch_size : int
        Minibatch size.
    lr : float
        SGD learning rate.
    momentum : float
        SGD momentum (the optimiser is re-created every round, as in FedAvg).
    weight_decay : float
        L2 penalty.
    """

    epochs: int = field(default=5, metadata={"key": "local-epochs", "help": "local epochs over a client's train split"})
    batch_size: int = field(default=32, metadata={"key": "batch-size", "help": "minibatch size"})
    lr: float = field(default=0.05, metadata={"key": "lr", "help": "SGD learning rate"})
    momentum: float = field(
        default=0.9, metadata={"key": "momentum", "help": "SGD momentum (a new optimizer each round)"}
    )
    weight_decay: float = field(default=0.0, metadata={"key": "weight-decay", "help": "L2 penalty"})

    def __post_init__(self) -> None:
        for key, value, ok, want in (
            ("local-epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("momentum", self.momentum, self.momentum >= 0, ">= 0"),
            ("weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
        ):
            if not (math.isfinite(value) and ok):
                raise ValueError(f"run-config '{key}' must be a finite number {want}, got {value!r}")


@dataclass(frozen=True)
class TrainStats:
    """What a local training run cost and reached."""

    steps: int
    examples_seen: int
    mean_loss: float


class Minibatches:
    """An endless stream of minibatch indices: consecutive seeded permutations of ``range(n)``.

    ``ceil(n / batch_size)`` batches make one epoch (the last one may be smaller); the next
    permutation is drawn when the previous one is used up. The first is drawn at once, so
    two streams on one generator draw in the order they are created.
    """

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.rng = n, batch_size, rng
        self.order, self.pos = rng.permutation(n), 0

    @property
    def per_epoch(self) -> int:
        """Batches in one pass over the data."""
        return -(-self.n // self.batch_size)

    def next(self) -> torch.Tensor:
        """The next minibatch's indices."""
        if self.pos >= self.n:
            self.order, self.pos = self.rng.permutation(self.n), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return torch.from_numpy(idx)


#: ``update(params, grads, step)``: a hand-written parameter update (ascent, sign steps, ...), under no_grad.
Update = Callable[[list[torch.Tensor], tuple[torch.Tensor, ...], int], None]


def local_steps(
    model: nn.Module,
    batches: Minibatches,
    steps: int,
    objective: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    update: Update | None = None,
    clip_norm: float = 0.0,
    after_step: Callable[[int, float], bool] | None = None,
) -> TrainStats:
    """The one minibatch loop of the library: every local training and unlearning routine runs on it.

    For ``t = 1..steps``: the next minibatch ``idx``, the loss ``objective(idx, t)`` (descent,
    ascent, a KL to a target, ...), then either ``optimizer`` (zero_grad, backward, optional
    gradient-norm clip at ``clip_norm``, step) or the hand-written ``update(params, grads, t)``;
    ``after_step(t, loss)`` (projections, clipping, stopping rules) ends the loop early by
    returning ``True``. A hand-written update whose gradients or result are not finite (an
    ascent that diverged) is not applied and ends the loop: the model keeps its last finite
    iterate.

    Raises
    ------
    ValueError
        Without exactly one of ``optimizer`` and ``update``.
    """
    if (optimizer is None) == (update is None):
        raise ValueError("local_steps needs exactly one of optimizer and update")
    params: list[torch.Tensor] = list(trainable(model))
    model.train()
    done, seen, loss_sum = 0, 0, 0.0
    for t in range(1, steps + 1):
        idx = batches.next()
        if not model.training:  # an objective or after_step that predicted switched it to eval
            model.train()
        loss = objective(idx, t)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            optimizer.step()
        elif update is not None:
            grads = torch.autograd.grad(loss, params)
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                break  # a diverged objective (ascent has no bound): the last finite iterate is the result
            with torch.no_grad():
                last = [p.clone() for p in params]
                update(params, grads, t)
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    for p, q in zip(params, last, strict=True):
                        p.copy_(q)
                    break
        done, seen = t, seen + len(idx)
        value = float(loss.detach())
        loss_sum += value * len(idx)
        if after_step is not None and after_step(t, value):
            break
    return TrainStats(steps=done, examples_seen=seen, mean_loss=loss_sum / seen if seen else float("nan"))


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    seed: int,
    augment: str = "none",
    clip_bound: float = 0.0,
    clip_every: int = 50,
) -> TrainStats:
    """Run minibatch SGD on ``(x, y)`` in place; deterministic given ``seed``.

    Parameters
    ----------
    model : nn.Module
        Trained in place.
    x, y : np.ndarray
        Features and integer labels.
    settings : TrainSettings
        Optimiser settings.
    seed : int
        Seeds the minibatch order (and the augmentation).
    augment : str
        Data augmentation of every minibatch (:mod:`fed_unlearn.augment`; ``none`` = off).
    clip_bound : float
        FastClip: clip every affine layer's spectral norm at this bound every
        ``clip_every`` steps and at the end (:mod:`fed_unlearn.fastclip`; 0 = off).

    Returns
    -------
    TrainStats
        Number of optimiser steps (the client-compute unit of the reports),
        examples processed and mean training loss.
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    model.train()
    opt = torch.optim.SGD(
        trainable(model), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    batches = Minibatches(len(x), settings.batch_size, np.random.default_rng(seed))
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    clip = None
    if clip_bound > 0:
        from .fastclip import clip_model, layer_input_shapes

        shapes = layer_input_shapes(model, x.shape[1:])
        clip = lambda: clip_model(model, clip_bound, x.shape[1:], shapes)  # noqa: E731
    if augment != "none":
        from .augment import augment_batch

    def objective(idx: torch.Tensor, t: int) -> torch.Tensor:
        xb = augment_batch(xt[idx], augment, seed * 1_000_033 + t - 1) if augment != "none" else xt[idx]
        return F.cross_entropy(model(xb), yt[idx])

    def after(t: int, loss: float) -> bool:
        if clip is not None and t % clip_every == 0:
            clip()
        return False

    stats = local_steps(model, batches, settings.epochs * batches.per_epoch, objective, optimizer=opt, after_step=after)
    if clip is not None:
        clip()
    return stats


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters local training moves: those requiring gradients (a LoRA model's adapters, not its base)."""
    return [p for p in model.parameters() if p.requires_grad]


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """:func:`trainable` with the parameters' names."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def predict_logits(
    model: nn.Module | Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 1024
) -> np.ndarray:
    """Logits of ``model`` on ``x``, computed in batches, as float64 numpy.

    ``model`` is a torch module, or any callable ``x -> logits`` (a framework-neutral
    model of the client helpers: :class:`fed_unlearn.flower.backends.ArrayModel`).
    """
    if not isinstance(model, nn.Module):
        return np.asarray(model(x), dtype=np.float64)
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x))
    outs = [model(xt[i : i + batch_size]).double() for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0))


def client_seed(seed: int, server_round: int, client_id: int) -> int:
    """Seed of client ``client_id``'s minibatch order in ``server_round``.

    The same in the experiment and its gold federation, so the gold differs from the
    original only by the clients it leaves out.
    """
    return int(np.random.SeedSequence([seed, server_round, client_id]).generate_state(1)[0])


@dataclass(frozen=True)
class RelearnResult:
    """Outcome of a relearning run (relearn time / RCD)."""

    steps: int
    reached: bool
    start_accuracy: float
    final_accuracy: float


def relearn_steps(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    target_accuracy: float,
    settings: TrainSettings,
    max_steps: int,
    seed: int,
) -> RelearnResult:
    """Fine-tune ``model`` on ``(x, y)`` until its accuracy there reaches ``target_accuracy``.

    The relearning-convergence-delay probe: a model that still holds the forgotten data
    relearns it in few steps, one that never saw it needs about as many as the gold. The
    accuracy on the whole of ``(x, y)`` is checked before the first step and after each
    SGD step (same optimiser settings as local training, seeded minibatches).

    Returns
    -------
    RelearnResult
        ``steps`` taken (0 if already at target); ``reached = False`` if ``max_steps`` ran out.
    """
    if len(x) == 0:
        raise ValueError("cannot relearn an empty set")
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")

    def acc() -> float:
        return float(np.mean(np.argmax(predict_logits(model, x), axis=1) == y))

    start = current = acc()
    if current >= target_accuracy or max_steps == 0:
        return RelearnResult(0, current >= target_accuracy, start, current)
    opt = torch.optim.SGD(
        trainable(model), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    batches = Minibatches(len(x), settings.batch_size, np.random.default_rng(seed))
    reached = [current]

    def after(t: int, loss: float) -> bool:
        reached[0] = acc()
        return reached[0] >= target_accuracy

    stats = local_steps(
        model,
        batches,
        max_steps,
        lambda idx, t: F.cross_entropy(model(xt[idx]), yt[idx]),
        optimizer=opt,
        after_step=after,
    )
    return RelearnResult(stats.steps, reached[0] >= target_accuracy, start, reached[0])
