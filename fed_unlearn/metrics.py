"""Unlearning metrics on logits: utility, fidelity to the gold model, membership leakage.

All functions are pure numpy (ROC-AUC from scikit-learn, the reference implementation)
and take logits so that a client computes everything from one forward pass.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.special import log_softmax


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
    """ROC-AUC of an attack scoring members higher than non-members (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        return float("nan")
    scores = np.concatenate([member_scores, nonmember_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    return float(roc_auc_score(labels, scores))


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


def entropy_mia_auc(member_logits: np.ndarray, member_y: np.ndarray, nonmember_logits: np.ndarray, nonmember_y: np.ndarray) -> float:
    """ROC-AUC of the modified-entropy membership-inference attack (members have lower Mentr).

    Chosen as the stronger attack of the suite: Song & Mittal show it dominates the
    loss and confidence thresholds across models and datasets, it uses the label and the
    whole probability vector, and it needs no shadow models (LiRA's shadow federations
    would multiply the gold's cost by the number of shadows).
    """
    return mia_auc(-modified_entropy(member_logits, member_y), -modified_entropy(nonmember_logits, nonmember_y))


def weight_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """L2 distance between two models in weight space (all arrays of the state dict, flattened)."""
    if set(a) != set(b):
        raise ValueError(f"models have different arrays: {sorted(set(a) ^ set(b))}")
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2) for k in a)))


#: Metrics averaged by the Average Gap (retain, forget and test accuracy, MIA).
AVERAGE_GAP_KEYS = ("retain-acc", "forget-acc", "test-acc", "mia-auc")


def average_gap(model: Mapping[str, float], gold: Mapping[str, float], keys: tuple[str, ...] = AVERAGE_GAP_KEYS) -> float:
    """Average Gap: mean absolute difference to the gold over ``keys`` (0 = indistinguishable on them)."""
    missing = [k for k in keys if k not in model or k not in gold]
    if missing:
        raise ValueError(f"average gap needs {missing}")
    return float(np.mean([abs(model[k] - gold[k]) for k in keys]))
