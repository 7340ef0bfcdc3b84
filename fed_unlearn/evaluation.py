"""Client-side measurements and their server-side roll-up.

A client measures a model on its own data and reports sums and counts only (no
examples, no per-example losses); the server adds them up. The client splits its
data by its deletion mask (see :mod:`fed_unlearn.deletion`):

* ``forget``: its train samples to be forgotten (the whole split of a departing client,
  some samples, or the removed class);
* ``retain``: its other train samples (retained utility);
* ``test``: its held-out data, if it stays in the federation, without the removed classes;
* ``fheld``: its held-out samples of the classes in its forget set (the non-members of
  the membership-inference attacks, and "forget-heldout" accuracy: for a removed class,
  the accuracy on unseen samples of it).

The strong leakage audit (:func:`attack_scores_client`) is the exception: it returns one
attack score per forget and ``fheld`` sample (scores, never the samples), which the server
pools into ROC curves read at low false-positive rates (:mod:`fed_unlearn.attacks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from .attacks import attack_scores
from .data import ArrayDataset
from .metrics import cross_entropy, disagreement, entropy_mia_auc, kl_divergence, loss_mia_auc, mia_nn_auc, tv_distance
from .training import predict_logits

PARTS = ("forget", "retain", "test", "fheld")


def split_parts(
    train: ArrayDataset, heldout: ArrayDataset, forget: np.ndarray | None, removed_classes: Sequence[int] = ()
) -> dict[str, tuple[str, np.ndarray]]:
    """Index sets of the four parts: ``part -> (source "train"|"heldout", indices)``."""
    mask = np.zeros(len(train), bool) if forget is None else np.asarray(forget, bool)
    if mask.shape != (len(train),):
        raise ValueError(f"forget mask has shape {mask.shape}, the train split has {len(train)} samples")
    forget_idx, retain_idx = np.flatnonzero(mask), np.flatnonzero(~mask)
    h = np.arange(len(heldout))
    test_idx = h[~np.isin(heldout.y, list(removed_classes))] if len(retain_idx) else h[:0]
    fheld_idx = h[np.isin(heldout.y, np.unique(train.y[forget_idx]))] if len(forget_idx) else h[:0]
    return {
        "forget": ("train", forget_idx),
        "retain": ("train", retain_idx),
        "test": ("heldout", test_idx),
        "fheld": ("heldout", fheld_idx),
    }


def measure_client(
    model: nn.Module,
    train: ArrayDataset,
    heldout: ArrayDataset,
    forget: np.ndarray | None = None,
    removed_classes: Sequence[int] = (),
    reference: nn.Module | None = None,
    mia: bool = False,
) -> dict[str, float]:
    """Measure ``model`` on one client's parts.

    Parameters
    ----------
    model : nn.Module
        Model under evaluation.
    train, heldout : ArrayDataset
        The client's splits.
    forget : np.ndarray of bool, optional
        The client's deletion mask over ``train`` (``None`` = nothing to forget).
    removed_classes : sequence of int
        Classes removed from the task (class unlearning): left out of ``test``.
    reference : nn.Module, optional
        The gold model; adds ``<part>-kl-sum`` (sum over examples of KL(gold || model)),
        ``<part>-tv-sum`` (total variation) and ``<part>-disagree-sum``.
    mia : bool
        Add ``mia-auc`` (loss threshold), ``mia-entropy-auc`` (modified entropy) and, with
        removed classes, ``mia-nn-auc``: members = forget part, non-members = fheld part.

    Returns
    -------
    dict
        ``<part>-n``, ``<part>-correct``, ``<part>-loss-sum`` for the four parts, and the optional keys.
    """
    logits = {"train": predict_logits(model, train.x), "heldout": predict_logits(model, heldout.x)}
    labels = {"train": train.y, "heldout": heldout.y}
    ref = (
        {k: predict_logits(reference, d.x) for k, d in (("train", train), ("heldout", heldout))}
        if reference is not None
        else None
    )
    out: dict[str, float] = {}
    # the ordinary evaluation loss, over all held-out data (what the server's utility bound reads)
    out["eval-loss"] = float(np.mean(cross_entropy(logits["heldout"], heldout.y))) if len(heldout.y) else 0.0
    # and its accuracy (what guards a calibrated step longer than the method's own)
    out["eval-acc"] = float(np.mean(np.argmax(logits["heldout"], axis=1) == heldout.y)) if len(heldout.y) else 0.0
    parts = split_parts(train, heldout, forget, removed_classes)
    for part, (src, idx) in parts.items():
        lg, y = logits[src][idx], labels[src][idx]
        out[f"{part}-n"] = float(len(idx))
        out[f"{part}-correct"] = float(np.sum(np.argmax(lg, axis=1) == y)) if len(idx) else 0.0
        out[f"{part}-loss-sum"] = float(np.sum(cross_entropy(lg, y))) if len(idx) else 0.0
        if ref is not None:
            r = ref[src][idx]
            out[f"{part}-kl-sum"] = kl_divergence(r, lg) * len(idx) if len(idx) else 0.0
            out[f"{part}-tv-sum"] = tv_distance(r, lg) * len(idx) if len(idx) else 0.0
            out[f"{part}-disagree-sum"] = disagreement(r, lg) * len(idx) if len(idx) else 0.0
    f_idx, h_idx = parts["forget"][1], parts["fheld"][1]
    if mia and len(f_idx) and len(h_idx):
        fl, hl = logits["train"][f_idx], logits["heldout"][h_idx]
        fy, hy = train.y[f_idx], heldout.y[h_idx]
        out["mia-auc"] = loss_mia_auc(cross_entropy(fl, fy), cross_entropy(hl, hy))
        out["mia-entropy-auc"] = entropy_mia_auc(fl, fy, hl, hy)
        if removed_classes:
            out["mia-nn-auc"] = mia_nn_auc(fl, hl, list(removed_classes))
    return out


def _ratio(evals: Sequence[Mapping[str, float]], num: str, den: str) -> float:
    rows = [e for e in evals if e.get(den, 0.0) > 0]
    n = sum(e[den] for e in rows)
    if n == 0 or any(num not in e for e in rows):
        return float("nan")
    return float(sum(e[num] for e in rows) / n)


#: Report key -> (part, measurement).
SUMMARY_KEYS = {
    "test-acc": ("test", "correct"),
    "test-loss": ("test", "loss-sum"),
    "retain-acc": ("retain", "correct"),
    "forget-acc": ("forget", "correct"),
    "forget-loss": ("forget", "loss-sum"),
    "forget-heldout-acc": ("fheld", "correct"),
}
FIDELITY_KEYS = {
    "kl-forget": ("forget", "kl-sum"),
    "disagree-forget": ("forget", "disagree-sum"),
    "tv-forget": ("forget", "tv-sum"),
    "kl-test": ("test", "kl-sum"),
    "disagree-test": ("test", "disagree-sum"),
    "tv-test": ("test", "tv-sum"),
}
MIA_KEYS = ("mia-auc", "mia-entropy-auc", "mia-nn-auc")


def summarise(evals: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Roll per-client measurements of :func:`measure_client` up over the federation.

    Returns
    -------
    dict
        ``test-acc`` / ``test-loss`` (held-out data of the clients that stay, removed
        classes excluded), ``retain-acc``, ``forget-acc`` / ``forget-loss``,
        ``forget-heldout-acc``; when measured against a reference, ``kl-*``, ``tv-*``,
        ``disagree-*`` on the forget and test parts; and the MIA AUCs (means over the
        clients that measured them, weighted by forget-set size). Sums are over
        examples, so every ratio is example-weighted.
    """
    rows = [evals[c] for c in sorted(evals)]
    out = {k: _ratio(rows, f"{p}-{m}", f"{p}-n") for k, (p, m) in SUMMARY_KEYS.items()}
    if rows and all("forget-kl-sum" in e for e in rows):
        out.update({k: _ratio(rows, f"{p}-{m}", f"{p}-n") for k, (p, m) in FIDELITY_KEYS.items()})
    for key in MIA_KEYS:
        got = [e for e in rows if key in e and np.isfinite(e[key])]
        if got:
            w = np.array([e["forget-n"] for e in got])
            out[key] = float(np.sum(w * np.array([e[key] for e in got])) / np.sum(w))
    return out


def attack_scores_client(
    model: nn.Module,
    references: Sequence[nn.Module],
    train: ArrayDataset,
    heldout: ArrayDataset,
    forget: np.ndarray | None,
    in_reference: np.ndarray,
) -> dict[str, list[float]]:
    """Per-sample scores of the calibrated attacks on one client's forget and ``fheld`` samples.

    Parameters
    ----------
    model : nn.Module
        The audited model (original, unlearned or gold).
    references : sequence of nn.Module
        The ``K`` reference models (:func:`fed_unlearn.attacks.client_reference_masks`).
    train, heldout : ArrayDataset
        The client's splits.
    forget : np.ndarray of bool, optional
        The deletion mask over ``train`` (members); ``None``: nothing to score.
    in_reference : (K, len(train)) bool array
        Which reference trained on which of the client's training samples.

    Returns
    -------
    dict
        ``<attack>-forget`` / ``<attack>-heldout`` lists for every attack of
        :data:`fed_unlearn.attacks.ATTACKS`; the ``fheld`` samples are RMIA's population.
    """
    parts = split_parts(train, heldout, forget)
    f_idx, h_idx = parts["forget"][1], parts["fheld"][1]
    if len(f_idx) == 0 or len(h_idx) == 0:
        return {}
    if in_reference.shape != (len(references), len(train)):
        raise ValueError(f"reference masks have shape {in_reference.shape}, expected ({len(references)}, {len(train)})")
    xf, yf, xh, yh = train.x[f_idx], train.y[f_idx], heldout.x[h_idx], heldout.y[h_idx]
    scores = attack_scores(
        predict_logits(model, xf),
        predict_logits(model, xh),
        np.stack([predict_logits(r, xf) for r in references]),
        np.stack([predict_logits(r, xh) for r in references]),
        yf,
        yh,
        ~in_reference[:, f_idx],
    )
    return {k: [float(v) for v in vals] for k, vals in scores.items()}
