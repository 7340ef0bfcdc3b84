"""SRAGU: spectral-roughness reweighted Adaptive Gradient Unlearning, and its data-free variant.

References
----------
* M. Partohaghighi, R. Marcia, B. J. West, Y. Chen, "Statistical Roughness-Informed Machine
  Unlearning" (2026, arXiv:2602.09304): SRAGU.
* AGU: Ghannam & Mahareek, "Adaptive Gradient Unlearning", Intelligent Systems with
  Applications (2025), DOI 10.1016/j.iswa.2025.200592: parameter-level gradient
  sensitivity on the forget set, normalised, scaling the updates; stops on parameter
  change and prediction divergence.

The update implemented here (run on the departing client, on its own data)
--------------------------------------------------------------------------
Given the global model ``theta_0``, the forget set ``D_f`` (the client's training data),
the per-layer stability weights ``nu_l`` computed by the server from ``theta_0``
(:mod:`fed_unlearn.spectral`), and for ``t = 0, 1, ...``:

1. minibatch ``B_t`` of ``D_f`` (seeded shuffles, batch size ``b``);
   ``g_t = grad_theta  mean_{(x,y) in B_t} CE(f_theta_t(x), y)``;
2. AGU sensitivity, normalised over the whole model: ``s_t = |g_t| / (max |g_t| + eps)``,
   in ``[0, 1]`` per parameter;
3. spectral reweighting of the sensitivity-scaled step direction:
   ``u_{t,i} = nu_{l(i)} * s_{t,i} * sign(g_{t,i}) = nu_{l(i)} * g_{t,i} / max |g_t|``
   (``l(i)`` = layer of parameter ``i``; biases share their layer's ``nu``), so the most
   sensitive parameter of a fully stable layer moves by exactly ``eta_t`` whatever the
   scale of the forget loss's gradient;
4. ascent step with a decaying rate: ``theta_{t+1} = theta_t + eta_t u_t``,
   ``eta_t = eta / (1 + gamma t)``;
5. stop when
   * the drift per step ``||theta_{t+1} - theta_t|| / ||theta_t||`` falls below ``delta``
     (the motion has died down: ``"drift"``), or
   * the target is reached, checked on a stable estimate (the whole forget set, before the
     first step and every ``check_every`` steps, never one minibatch): for a client or samples,
     the mean forget loss reaches ``rho`` times the mean loss the model had before unlearning
     on the client's held-out samples like the forget set (same classes; for hard samples,
     the held-out samples the same rule ranks highest) — points it never saw
     (``"divergence"``; off when ``rho = 0`` or without held-out data); that reference is
     fixed, because ascent raises the held-out loss too; for a class, the forget accuracy falls
     to the floor a model that never saw the class shows (``"floor"``), or
   * ``t + 1 = T_max`` (``"cap"``).

Readings where the papers leave details open: the sensitivity is normalised by its
maximum over the whole model (so ``nu`` alone decides how motion is shared between
layers) and multiplies the gradient's sign, not the gradient itself (``s * g`` would be
quadratic in the gradient and vanish on a well-fit forget set, where unlearning is
needed most); the unlearning objective is plain gradient ascent on the forget loss with AGU's
scaling; the divergence stop uses the client's held-out loss as the gold-like target
(the departing client has no other clients' data); the step decay makes the drift
criterion reachable.

Federation (``unlearn.method = "sragu"``): the server computes ``nu_l`` from the global
model (no data) and sends them with a ``train.unlearn`` instruction to the departing
clients; each returns ``theta_u``. The new global model is
``w_{t+1} = w_t + sum_{u in U} (theta_u - w_t)`` (each departure's unlearning motion
applied in full; concurrent departures add up), plus ``sum_{k in S} (n_k/N_S) Delta_k`` if
``sragu.remaining-train`` lets the remaining clients train in that round too. Recovery
follows as for PUF.

Spectral PUF (``unlearn.method = "spectral-puf"``) is the data-free server-side variant:
the PUF rule with each departing pseudo-gradient reweighted layer by layer,
``- eta_u sum_{u in U} (n_u/N) nu_l Delta_{u,l}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..aggregation import ClientUpdate, Weights, pseudo_gradient
from ..metrics import cross_entropy
from ..spectral import StabilityGate, analyze, layer_of, layer_weights
from ..training import Minibatches, local_steps, named_trainable, predict_logits
from .base import ClientRoutine, RoutineInput, UnlearningMethod, apply_departing_motion
from .puf import PUF_VARIANTS, PUFConfig, puf_update
from .registry import register_method

STOP_REASONS = ("drift", "divergence", "cap", "floor")


@dataclass(frozen=True)
class GateConfig:
    """Stability-gate settings shared by SRAGU and spectral PUF (see :class:`StabilityGate`).

    Attributes
    ----------
    alpha_low, alpha_high : float
        The band of heavy-tail exponents read as well trained (WeightWatcher's 2 and 6).
    tau : float
        Softness of the band edges (> 0).
    nu_min : float
        Floor of a layer's stability weight, in ``[0, 1)``.
    nu_unfit : float
        Weight of layers whose spectrum has no power-law fit, in ``[nu_min, 1]``.
    """

    alpha_low: float = 2.0
    alpha_high: float = 6.0
    tau: float = 0.5
    nu_min: float = 0.1
    nu_unfit: float = 1.0

    def gate(self) -> StabilityGate:
        """The gate these settings describe."""
        return StabilityGate(self.alpha_low, self.alpha_high, self.tau, self.nu_min, self.nu_unfit)


@dataclass(frozen=True)
class SRAGUConfig(GateConfig):
    """Settings of SRAGU (run-config keys ``sragu.*``).

    Attributes
    ----------
    lr : float
        ``eta``, initial ascent step size.
    lr_decay : float
        ``gamma`` of ``eta_t = eta / (1 + gamma t)``.
    batch_size : int
        Forget-set minibatch size ``b``.
    max_steps : int
        ``T_max``, the step cap.
    drift_tol : float
        ``delta``, relative drift per step below which unlearning stops.
    target_ratio : float
        ``rho`` of the divergence stop (0 disables it).
    remaining_train : bool
        Whether the remaining clients also train in the unlearning round.
    check_every : int
        Steps between two checks of the target on the whole forget set.
    """

    lr: float = 0.01
    lr_decay: float = 0.05
    batch_size: int = 32
    max_steps: int = 200
    drift_tol: float = 1e-5
    target_ratio: float = 1.0
    remaining_train: bool = False
    check_every: int = 5

    def __post_init__(self) -> None:
        self.gate()  # validates the gate settings
        if not self.lr > 0 or self.lr_decay < 0:
            raise ValueError(f"sragu.lr must be > 0 and sragu.lr-decay >= 0, got {self.lr}, {self.lr_decay}")
        if self.batch_size < 1 or self.max_steps < 1 or self.check_every < 1:
            raise ValueError(
                f"sragu.batch-size, max-steps and check-every must be >= 1, got {self.batch_size}, "
                f"{self.max_steps}, {self.check_every}"
            )
        if self.drift_tol < 0 or self.target_ratio < 0:
            raise ValueError(
                f"sragu.drift-tol and sragu.target-ratio must be >= 0, got {self.drift_tol}, {self.target_ratio}"
            )


@dataclass(frozen=True)
class SRAGUResult:
    """What a local SRAGU run did."""

    steps: int
    stop_reason: str
    forget_loss_start: float
    forget_loss_end: float
    reference_loss: float
    last_drift: float


def parameter_weights(model: nn.Module, nu: Mapping[str, float], default: float = 1.0) -> dict[str, float]:
    """``nu`` of every parameter's layer (parameters of layers without a weight get ``default``)."""
    return {name: float(nu.get(layer_of(name), default)) for name, _ in named_trainable(model)}


def agu_sensitivity(grads: Sequence[torch.Tensor], eps: float = 1e-12) -> list[torch.Tensor]:
    """AGU's normalised sensitivity ``|g| / (max |g| + eps)``, the max taken over the whole model."""
    gmax = max(float(g.abs().max()) for g in grads)
    return [g.abs() / (gmax + eps) for g in grads]


def _mean_loss(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(cross_entropy(predict_logits(model, x), y)))


def sragu_unlearn(
    model: nn.Module,
    forget_x: np.ndarray,
    forget_y: np.ndarray,
    nu: Mapping[str, float],
    cfg: SRAGUConfig,
    seed: int,
    heldout: tuple[np.ndarray, np.ndarray] | None = None,
    target: str = "loss-match",
    floor: float = 0.02,
) -> SRAGUResult:
    """Run SRAGU (module docstring) on ``model`` in place.

    Parameters
    ----------
    model : nn.Module
        The global model; modified in place.
    forget_x, forget_y : np.ndarray
        The forget set.
    nu : Mapping[str, float]
        Stability weight per layer name (``nu_l``); must lie in ``[0, 1]``.
    cfg : SRAGUConfig
    seed : int
        Seeds the minibatch order.
    heldout : (x, y), optional
        The client's own held-out samples like the forget set, for the ``loss-match`` target.
    target : {"loss-match", "accuracy-floor"}
        What "forgotten" means (:func:`fed_unlearn.calibration.target_for`).
    floor : float
        The forget accuracy of ``accuracy-floor``.

    Raises
    ------
    ValueError
        On an empty forget set or stability weights outside ``[0, 1]`` or non-finite.
    """
    if len(forget_x) == 0:
        raise ValueError("SRAGU needs a non-empty forget set")
    bad = {k: v for k, v in nu.items() if not (np.isfinite(v) and 0.0 <= v <= 1.0)}
    if bad:
        raise ValueError(f"stability weights must be finite and in [0, 1]: {bad}")
    scale = parameter_weights(model, nu, default=cfg.nu_unfit)
    weights = [scale[name] for name, _ in named_trainable(model)]
    has_heldout = heldout is not None and len(heldout[0]) > 0
    ref = _mean_loss(model, *heldout) if has_heldout and heldout is not None else float("nan")
    start_loss = _mean_loss(model, forget_x, forget_y)

    def reached() -> str | None:
        """The stop reason if the target is met on the whole forget set (a stable estimate)."""
        if target == "accuracy-floor":
            acc = float(np.mean(np.argmax(predict_logits(model, forget_x), axis=1) == forget_y))
            return "floor" if acc <= floor else None
        if cfg.target_ratio <= 0 or not has_heldout:
            return None
        # against the held-out loss of the model before unlearning, fixed: ascent raises the held-out
        # loss too, and a moving reference lets the forget loss race past any unseen-data level
        return "divergence" if _mean_loss(model, forget_x, forget_y) >= cfg.target_ratio * ref else None

    xt, yt = torch.from_numpy(np.ascontiguousarray(forget_x)), torch.from_numpy(np.ascontiguousarray(forget_y))
    early = reached()
    if early is not None:  # nothing to undo: the forget set already looks unseen
        return SRAGUResult(0, early, start_loss, start_loss, ref, 0.0)
    state: dict[str, Any] = {"drift": float("nan"), "reason": "cap"}

    def step_update(ps: list[torch.Tensor], grads: tuple[torch.Tensor, ...], t: int) -> None:
        sens = agu_sensitivity(grads)
        lr = cfg.lr / (1.0 + cfg.lr_decay * (t - 1))
        before = torch.sqrt(torch.stack([(p.double() ** 2).sum() for p in ps]).sum())
        moved = 0.0
        for p, g, s, w in zip(ps, grads, sens, weights, strict=False):
            delta = lr * w * s * torch.sign(g)  # ascent on the forget loss
            p.add_(delta)
            moved += float((delta.double() ** 2).sum())
        state["drift"] = float(np.sqrt(moved) / (float(before) + 1e-12))

    def after(t: int, loss: float) -> bool:
        if t % cfg.check_every == 0:
            hit = reached()
            if hit is not None:
                state["reason"] = hit
                return True
        if state["drift"] < cfg.drift_tol:
            state["reason"] = "drift"
            return True
        return False

    batches = Minibatches(len(xt), cfg.batch_size, np.random.default_rng(seed))
    stats = local_steps(
        model,
        batches,
        cfg.max_steps,
        lambda idx, t: F.cross_entropy(model(xt[idx]), yt[idx]),
        update=step_update,
        after_step=after,
    )
    return SRAGUResult(
        stats.steps, state["reason"], start_loss, _mean_loss(model, forget_x, forget_y), ref, state["drift"]
    )


def client_unlearn(inp: RoutineInput) -> dict[str, Any]:
    """The departing client's side of SRAGU: the server's ``nu`` and settings -> :func:`sragu_unlearn`."""
    layers, nu = list(inp.instruction.get("sragu.layers", [])), list(inp.instruction.get("sragu.nu", []))
    if len(layers) != len(nu):
        raise ValueError(f"sragu.layers has {len(layers)} names but sragu.nu {len(nu)} weights")
    res = sragu_unlearn(
        inp.model,
        *inp.forget,
        dict(zip(layers, nu, strict=False)),
        inp.settings,
        seed=inp.seed,
        heldout=inp.heldout,
        target=str(inp.instruction.get("unlearn-target", "loss-match")),
        floor=float(inp.instruction.get("unlearn-floor", 0.02)),
    )
    return {
        "train-steps": res.steps,
        "unlearn-stop": STOP_REASONS.index(res.stop_reason),
        "forget-loss-start": res.forget_loss_start,
        "forget-loss-end": res.forget_loss_end,
        "reference-loss": res.reference_loss,
        "last-drift": res.last_drift,
    }


@register_method
class SRAGU(UnlearningMethod):
    """SRAGU in the federation: server sends ``nu_l``, departing clients run :func:`sragu_unlearn`."""

    name = "sragu"
    config_class = SRAGUConfig
    client_routine: ClassVar[ClientRoutine | None] = client_unlearn
    config: SRAGUConfig

    def __init__(self, config: SRAGUConfig | None = None) -> None:
        super().__init__(config)
        self.gate = self.config.gate()

    @property
    def remaining_clients_train(self) -> bool:  # noqa: D102
        return self.config.remaining_train

    def departing_config(self, global_weights: Weights) -> dict[str, Any]:
        """The per-layer stability weights, computed from the global model alone."""
        nu = layer_weights(analyze(global_weights, self.gate))
        return {
            **super().departing_config(global_weights),
            "sragu.layers": list(nu),
            "sragu.nu": [float(v) for v in nu.values()],
        }

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """``w + sum_U (theta_u - w)`` (+ FedAvg step of the remaining clients if they trained)."""
        return apply_departing_motion(
            global_weights, remaining if self.config.remaining_train else [], departing, self.joint_request
        )


@register_method
class AGU(SRAGU):
    """AGU: SRAGU's update with every layer's stability weight 1 (the ablation of the spectral gate)."""

    name = "agu"

    def departing_config(self, global_weights: Weights) -> dict[str, Any]:
        """Unit stability weights for every weight layer."""
        nu = {k: 1.0 for k in layer_weights(analyze(global_weights, self.gate))}
        return {"unlearn-method": self.name, **self.settings(), "sragu.layers": list(nu), "sragu.nu": list(nu.values())}


@dataclass(frozen=True)
class SpectralPUFConfig(GateConfig):
    """Settings of spectral PUF (run-config keys ``spectral-puf.*``): PUF's plus the gate's.

    Attributes
    ----------
    variant : {"regular", "special"}
        As PUF's: whether the remaining clients train in the unlearning round too.
    scale : float
        As PUF's ``eta_u``; ``0`` picks the reference setting for the federation size.
    """

    variant: str = "regular"
    scale: float = 0.0

    def __post_init__(self) -> None:
        self.gate()
        PUFConfig(self.variant, self.scale)  # validates variant and scale


def spectral_puf_update(
    global_weights: Weights,
    remaining: Sequence[ClientUpdate],
    departing: Sequence[ClientUpdate],
    eta: float,
    nu: Mapping[str, float],
    variant: str = "regular",
    default_nu: float = 1.0,
) -> dict[str, np.ndarray]:
    """PUF with each departing pseudo-gradient scaled by its layer's ``nu_l``.

    Implemented as PUF on reweighted departing models ``w + nu_l Delta_{u,l}``, which
    gives exactly ``-eta (n_u/N) nu_l Delta_{u,l}`` for the departing term.
    """
    if variant not in PUF_VARIANTS:
        raise ValueError(f"unknown PUF variant '{variant}'")
    reweighted = []
    for u in departing:
        delta = pseudo_gradient(u.weights, global_weights)
        w = {
            k: (np.asarray(g, np.float64) + nu.get(layer_of(k), default_nu) * delta[k]).astype(np.asarray(g).dtype)
            for k, g in global_weights.items()
        }
        reweighted.append(ClientUpdate(u.client_id, w, u.num_examples))
    return puf_update(global_weights, remaining, reweighted, eta, variant)


@register_method
class SpectralPUF(UnlearningMethod):
    """Data-free spectral PUF: server-side, any plain training client."""

    name = "spectral-puf"
    config_class = SpectralPUFConfig
    config: SpectralPUFConfig

    def __init__(self, config: SpectralPUFConfig | None = None) -> None:
        super().__init__(config)
        self.gate = self.config.gate()

    @property
    def remaining_clients_train(self) -> bool:  # noqa: D102
        return self.config.variant == "regular"

    def aggregate(
        self, global_weights: Weights, remaining: Sequence[ClientUpdate], departing: Sequence[ClientUpdate]
    ) -> dict[str, np.ndarray]:  # noqa: D102
        if not departing:
            raise ValueError("spectral PUF needs at least one departing client's update")
        nu = layer_weights(analyze(global_weights, self.gate))
        k = len(departing) + (len(remaining) if self.config.variant == "regular" else 0)
        eta = PUFConfig(self.config.variant, self.config.scale).eta(k)
        return spectral_puf_update(
            global_weights, remaining, departing, eta, nu, self.config.variant, self.config.nu_unfit
        )
