"""Local training and batched inference, shared by every client and every method."""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for key, value, ok, want in (("local-epochs", self.epochs, self.epochs >= 1, ">= 1"),
                                     ("batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
                                     ("lr", self.lr, self.lr > 0, "> 0"), ("momentum", self.momentum, self.momentum >= 0, ">= 0"),
                                     ("weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0")):
            if not (math.isfinite(value) and ok):
                raise ValueError(f"run-config '{key}' must be a finite number {want}, got {value!r}")


@dataclass(frozen=True)
class TrainStats:
    """What a local training run cost and reached."""

    steps: int
    examples_seen: int
    mean_loss: float


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, settings: TrainSettings, seed: int,
                augment: str = "none", clip_bound: float = 0.0, clip_every: int = 50) -> TrainStats:
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
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    steps, seen, loss_sum = 0, 0, 0.0
    clip = None
    if clip_bound > 0:
        from .fastclip import clip_model, layer_input_shapes

        shapes = layer_input_shapes(model, x.shape[1:])
        clip = lambda: clip_model(model, clip_bound, x.shape[1:], shapes)  # noqa: E731
    if augment != "none":
        from .augment import augment_batch
    for _ in range(settings.epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            xb = augment_batch(xt[idx], augment, seed * 1_000_033 + steps) if augment != "none" else xt[idx]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yt[idx])
            loss.backward()
            opt.step()
            steps += 1
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            if clip is not None and steps % clip_every == 0:
                clip()
    if clip is not None:
        clip()
    return TrainStats(steps=steps, examples_seen=seen, mean_loss=loss_sum / seen)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits of ``model`` on ``x``, computed in batches, as float64 numpy."""
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x))
    outs = [model(xt[i:i + batch_size]).double() for i in range(0, len(x), batch_size)]
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


def relearn_steps(model: nn.Module, x: np.ndarray, y: np.ndarray, target_accuracy: float, settings: TrainSettings,
                  max_steps: int, seed: int) -> RelearnResult:
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
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    rng = np.random.default_rng(seed)
    order, pos, steps = rng.permutation(len(x)), 0, 0
    while current < target_accuracy and steps < max_steps:
        if pos >= len(order):
            order, pos = rng.permutation(len(x)), 0
        idx = torch.from_numpy(order[pos:pos + settings.batch_size])
        pos += settings.batch_size
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
        steps += 1
        current = acc()
    return RelearnResult(steps, current >= target_accuracy, start, current)
