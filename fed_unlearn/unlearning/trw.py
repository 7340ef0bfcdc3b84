"""TRW: Tilted ReWeighting for class unlearning, federated.

Reference: A. Ebrahimpour-Boroojeny, Y. Wang, H. Sundaram, "On the Necessity of Output
Distribution Reweighting for Effective Class Unlearning" (2025). A model retrained
without class ``f`` does not give its samples a uniform or arbitrary distribution: it
sends them to the classes that *look like* ``f``. TRW makes the unlearned model do the
same, which is what defeats the nearest-neighbour-class attack (MIA-NN) that a model
merely suppressing ``f`` fails.

With ``p_0`` the model at the start of the unlearning (the global model the clients
receive) and ``D_f`` the class-``f`` samples of every client:

1. **Inter-class similarity** (one server round, no training): every client reports
   ``sum_{x in D_f^k} p_0(k'|x)`` for every class ``k'`` and its count; the server forms
   ``s_k = mean_{x in D_f} p_0(k|x)`` for ``k != f``, normalised to sum 1 over ``k != f``
   (``s_f = 0``).
2. **Tilted target** for each forget sample: ``q(k|x) proportional to p_0(k|x) * s_k^tau``
   for ``k != f``, ``q(f|x) = 0`` (sums to 1).
3. **Local fine-tuning** (one server round): each client minimises, for ``epochs`` passes
   over its retained data, ``CE(theta; B_r) + lambda * KL(q || p_theta)(B_f)`` on a retained
   minibatch ``B_r`` and a forget minibatch ``B_f`` (cycled); SGD with the client's local
   settings. The server takes the forget-set-weighted mean of the clients' models
   (federated averaging of the same objective); recovery follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.special import log_softmax
from torch import nn
from torch.nn import functional as F

from ..aggregation import ClientUpdate, Weights, fedavg
from ..deletion import DeletionRequest
from ..training import Minibatches, local_steps, predict_logits, trainable
from .base import ClientRoutine, LocalRoutineMethod, RoutineInput, forget_loss
from .registry import register_method


@dataclass(frozen=True)
class TRWConfig:
    """Settings of TRW (run-config keys ``trw.*``).

    Attributes
    ----------
    tau : float
        Tilt exponent on the similarity (0 = plain renormalisation of ``p_0`` over the
        remaining classes).
    kl_weight : float
        ``lambda``, weight of the KL term.
    epochs, batch_size : int
        Passes over the retained data and minibatch size.
    lr, momentum : float
        SGD settings.
    """

    tau: float = 1.0
    kl_weight: float = 1.0
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if (
            self.tau < 0
            or self.kl_weight < 0
            or self.epochs < 1
            or self.batch_size < 1
            or not self.lr > 0
            or self.momentum < 0
        ):
            raise ValueError(f"trw needs tau, kl-weight, momentum >= 0, epochs and batch-size >= 1, lr > 0; got {self}")


def similarity(prob_sums: Sequence[Sequence[float]], counts: Sequence[float], removed: int) -> np.ndarray:
    """``s``: mean probability of each class on the removed class's samples, over clients; ``s_f = 0``, sums to 1.

    Raises
    ------
    ValueError
        Without any sample of the removed class, or if no mass lies outside it.
    """
    total = np.sum(np.asarray(prob_sums, np.float64), axis=0)
    n = float(np.sum(counts))
    if n <= 0:
        raise ValueError("TRW needs samples of the removed class to estimate the similarity")
    s = total / n
    s[removed] = 0.0
    if s.sum() <= 0:
        raise ValueError("the model puts no probability outside the removed class: the similarity is undefined")
    return s / s.sum()


def tilted_target(logits0: np.ndarray, s: np.ndarray, removed: int, tau: float) -> np.ndarray:
    """``q(k|x) proportional to p_0(k|x) s_k^tau`` over the classes but ``removed``; ``q(removed|x) = 0``."""
    logp = log_softmax(np.asarray(logits0, np.float64), axis=1)
    s = np.asarray(s, np.float64)
    tilt = np.zeros_like(s)
    if tau > 0:  # s_k^tau, with 0^tau = 0 (log -inf); tau = 0: no tilt at all
        with np.errstate(divide="ignore"):
            tilt = tau * np.log(s)
    logq = logp + tilt[None, :]
    logq[:, removed] = -np.inf
    logq -= logq.max(axis=1, keepdims=True)
    q = np.exp(logq)
    return q / q.sum(axis=1, keepdims=True)


def trw_finetune(
    model: nn.Module,
    retain: tuple[np.ndarray, np.ndarray],
    forget_x: np.ndarray,
    q: np.ndarray,
    cfg: TRWConfig,
    seed: int,
    augment: str = "none",
) -> int:
    """Step 3 in place; returns the number of SGD steps."""
    from ..augment import augment_batch

    if len(retain[0]) == 0 or len(forget_x) == 0:
        raise ValueError("TRW fine-tuning needs retained and forget samples")
    xr, yr = torch.from_numpy(np.ascontiguousarray(retain[0])), torch.from_numpy(np.ascontiguousarray(retain[1]))
    xf, qt = torch.from_numpy(np.ascontiguousarray(forget_x)), torch.from_numpy(q).float()
    opt = torch.optim.SGD(trainable(model), lr=cfg.lr, momentum=cfg.momentum)
    rng = np.random.default_rng(seed)
    forget_batches = Minibatches(len(xf), cfg.batch_size, rng)  # drawn first: the two streams share the generator
    retain_batches = Minibatches(len(xr), cfg.batch_size, rng)

    def objective(idx: torch.Tensor, t: int) -> torch.Tensor:
        fidx = forget_batches.next()
        xb = augment_batch(xr[idx], augment, seed * 7_919 + t - 1) if augment != "none" else xr[idx]
        xfb = augment_batch(xf[fidx], augment, seed * 7_927 + t - 1) if augment != "none" else xf[fidx]
        kl = F.kl_div(F.log_softmax(model(xfb), dim=1), qt[fidx], reduction="batchmean")
        return F.cross_entropy(model(xb), yr[idx]) + cfg.kl_weight * kl

    return local_steps(model, retain_batches, cfg.epochs * retain_batches.per_epoch, objective, optimizer=opt).steps


def client_unlearn(inp: RoutineInput) -> dict[str, Any]:
    """Phase ``estimate``: report probability sums on the forget set; phase ``tilt``: the fine-tuning."""
    model, forget, instruction, cfg = inp.model, inp.forget, inp.instruction, inp.settings
    removed = int(instruction["trw-class"])
    logits0 = predict_logits(model, forget[0])
    if str(instruction.get("trw-phase")) == "estimate":
        p0 = np.exp(log_softmax(logits0, axis=1))
        loss = forget_loss(model, forget)
        return {
            "train-steps": 0,
            "trw-prob-sum": [float(v) for v in p0.sum(axis=0)],
            "forget-loss-start": loss,
            "forget-loss-end": loss,
        }
    s = np.asarray(instruction["trw-similarity"], np.float64)
    q = tilted_target(logits0, s, removed, cfg.tau)
    start = forget_loss(model, forget)
    if inp.retain is None:
        raise ValueError("TRW needs the client's retained data")
    steps = trw_finetune(model, inp.retain, forget[0], q, cfg, inp.seed, inp.augment)
    return {"train-steps": steps, "forget-loss-start": start, "forget-loss-end": forget_loss(model, forget)}


@register_method
class TRW(LocalRoutineMethod):
    """Two unlearning rounds: estimate the similarity, then every client fine-tunes toward the tilted target."""

    name = "trw"
    config_class = TRWConfig
    scenarios = ("class",)
    serves_online = False  # two server rounds
    client_routine: ClassVar[ClientRoutine | None] = client_unlearn
    config: TRWConfig

    def __init__(self, config: TRWConfig | None = None) -> None:
        super().__init__(config)
        self.removed: int | None = None
        self._step = 0
        self.similarity: np.ndarray | None = None

    def begin(self, requests: Sequence[int], leave: bool, request: DeletionRequest | None = None) -> None:
        """TRW unlearns a class: the request names it."""
        if request is None or request.scenario != "class":
            raise ValueError("trw unlearns a class: it needs a class deletion request")
        self.removed, self._step, self.similarity = request.forget_class, 0, None

    @property
    def num_rounds(self) -> int:  # noqa: D102
        return 2

    def departing_config(self, global_weights: Weights) -> dict[str, Any]:  # noqa: D102
        if self.removed is None:
            raise RuntimeError("trw was not configured with the class to remove")
        cfg: dict[str, Any] = {**super().departing_config(global_weights), "trw-class": self.removed}
        if self._step == 0 or self.similarity is None:
            return {**cfg, "trw-phase": "estimate"}
        return {**cfg, "trw-phase": "tilt", "trw-similarity": [float(v) for v in self.similarity]}

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """Round 1: the similarity from the reported sums (model unchanged); round 2: FedAvg of the clients' models."""
        if not departing:
            raise ValueError("TRW needs the forgetting clients' replies")
        if self.removed is None:
            raise RuntimeError("trw was not told which class to remove")
        if self._step == 0:
            sums = [u.metrics["trw-prob-sum"] for u in departing]
            self.similarity = similarity(sums, [u.num_examples for u in departing], self.removed)
            self._step = 1
            return {k: np.array(v, copy=True) for k, v in global_weights.items()}
        self._step = 2
        return dict(fedavg(departing))
