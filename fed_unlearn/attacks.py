"""Per-example membership-inference attacks calibrated with reference models, read at low FPR.

A threshold attack (loss, entropy) scores every sample on one scale; most samples of a
well-fit model have near-zero loss whether it saw them or not, so its ROC-AUC stays near
0.5 and cannot tell a model that forgot from one that hid. The attacks here compare the
target model's confidence on a sample with what *reference models* trained without that
sample give it — a per-example calibration (Carlini et al., "Membership Inference Attacks
From First Principles", S&P 2022; Zarifzadeh, Liu, Shokri, "Low-Cost High-Power Membership
Inference Attacks", ICML 2024) — and are read where it matters: the true-positive rate at
1 % and 0.1 % false positives, with a confidence interval (a few hundred samples cannot
support 0.1 %).

* :func:`lira_offline`: offline LiRA. The logit-scaled confidence
  ``phi = log p_y - log(1 - p_y)`` of each reference model that did not train on the sample
  gives a Gaussian ``N(mu_x, sigma^2)`` (a per-sample mean, one variance pooled over the
  samples: the "fixed variance" variant, stable with few references); the score is
  ``Phi((phi_target - mu_x) / sigma)``.
* :func:`rmia_offline`: RMIA. The ratio ``r(x) = p(y|x; target) / Pr(x)``, with ``Pr(x)``
  the references' probability, offline-corrected ``((1 + a) mean_out + (1 - a)) / 2``;
  the score of ``x`` is the share of population samples ``z`` with
  ``r(x) / r(z) > gamma``.

Reference federations train on balanced random halves (:func:`reference_masks`): each
training sample is in exactly half of them, so every sample has ``K / 2`` "out" models.
Everything here is numpy/scipy: a client computes its scores from logits alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, ndtr, softmax

from .metrics import cross_entropy, mia_auc

#: The false-positive rates the reports read the attacks at.
LOW_FPRS = (0.01, 0.001)


def reference_masks(n: int, k: int, seed: int) -> np.ndarray:
    """Which of ``k`` reference models trains on each of ``n`` samples: ``(k, n)`` booleans.

    Balanced: every sample is in exactly ``k / 2`` of them (``k`` even), chosen at random
    per sample from ``seed``, so each has ``k / 2`` "out" models to calibrate against.

    Raises
    ------
    ValueError
        If ``k`` is not a positive even number.
    """
    if k < 2 or k % 2:
        raise ValueError(f"reference models come in pairs (an even count >= 2), got {k}")
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((n, k)), axis=1)  # a random permutation of the k models per sample
    return (ranks < k // 2).T


def client_reference_masks(n: int, k: int, seed: int, client_id: int) -> np.ndarray:
    """:func:`reference_masks` of one client's ``n`` training samples (seeded by the run and the client).

    Both ``train.reference`` (which half to train on) and ``evaluate.audit`` (which
    references are "out" for a sample) compute it on the node, so the halves never travel.
    """
    return reference_masks(n, k, int(np.random.SeedSequence([seed, 0x5EF, client_id]).generate_state(1)[0]))


def logit_confidence(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``log p_y - log(1 - p_y)`` per sample, computed stably from logits (LiRA's statistic)."""
    z = np.asarray(logits, np.float64)
    idx = np.arange(len(y))
    others = z.copy()
    others[idx, y] = -np.inf
    return z[idx, y] - logsumexp(others, axis=1)


def true_class_probability(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``p(y | x)`` per sample."""
    return softmax(np.asarray(logits, np.float64), axis=1)[np.arange(len(y)), y]


def lira_offline(target_phi: np.ndarray, ref_phi: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Offline LiRA scores (higher: more likely a member).

    Parameters
    ----------
    target_phi : (n,) array
        :func:`logit_confidence` of the target model.
    ref_phi : (k, n) array
        The same of each reference model.
    out : (k, n) bool array
        Whether reference ``j`` did *not* train on sample ``i``.

    Raises
    ------
    ValueError
        On mismatched shapes or a sample without any "out" reference.
    """
    ref_phi, out = np.asarray(ref_phi, np.float64), np.asarray(out, bool)
    if ref_phi.shape != out.shape or ref_phi.shape[1] != len(target_phi):
        raise ValueError(f"shapes differ: target {np.shape(target_phi)}, references {ref_phi.shape}, mask {out.shape}")
    counts = out.sum(axis=0)
    if np.any(counts == 0):
        raise ValueError("every sample needs at least one reference model that did not train on it")
    mu = np.where(out, ref_phi, 0.0).sum(axis=0) / counts
    resid = np.where(out, ref_phi - mu, 0.0)
    dof = max(int(out.sum()) - len(mu), 1)
    sigma = max(float(np.sqrt(np.sum(resid**2) / dof)), 1e-6)
    return np.asarray(ndtr((np.asarray(target_phi, np.float64) - mu) / sigma))  # the standard normal CDF


def rmia_offline(
    target_p: np.ndarray,
    ref_p: np.ndarray,
    out: np.ndarray,
    population_target_p: np.ndarray,
    population_ref_p: np.ndarray,
    a: float = 0.3,
    gamma: float = 1.0,
    exclude_self: bool = False,
) -> np.ndarray:
    """Offline RMIA scores in ``[0, 1]`` (higher: more likely a member).

    Parameters
    ----------
    target_p : (n,) array
        :func:`true_class_probability` of the target model on the scored samples.
    ref_p : (k, n) array, out : (k, n) bool array
        The references' probabilities on them, and which references did not train on each.
    population_target_p : (m,) array, population_ref_p : (k, m) array
        The same on population samples ``z`` no model trained on.
    a : float
        The offline correction of ``Pr(x)`` (the paper's default range is 0.2-0.4).
    gamma : float
        The likelihood-ratio threshold.
    exclude_self : bool
        The scored samples are the population itself (leave one out: ``z != x``).

    Raises
    ------
    ValueError
        On mismatched shapes, an empty population, or a sample without an "out" reference.
    """
    ref_p, out = np.asarray(ref_p, np.float64), np.asarray(out, bool)
    pop_ref = np.asarray(population_ref_p, np.float64)
    if ref_p.shape != out.shape or ref_p.shape[1] != len(target_p) or pop_ref.shape[1] != len(population_target_p):
        raise ValueError("shapes of the target, reference and population probabilities differ")
    if len(population_target_p) < 1 + int(exclude_self):
        raise ValueError("RMIA needs population samples")
    counts = out.sum(axis=0)
    if np.any(counts == 0):
        raise ValueError("every sample needs at least one reference model that did not train on it")

    def prior(p_out_mean: np.ndarray) -> np.ndarray:
        return np.maximum(0.5 * ((1 + a) * p_out_mean + (1 - a)), 1e-30)

    r_x = np.asarray(target_p, np.float64) / prior(np.where(out, ref_p, 0.0).sum(axis=0) / counts)
    r_z = np.asarray(population_target_p, np.float64) / prior(pop_ref.mean(axis=0))
    ranked = np.sort(r_z)
    below = np.searchsorted(ranked, r_x / gamma, side="left")  # z with r(z) < r(x) / gamma
    if exclude_self:
        below = below - (r_x < r_x / gamma)  # x itself counts only when r(x) < r(x) / gamma (never for gamma >= 1)
        return below / (len(ranked) - 1)
    return below / len(ranked)


@dataclass(frozen=True)
class LowFPR:
    """The true-positive rate of an attack at one false-positive rate.

    Attributes
    ----------
    fpr : float
        The false-positive rate asked for.
    tpr : float
        Members scored above the threshold (``nan`` when not supported).
    low, high : float
        Its 95 % Clopper-Pearson interval over the members.
    members, nonmembers : int
        Sample counts.
    supported : bool
        Whether there are enough non-members to place the threshold (``nonmembers * fpr >= 1``).
    fpr_high : float
        The upper end of the 95 % Clopper-Pearson interval of the threshold's own false-positive
        rate: with few non-members the threshold is itself uncertain (one above it out of 120
        says the true rate may be up to 4.6 %), so a TPR below this proves nothing.
    """

    fpr: float
    tpr: float
    low: float
    high: float
    members: int
    nonmembers: int
    supported: bool
    fpr_high: float = float("nan")


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of ``successes / trials``."""
    if trials <= 0:
        return float("nan"), float("nan")
    from scipy.stats import beta  # scipy.stats costs every client process 0.7 s of imports

    alpha = 1 - level
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> LowFPR:
    """TPR at ``fpr``: the threshold lets at most ``floor(fpr * nonmembers)`` non-members through."""
    m, n = np.asarray(members, np.float64), np.sort(np.asarray(nonmembers, np.float64))
    allowed = int(np.floor(fpr * len(n)))
    if len(m) == 0 or allowed < 1:
        return LowFPR(fpr, float("nan"), float("nan"), float("nan"), len(m), len(n), False)
    threshold = n[len(n) - allowed - 1]  # scores strictly above it: at most `allowed` non-members
    hits = int(np.sum(m > threshold))
    low, high = clopper_pearson(hits, len(m))
    fpr_high = clopper_pearson(int(np.sum(n > threshold)), len(n))[1]
    return LowFPR(fpr, hits / len(m), low, high, len(m), len(n), True, fpr_high)


def roc_points(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve ``(fpr, tpr)`` of scores (for plots on log-log axes)."""
    from sklearn.metrics import roc_curve

    scores = np.concatenate([members, nonmembers])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def summary(members: np.ndarray, nonmembers: np.ndarray, fprs: Sequence[float] = LOW_FPRS) -> dict[str, float]:
    """AUC and TPR (with its interval) at each low FPR, as flat keys (``tpr@1%``, ``tpr@1%-low`` ...)."""
    out: dict[str, float] = {
        "auc": mia_auc(members, nonmembers),
        "members": len(members),
        "nonmembers": len(nonmembers),
    }
    for f in fprs:
        r = tpr_at_fpr(members, nonmembers, f)
        tag = f"tpr@{f * 100:g}%"
        out.update({tag: r.tpr, f"{tag}-low": r.low, f"{tag}-high": r.high, f"{tag}-fpr-high": r.fpr_high})
    return out


#: Attacks every audit reports: the two calibrated ones and the loss threshold (for comparison).
ATTACKS = ("rmia", "lira", "loss")


def attack_scores(
    target_forget: np.ndarray,
    target_heldout: np.ndarray,
    refs_forget: np.ndarray,
    refs_heldout: np.ndarray,
    y_forget: np.ndarray,
    y_heldout: np.ndarray,
    out_forget: np.ndarray,
) -> dict[str, np.ndarray]:
    """Every attack's per-sample scores on one client's forget and held-out samples, from logits.

    Parameters
    ----------
    target_forget, target_heldout : (n, C), (m, C) arrays
        The audited model's logits on the forget and the held-out samples.
    refs_forget, refs_heldout : (K, n, C), (K, m, C) arrays
        The reference models' logits on the same samples.
    y_forget, y_heldout : int arrays
        Labels.
    out_forget : (K, n) bool array
        Whether reference ``j`` did not train on forget sample ``i`` (no reference trained on
        a held-out sample).

    Returns
    -------
    dict
        ``<attack>-forget`` and ``<attack>-heldout`` score arrays (higher: more likely a member);
        the held-out samples are also RMIA's population (each left out of its own comparison).
    """
    k, m = len(refs_heldout), len(y_heldout)
    out_h = np.ones((k, m), bool)
    p_f, p_h = true_class_probability(target_forget, y_forget), true_class_probability(target_heldout, y_heldout)
    rp_f = np.stack([true_class_probability(r, y_forget) for r in refs_forget]) if len(y_forget) else np.zeros((k, 0))
    rp_h = np.stack([true_class_probability(r, y_heldout) for r in refs_heldout])
    phi_f, phi_h = logit_confidence(target_forget, y_forget), logit_confidence(target_heldout, y_heldout)
    rphi_f = np.stack([logit_confidence(r, y_forget) for r in refs_forget]) if len(y_forget) else np.zeros((k, 0))
    rphi_h = np.stack([logit_confidence(r, y_heldout) for r in refs_heldout])
    # LiRA's pooled variance comes from the held-out samples (every reference is "out" there)
    # plus the forget samples' out references; scored separately, calibrated jointly
    phi_all = np.concatenate([phi_f, phi_h])
    lira = lira_offline(phi_all, np.concatenate([rphi_f, rphi_h], axis=1), np.concatenate([out_forget, out_h], axis=1))
    return {
        "rmia-forget": rmia_offline(p_f, rp_f, out_forget, p_h, rp_h) if len(y_forget) else np.zeros(0),
        "rmia-heldout": rmia_offline(p_h, rp_h, out_h, p_h, rp_h, exclude_self=True),
        "lira-forget": lira[: len(y_forget)],
        "lira-heldout": lira[len(y_forget) :],
        "loss-forget": -cross_entropy(np.asarray(target_forget), y_forget),
        "loss-heldout": -cross_entropy(np.asarray(target_heldout), y_heldout),
    }


def leakage_summary(
    scores: Mapping[str, Mapping[str, np.ndarray]], target: str | None = "gold"
) -> dict[str, dict[str, float]]:
    """The strong audit's figures per audited model, from pooled per-sample scores.

    Parameters
    ----------
    scores : mapping
        ``model name -> {<attack>-forget: scores, <attack>-heldout: scores}``
        (:func:`attack_scores`, pooled over the clients).
    target : str, optional
        The model every other one is compared with (the gold): ``<attack>-vs-<target>-auc``
        is the attack's AUC at telling the model's forget-sample scores from the target's —
        0.5 when the forget samples look to the attack exactly as they do on the target
        (a single-pair reading of U-LiRA's "unlearned or retrained?" test).

    Returns
    -------
    dict
        ``model -> {<attack>-auc, <attack>-tpr@1%, <attack>-tpr@1%-low/-high, ... ,
        members, nonmembers}``.
    """
    out: dict[str, dict[str, float]] = {}
    for name, s in scores.items():
        row: dict[str, float] = {}
        for a in ATTACKS:
            members, nonmembers = np.asarray(s[f"{a}-forget"]), np.asarray(s[f"{a}-heldout"])
            for k, v in summary(members, nonmembers).items():
                row[k if k in ("members", "nonmembers") else f"{a}-{k}"] = float(v)
            if target is not None and target in scores and name != target:
                row[f"{a}-vs-{target}-auc"] = mia_auc(members, np.asarray(scores[target][f"{a}-forget"]))
        out[name] = row
    return out


def erasure_verdict(after: Mapping[str, float], gold: Mapping[str, float] | None = None) -> tuple[bool | None, str]:
    """Whether RMIA still finds erased training samples, in words, from :func:`leakage_summary` figures.

    The yardstick is the gold's TPR at 1 % FPR, or chance without a gold: on a model that never
    saw the samples, members and non-members are exchangeable and any attack's TPR equals its
    FPR. With few unseen samples the threshold's own false-positive rate is uncertain (up to
    ``rmia-tpr@1%-fpr-high``), so the TPR's lower bound must exceed that too before anything
    is claimed.

    Returns
    -------
    (bool or None, str)
        ``True`` consistent with erasure, ``False`` not, ``None`` too few samples to tell; the sentence.
    """
    goal = float(gold["rmia-tpr@1%"]) if gold is not None else 0.01
    name = "the gold model (retrained without the site)" if gold is not None else "chance (TPR = FPR)"
    low, high = after.get("rmia-tpr@1%-low", float("nan")), after.get("rmia-tpr@1%-high", float("nan"))
    bar = max(goal, after.get("rmia-tpr@1%-fpr-high", 0.01))
    counts = f"{int(after['members'])} training samples, {int(after['nonmembers'])} unseen"
    if not np.isfinite(low):
        return None, f"too few samples to read RMIA at 1 % FPR ({counts})"
    tpr = after["rmia-tpr@1%"]
    if low <= bar:
        return True, (
            "consistent with erasure: RMIA does not find the site's training samples more often than "
            f"{name} within what {counts} can show: TPR at 1 % FPR {tpr:.3f} "
            f"(95 % CI {low:.3f}-{high:.3f}) vs {goal:.3f} (the threshold's own FPR may be up to {bar:.3f})"
        )
    return False, (
        "NOT CONSISTENT WITH ERASURE: RMIA still finds the site's training samples more often than "
        f"{name}: TPR at 1 % FPR {tpr:.3f} (95 % CI {low:.3f}-{high:.3f}, {counts}) "
        f"vs {goal:.3f} (the threshold's own FPR at most {bar:.3f})"
    )


def roc_on_grid(
    scores: Mapping[str, Mapping[str, np.ndarray]], attack: str = "rmia", points: int = 61
) -> dict[str, dict[str, list[float]]]:
    """``model -> {fpr, tpr}`` of one attack on log-spaced FPRs from 0.001 to 1 (what the ROC plots draw).

    Below one non-member (FPR < 1 / non-members) the curve is not measured: ``nan``, not
    extrapolated.
    """
    grid_fpr = np.logspace(-3, 0, points)
    out = {}
    for name, s in scores.items():
        fpr, tpr = roc_points(s[f"{attack}-forget"], s[f"{attack}-heldout"])
        curve = np.interp(grid_fpr, fpr, tpr)
        curve[grid_fpr < 1.0 / max(len(s[f"{attack}-heldout"]), 1)] = np.nan
        out[name] = {"fpr": grid_fpr.tolist(), "tpr": curve.tolist()}
    return out
