"""Deletion requests: which training samples must be forgotten, client by client.

Three scenarios (run-config ``unlearn.scenario``):

* ``client`` — whole clients leave (``unlearn.departing``): their whole train split is
  the forget set and they stop training.
* ``samples`` — the requesting clients (``unlearn.departing``) delete part of their
  train split and keep training on the rest. The part is chosen by
  ``unlearn.selection`` with ``k = round(fraction * n)`` samples (at least 1):

  ============== ======================================================================
  random         ``k`` samples uniformly at random (seeded)
  class          ``k`` samples of class ``unlearn.class`` (all of them if fewer)
  high-loss      the ``k`` samples of largest cross-entropy under the original model
  low-margin     the ``k`` samples of smallest margin ``z_y - max_{j != y} z_j``
  high-grad-norm the ``k`` samples of largest per-example gradient norm
                 ``||grad_theta CE(theta; x, y)||_2`` (all parameters)
  influence      the ``k`` samples of largest first-order influence on the client's
                 held-out loss, ``grad CE(x, y) . grad L_heldout`` (TracIn with one
                 checkpoint, Pruthi et al. 2020; the samples whose SGD steps lowered the
                 held-out loss most, whose deletion costs the most utility)
  ============== ======================================================================

  The model-based selections use the *original* model (the global model when the
  request is made); they are the hard cases of the deletion literature (outliers,
  boundary points, memorised points).
* ``class`` — class ``unlearn.class`` is removed from every client.

The gold federation is retrained without exactly the selected samples. Everything
here is pure NumPy/PyTorch: the client computes its own mask; the mask never leaves it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .metrics import cross_entropy
from .settings import read_settings
from .training import named_trainable, predict_logits, trainable

SCENARIOS = ("client", "samples", "class")
#: What "forgotten" means per scenario: the class predicted no more, else losses like unseen data's.
CALIBRATION_TARGETS = {"client": "loss-match", "samples": "loss-match", "class": "accuracy-floor"}
SELECTIONS = ("random", "class", "high-loss", "low-margin", "high-grad-norm", "influence")
#: Selections that need the model at the time of the request.
MODEL_SELECTIONS = ("high-loss", "low-margin", "high-grad-norm", "influence")


@dataclass(frozen=True)
class DeletionRequest:
    """What must be forgotten.

    Attributes
    ----------
    scenario : {"client", "samples", "class"}
    selection : str
        Sample selection of the ``samples`` scenario (see the module docstring).
    fraction : float
        Share of a requesting client's train split to delete (``samples``).
    forget_class : int
        The class of the ``class`` scenario and of the ``class`` selection.
    """

    scenario: str = field(
        default="client",
        metadata={
            "key": "unlearn.scenario",
            "help": "what is deleted: client (whole clients), samples, class (from every client)",
        },
    )
    selection: str = field(
        default="random", metadata={"key": "unlearn.selection", "help": "samples: " + ", ".join(SELECTIONS)}
    )
    fraction: float = field(
        default=0.1,
        metadata={"key": "unlearn.fraction", "help": "samples: share of each requesting client's train split"},
    )
    forget_class: int = field(
        default=0,
        metadata={"key": "unlearn.class", "help": "the class of the class scenario and of the class selection"},
    )

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown unlearn.scenario '{self.scenario}'; valid: {', '.join(SCENARIOS)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown unlearn.selection '{self.selection}'; valid: {', '.join(SELECTIONS)}")
        if self.scenario == "samples" and not 0 < self.fraction < 1:
            raise ValueError(f"unlearn.fraction must be in (0, 1) for sample deletion, got {self.fraction}")
        if self.forget_class < 0:
            raise ValueError(f"unlearn.class must be >= 0, got {self.forget_class}")

    @property
    def needs_model(self) -> bool:
        """Whether the selection depends on the model at request time."""
        return self.scenario == "samples" and self.selection in MODEL_SELECTIONS

    @property
    def removed_classes(self) -> tuple[int, ...]:
        """Classes that leave the task altogether (class scenario only)."""
        return (self.forget_class,) if self.scenario == "class" else ()

    @property
    def clients_leave(self) -> bool:
        """Whether the requesting clients leave the federation (whole-client deletion)."""
        return self.scenario == "client"

    @property
    def by_class(self) -> bool:
        """Whether samples are chosen by their class (the class scenario, or the ``class`` selection)."""
        return self.scenario == "class" or self.scenario == "samples" and self.selection == "class"

    @property
    def joint(self) -> bool:
        """Whether one request spans every client (a class leaves everyone's data at once)."""
        return self.scenario == "class"

    def describe(self, clients: Sequence[int] = ()) -> str:
        """One line naming what is forgotten (``clients``: the requesting clients' ids)."""
        if self.scenario == "client":
            return f"client(s) {list(clients)} leave"
        if self.scenario == "class":
            return f"class {self.forget_class} removed"
        what = f"class-{self.forget_class} samples" if self.selection == "class" else f"{self.selection} samples"
        return f"client(s) {list(clients)} delete {self.fraction:.0%} ({what})"

    def label(self, clients: Sequence[int] = ()) -> str:
        """A short name for file and folder names (``dep0-high-loss0.1``, ``class3``)."""
        if self.scenario == "class":
            return f"class{self.forget_class}"
        what = "dep" + "-".join(map(str, clients))
        if self.scenario == "samples":
            what += f"-{f'class{self.forget_class}' if self.selection == 'class' else self.selection}{self.fraction:g}"
        return what

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (only the fields that matter for the scenario)."""
        out: dict[str, Any] = {"scenario": self.scenario}
        if self.scenario == "samples":
            out.update(selection=self.selection, fraction=self.fraction)
        if self.by_class:
            out["class"] = self.forget_class
        return out


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask of the ``k`` largest scores; ties broken by index (stable), so deterministic."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    mask = np.zeros(len(scores), bool)
    mask[order[:k]] = True
    return mask


def margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``z_y - max_{j != y} z_j`` per example (negative = misclassified)."""
    rows = np.arange(len(y))
    other = logits.astype(np.float64).copy()
    other[rows, y] = -np.inf
    return logits[rows, y] - other.max(axis=1)


def per_example_grads(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Per-example gradients of the cross-entropy w.r.t. all parameters, flattened, ``(N, P)``.

    Computed with ``torch.func.vmap`` over ``grad`` of a functional call (one
    backward per batch, not per example); the model's training-mode layers are put
    in eval mode so every example sees the same function.
    """
    from torch.func import functional_call, grad, vmap

    model.eval()
    params = {k: v.detach() for k, v in named_trainable(model)}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    rows = []
    for s in range(0, len(x), batch_size):
        gs = g(params, xt[s : s + batch_size], yt[s : s + batch_size])
        rows.append(torch.cat([gs[k].reshape(gs[k].shape[0], -1) for k in params], dim=1).double())
    return torch.cat(rows).numpy() if rows else np.zeros((0, sum(p.numel() for p in params.values())))


def mean_grad(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the mean cross-entropy over ``(x, y)``, flattened (float64)."""
    model.eval()
    params = list(trainable(model))
    loss = F.cross_entropy(model(torch.from_numpy(np.ascontiguousarray(x))), torch.from_numpy(np.ascontiguousarray(y)))
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads]).double().numpy()


def selection_scores(
    selection: str, model: nn.Module, x: np.ndarray, y: np.ndarray, heldout: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Score of every sample under a model-based selection (higher = selected first).

    Raises
    ------
    ValueError
        On a selection that needs no model, or ``influence`` without held-out data.
    """
    if selection == "high-loss":
        return cross_entropy(predict_logits(model, x), y)
    if selection == "low-margin":
        return -margins(predict_logits(model, x), y)
    if selection == "high-grad-norm":
        return np.linalg.norm(per_example_grads(model, x, y), axis=1)
    if selection == "influence":
        if heldout is None or len(heldout[0]) == 0:
            raise ValueError("the influence selection needs the client's held-out data")
        return per_example_grads(model, x, y) @ mean_grad(model, *heldout)
    raise ValueError(f"'{selection}' is not a model-based selection; model-based: {', '.join(MODEL_SELECTIONS)}")


def forget_mask(
    request: DeletionRequest,
    client_id: int,
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    model: nn.Module | None = None,
    heldout: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Boolean mask over the train split of a client named in the request: ``True`` = to be forgotten.

    Parameters
    ----------
    request : DeletionRequest
    client_id : int
        The requesting client (every client in the ``class`` scenario); a client that
        is not part of the request has nothing to forget and never calls this.
    x, y : np.ndarray
        The client's train split.
    seed : int
        Seeds the ``random`` and ``class`` selections (with the client id).
    model : nn.Module, optional
        The model at request time; required by the model-based selections.
    heldout : (x, y), optional
        The client's held-out data (``influence`` selection).

    Raises
    ------
    ValueError
        If a model-based selection gets no model.
    """
    n = len(y)
    if n == 0:
        return np.zeros(0, bool)
    if request.scenario == "client":
        return np.ones(n, bool)
    if request.scenario == "class":
        return np.asarray(y) == request.forget_class
    k = max(1, int(round(request.fraction * n)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7_919, client_id]))
    if request.selection == "random":
        return _top_k(rng.random(n), k)
    if request.selection == "class":
        of_class = np.flatnonzero(np.asarray(y) == request.forget_class)
        chosen = rng.permutation(of_class)[:k]
        mask = np.zeros(n, bool)
        mask[chosen] = True
        return mask
    if model is None:
        raise ValueError(f"the '{request.selection}' selection needs the model at request time")
    return _top_k(selection_scores(request.selection, model, x, y, heldout), k)


def mask_digest(mask: np.ndarray) -> str:
    """Short SHA-256 of a mask: identifies the deleted samples without revealing them."""
    return hashlib.sha256(np.packbits(np.asarray(mask, bool)).tobytes() + str(len(mask)).encode()).hexdigest()[:16]


def request_from_run_config(rc: Mapping[str, Any]) -> DeletionRequest:
    """Build the :class:`DeletionRequest` of a run config (``unlearn.*`` keys).

    Raises
    ------
    ValueError
        On wrong types or impossible values, naming the key.
    """
    request: DeletionRequest = read_settings(DeletionRequest, rc)
    return request
