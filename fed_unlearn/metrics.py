"""Unlearning metrics on logits: utility, fidelity to the gold model, membership leakage.

All functions are pure numpy (ROC-AUC from scikit-learn, the reference implementation)
and take logits so that a client computes everything from one forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.special import log_softmax

from .aggregation import is_batchnorm_buffer


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy; ``nan`` on an empty set."""
    if len(y) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=1) == y))


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy loss ``-log p(y|x)``."""
    return -log_softmax(logits, axis=1)[np.arange(len(y)), y]


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over examples of KL(p_ref || p) in nats.

    ``ref`` is the gold (retrained) model: the divergence measures how much
    probability mass the evaluated model puts where the gold would not.
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {ref_logits.shape} vs {logits.shape}")
    if len(logits) == 0:
        return float("nan")
    log_p_ref, log_p = log_softmax(ref_logits, axis=1), log_softmax(logits, axis=1)
    return float(np.mean(np.sum(np.exp(log_p_ref) * (log_p_ref - log_p), axis=1)))


def disagreement(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of examples whose top-1 prediction differs between the two models."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {ref_logits.shape} vs {logits.shape}")
    if len(logits) == 0:
        return float("nan")
    return float(np.mean(np.argmax(ref_logits, axis=1) != np.argmax(logits, axis=1)))


def mia_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC-AUC of an attack scoring members higher than non-members; ``nan`` if either side is empty.

    The Mann-Whitney statistic ``U / (n_members n_nonmembers)`` with ties counted half (the
    value scikit-learn's ``roc_auc_score`` gives), from average ranks in numpy: every client
    computes it in the calibration, and scikit-learn's metrics would cost each client
    process over a second of imports.
    """
    m, n = np.asarray(member_scores, np.float64).ravel(), np.asarray(nonmember_scores, np.float64).ravel()
    if len(m) == 0 or len(n) == 0:
        return float("nan")
    both = np.concatenate([m, n])
    order = np.argsort(both, kind="mergesort")
    _, first, counts = np.unique(both[order], return_index=True, return_counts=True)
    ranks = np.empty(len(both))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average rank of each tie group
    u = float(ranks[: len(m)].sum()) - len(m) * (len(m) + 1) / 2.0
    return u / (len(m) * len(n))


def loss_mia_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """ROC-AUC of the loss-threshold membership-inference attack (Yeom et al. 2018).

    The attacker scores each example by its negated loss (members are fit better);
    the AUC is the probability that a random member scores above a random
    non-member. 0.5 = no leakage; the target after unlearning is the gold model's
    figure on the same sets, not 0.5.
    """
    return mia_auc(-np.asarray(member_losses), -np.asarray(nonmember_losses))


def modified_entropy(logits: np.ndarray, y: np.ndarray, eps: float = 1e-30) -> np.ndarray:
    """Per-example modified prediction entropy (Song & Mittal, USENIX Security 2021).

    ``Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``: low when the
    model is confidently right, high when it is confidently wrong (unlike plain entropy,
    which cannot tell the two apart).
    """
    p = np.exp(log_softmax(logits, axis=1))
    rows = np.arange(len(y))
    py = p[rows, y]
    others = -p * np.log(np.clip(1.0 - p, eps, None))
    others[rows, y] = 0.0
    return -(1.0 - py) * np.log(np.clip(py, eps, None)) + others.sum(axis=1)


def entropy_mia_auc(
    member_logits: np.ndarray, member_y: np.ndarray, nonmember_logits: np.ndarray, nonmember_y: np.ndarray
) -> float:
    """ROC-AUC of the modified-entropy membership-inference attack (members have lower Mentr).

    Chosen as the stronger attack of the suite: Song & Mittal show it dominates the
    loss and confidence thresholds across models and datasets, it uses the label and the
    whole probability vector, and it needs no shadow models (LiRA's shadow federations
    would multiply the gold's cost by the number of shadows).
    """
    return mia_auc(-modified_entropy(member_logits, member_y), -modified_entropy(nonmember_logits, nonmember_y))


def tv_distance(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over examples of the total-variation distance ``0.5 * sum_k |p_ref(k) - p(k)|``."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {ref_logits.shape} vs {logits.shape}")
    if len(logits) == 0:
        return float("nan")
    return float(
        np.mean(0.5 * np.abs(np.exp(log_softmax(ref_logits, axis=1)) - np.exp(log_softmax(logits, axis=1))).sum(axis=1))
    )


def remaining_class_probs(logits: np.ndarray, removed: tuple[int, ...] | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The predictive distribution renormalised over the classes not removed: ``(q, kept_classes)``."""
    p = np.exp(log_softmax(logits, axis=1))
    kept = np.array([k for k in range(p.shape[1]) if k not in set(removed)])
    if len(kept) == 0:
        raise ValueError("every class is removed")
    q = p[:, kept]
    return q / np.clip(q.sum(axis=1, keepdims=True), 1e-300, None), kept


def mia_nn_auc(member_logits: np.ndarray, nonmember_logits: np.ndarray, removed: tuple[int, ...] | list[int]) -> float:
    """Nearest-neighbour-class membership inference for class unlearning (MIA-NN).

    After Ebrahimpour-Boroojeny, Wang & Sundaram, "On the Necessity of Output
    Distribution Reweighting for Effective Class Unlearning" (2025): a model that
    merely suppresses the removed class still treats the samples it was trained on
    differently from unseen samples of that class *in how it spreads their mass over
    the remaining classes*; a retrained model never saw either. Our instantiation
    (the paper trains an attack model; this is its threshold form, no shadow models):

    * ``q(k|x)``: the model's distribution renormalised over the remaining classes;
    * the neighbouring class ``k* = argmax_k mean_{x in non-members} q(k|x)`` (the
      remaining class most like the removed one, estimated from unseen samples of it);
    * score ``q(k*|x)``; AUC of members (the forgotten training samples) against
      non-members (held-out samples of the removed class).

    0.5 = indistinguishable; the target is the gold model's figure on the same sets
    (either direction away from it is leakage).
    """
    if len(member_logits) == 0 or len(nonmember_logits) == 0:
        return float("nan")
    q_mem, _ = remaining_class_probs(member_logits, removed)
    q_non, _ = remaining_class_probs(nonmember_logits, removed)
    k = int(np.argmax(q_non.mean(axis=0)))
    return mia_auc(q_mem[:, k], q_non[:, k])


def weight_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """L2 distance between two models in weight space (their float arrays, flattened).

    Integer arrays and BatchNorm statistics are not weights: a step counter would dominate.
    """
    if set(a) != set(b):
        raise ValueError(f"models have different arrays: {sorted(set(a) ^ set(b))}")
    names = [k for k in a if np.asarray(a[k]).dtype.kind == "f" and not is_batchnorm_buffer(k)]
    return float(
        np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2) for k in names))
    )


#: Metrics averaged by the Average Gap (retain, forget and test accuracy, MIA).
AVERAGE_GAP_KEYS = ("retain-acc", "forget-acc", "test-acc", "mia-auc")


def average_gap(
    model: Mapping[str, float], gold: Mapping[str, float], keys: tuple[str, ...] = AVERAGE_GAP_KEYS
) -> float:
    """Average Gap: mean absolute difference to the gold over ``keys`` (0 = indistinguishable on them)."""
    missing = [k for k in keys if k not in model or k not in gold]
    if missing:
        raise ValueError(f"average gap needs {missing}")
    return float(np.mean([abs(model[k] - gold[k]) for k in keys]))
