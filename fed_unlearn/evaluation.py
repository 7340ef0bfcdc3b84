"""Client-side measurements and their server-side roll-up by role.

A client measures a model on its own data and reports sums and counts only (no
examples, no per-example losses); the server adds them up per role:

* *remaining* clients: retained utility (train = retain set, held-out = test set) and
  fidelity to gold on their held-out data;
* *departing* clients: the forget set (their train data), their held-out data, fidelity
  to gold on the forget set, and the loss-threshold membership-inference AUC
  (members = forget set, non-members = their held-out data): loss threshold and
  modified-entropy attacks.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from torch import nn

from .data import ArrayDataset
from .metrics import cross_entropy, disagreement, entropy_mia_auc, kl_divergence, loss_mia_auc
from .training import predict_logits

SPLITS = ("train", "heldout")


def measure_client(
    model: nn.Module,
    train: ArrayDataset,
    heldout: ArrayDataset,
    reference: nn.Module | None = None,
    mia: bool = False,
) -> dict[str, float]:
    """Measure ``model`` on one client's two splits.

    Parameters
    ----------
    model : nn.Module
        Model under evaluation.
    train, heldout : ArrayDataset
        The client's splits.
    reference : nn.Module, optional
        The gold model; adds ``<split>-kl-sum`` (sum over examples of KL(gold || model))
        and ``<split>-disagree-sum``.
    mia : bool
        Add ``mia-auc`` (loss-threshold attack) and ``mia-entropy-auc`` (modified-entropy
        attack), train (members) vs held-out (non-members).

    Returns
    -------
    dict
        ``<split>-n``, ``<split>-correct``, ``<split>-loss-sum`` and the optional keys.
    """
    out: dict[str, float] = {}
    losses, all_logits = {}, {}
    for split, ds in zip(SPLITS, (train, heldout)):
        logits = predict_logits(model, ds.x)
        loss = cross_entropy(logits, ds.y)
        losses[split], all_logits[split] = loss, logits
        out[f"{split}-n"] = float(len(ds))
        out[f"{split}-correct"] = float(np.sum(np.argmax(logits, axis=1) == ds.y))
        out[f"{split}-loss-sum"] = float(np.sum(loss))
        if reference is not None:
            ref_logits = predict_logits(reference, ds.x)
            out[f"{split}-kl-sum"] = kl_divergence(ref_logits, logits) * len(ds)
            out[f"{split}-disagree-sum"] = disagreement(ref_logits, logits) * len(ds)
    if mia:
        out["mia-auc"] = loss_mia_auc(losses["train"], losses["heldout"])
        out["mia-entropy-auc"] = entropy_mia_auc(all_logits["train"], train.y, all_logits["heldout"], heldout.y)
    return out


def _ratio(evals: Sequence[Mapping[str, float]], num: str, den: str) -> float:
    n = sum(e.get(den, 0.0) for e in evals)
    if n == 0 or any(num not in e for e in evals):
        return float("nan")
    return float(sum(e[num] for e in evals) / n)


def summarise(evals: Mapping[int, Mapping[str, float]], departing: Sequence[int]) -> dict[str, float]:
    """Roll per-client measurements up by role.

    Parameters
    ----------
    evals : mapping client id -> measurements of :func:`measure_client`
    departing : sequence of int
        Departing client ids; every other client in ``evals`` is a remaining one.

    Returns
    -------
    dict
        ``test-acc`` / ``test-loss`` / ``retain-acc`` (remaining clients' held-out and train),
        ``forget-acc`` / ``forget-loss`` / ``forget-heldout-acc`` (departing clients),
        and when measured: ``kl-forget``, ``disagree-forget``, ``kl-test``,
        ``disagree-test``, ``mia-auc`` and ``mia-entropy-auc`` (means over departing clients,
        weighted by forget-set size).
    """
    dep = [evals[c] for c in sorted(evals) if c in set(departing)]
    rem = [evals[c] for c in sorted(evals) if c not in set(departing)]
    out = {
        "test-acc": _ratio(rem, "heldout-correct", "heldout-n"),
        "test-loss": _ratio(rem, "heldout-loss-sum", "heldout-n"),
        "retain-acc": _ratio(rem, "train-correct", "train-n"),
        "forget-acc": _ratio(dep, "train-correct", "train-n"),
        "forget-loss": _ratio(dep, "train-loss-sum", "train-n"),
        "forget-heldout-acc": _ratio(dep, "heldout-correct", "heldout-n"),
    }
    if all("train-kl-sum" in e for e in evals.values()) and evals:
        out["kl-forget"] = _ratio(dep, "train-kl-sum", "train-n")
        out["disagree-forget"] = _ratio(dep, "train-disagree-sum", "train-n")
        out["kl-test"] = _ratio(rem, "heldout-kl-sum", "heldout-n")
        out["disagree-test"] = _ratio(rem, "heldout-disagree-sum", "heldout-n")
    for key in ("mia-auc", "mia-entropy-auc"):
        if dep and all(key in e for e in dep):
            w = np.array([e["train-n"] for e in dep])
            out[key] = float(np.sum(w * np.array([e[key] for e in dep])) / np.sum(w))
    return out
