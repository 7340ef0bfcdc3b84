"""Gold-free calibration of how far to unlearn: the scale of the unlearning step.

A method's unlearning round produces ``w_new``; the model the remaining clients alone would
give is ``base`` (their FedAvg step, or the unchanged model when they did not train), and the
unlearning step is ``d = w_new - base``. Calibration searches ``w(c) = base + c d`` for
``c`` in ``[0, 1]``: the forgetting clients evaluate the candidates on their own forget set
and their own held-out data (nothing else leaves them: sums and counts), and the server
picks the smallest ``c`` at which the forget set looks like data the model never saw — what
a model retrained without it shows. The gold model is never consulted.

Before that, the same clients measure the pre-request model: unless their forget set is
more member-like than their held-out data by more than ``z`` standard errors — the
loss-threshold attack's AUC above chance (a stratified Mann-Whitney test over the
clients), or the forget accuracy above the held-out accuracy — nothing was memorised and
the pre-request model is kept (:func:`memorisation`): no step at all, not even the
remaining clients' round (which would only add SGD noise). For a class: kept when the model
no longer predicts it. Weak evidence moves nothing; a difference in the mean loss alone,
which a few hard held-out samples make, is not evidence.

What "looks like unseen data" means depends on what is deleted (:func:`target_for`):

* ``loss-match`` (a whole client, random samples, hard samples): the forget set's loss
  distribution reaches that of held-out samples like them (same classes; for hard samples,
  the held-out samples the same selection rule ranks highest) — the loss-threshold attack
  at chance, AUC 0.5, a two-sample statistic of the whole distributions rather than of one
  mean — and its accuracy falls to theirs; the smallest such scale, so the forget set never
  ends less member-like than unseen data;
* ``accuracy-floor`` (a class): the model no longer predicts the class on its samples —
  accuracy on the forget set at or below ``floor`` (a retrained model never saw the class
  and never predicts it).

A departing client's own held-out data stands for "unseen" only where the federation that
stays would know its distribution anyway. A class that the clients who stay (almost) never
hold (:func:`unsupported_classes`, from their label counts) is knowledge only the departing
clients brought: a model retrained without them does not predict it, whatever the departing
client's held-out samples of it say. Whole-client departures therefore add the class target
on those classes' forget samples (their accuracy at or below ``floor``), both to the
memorisation test and to the scale (:func:`choose_scale`'s ``unsupported_acc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .deletion import CALIBRATION_TARGETS

TARGETS = ("loss-match", "accuracy-floor")
#: The default candidate scales (fractions of the method's own step; never more than it).
DEFAULT_SCALES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def target_for(scenario: str) -> str:
    """The calibration target of a deletion scenario (``client``, ``samples`` or ``class``)."""
    return CALIBRATION_TARGETS[scenario]


@dataclass(frozen=True)
class Calibration:
    """The outcome of a calibration.

    Attributes
    ----------
    scale : float
        The chosen ``c`` (interpolated between the evaluated candidates).
    reached : bool
        Whether the target is reached within ``[0, 1]`` (``False``: the candidate that comes
        closest to it, which never overshoots it).
    target : str
        ``loss-match`` or ``accuracy-floor``.
    gaps : tuple of float
        Per candidate: how far from looking unseen (``loss-match``: 0.5 minus the attack's
        AUC, or forget minus held-out mean loss; with the held-out accuracy, the smaller of
        that and the accuracy gap; the target is ``gap >= 0``) or forget accuracy minus the
        floor (``accuracy-floor``; the target is ``gap <= 0``).
    """

    scale: float
    reached: bool
    target: str
    gaps: tuple[float, ...]


def choose_scale(
    scales: Sequence[float],
    forget_loss: Sequence[float],
    heldout_loss: Sequence[float],
    forget_acc: Sequence[float],
    target: str = "loss-match",
    floor: float = 0.02,
    heldout_acc: Sequence[float] | None = None,
    auc: Sequence[float] | None = None,
    unsupported_acc: Sequence[float] | None = None,
) -> Calibration:
    """The smallest scale reaching the target, linearly interpolated between candidates.

    ``loss-match`` with ``auc`` (per candidate, the loss-threshold attack's AUC on the forget
    set against held-out samples like it): the forget set's whole loss distribution must
    look unseen — the attack at chance, ``auc <= 0.5`` — rather than its mean loss, which a
    few confidently wrong held-out samples pull up (the mean is then met while most forget
    samples still have far lower losses than unseen ones). Without ``auc``, the mean losses.
    With ``heldout_acc`` the forget set's accuracy must also be at most the held-out one.
    With ``unsupported_acc`` (``loss-match`` only: per candidate, the accuracy on the forget
    samples of classes the clients who stay do not hold) that accuracy must also be at most
    ``floor``.
    Stopping at the first candidate that looks unseen never takes the forget set past the
    point where it looks *less* member-like than unseen data (itself a membership signal).

    When no candidate reaches it, the one closest to it (the largest gap): a step that moves
    the forget set away from the target is not taken further.

    Parameters
    ----------
    scales : sequence of float
        Increasing candidate scales, starting at 0.
    forget_loss, heldout_loss, forget_acc : sequence of float
        Per candidate, measured by the forgetting clients (pooled over them).
    target : {"loss-match", "accuracy-floor"}
    floor : float
        The accuracy floor of ``accuracy-floor``.

    Raises
    ------
    ValueError
        On an unknown target, lengths that differ, scales not increasing from 0, or
        non-finite measurements.
    """
    s = np.asarray(scales, np.float64)
    if target not in TARGETS:
        raise ValueError(f"unknown calibration target '{target}'; valid: {', '.join(TARGETS)}")
    if not len(s) or s[0] != 0 or np.any(np.diff(s) <= 0):
        raise ValueError(f"scales must increase from 0, got {list(scales)}")
    if target == "loss-match":
        if auc is not None:
            gap = 0.5 - np.asarray(auc, np.float64)  # target: the attack at chance or below
        else:
            gap = np.asarray(forget_loss, np.float64) - np.asarray(heldout_loss, np.float64)  # target: gap >= 0
        if heldout_acc is not None:
            held, fa = np.asarray(heldout_acc, np.float64), np.asarray(forget_acc, np.float64)
            if held.shape != gap.shape or fa.shape != gap.shape:
                raise ValueError("calibration needs one held-out accuracy per scale")
            acc_gap = held - fa
            gap = np.minimum(gap, acc_gap)
        if unsupported_acc is not None:
            ua = np.asarray(unsupported_acc, np.float64)
            if ua.shape != gap.shape:
                raise ValueError("calibration needs one accuracy of the unsupported classes per scale")
            gap = np.minimum(gap, floor - ua)
    else:
        gap = floor - np.asarray(forget_acc, np.float64)  # target: accuracy <= floor, i.e. gap >= 0
    if gap.shape != s.shape or not np.all(np.isfinite(gap)):
        raise ValueError("calibration needs one finite measurement per scale")
    shown = tuple(float(g) if target == "loss-match" else float(-g) for g in gap)
    hit = np.flatnonzero(gap >= 0)
    if not len(hit):
        return Calibration(float(s[int(np.argmax(gap))]), False, target, shown)
    i = int(hit[0])
    if i == 0:
        return Calibration(0.0, True, target, shown)
    # the gap crosses zero between candidates i-1 and i
    frac = float(-gap[i - 1] / (gap[i] - gap[i - 1]))
    return Calibration(float(s[i - 1] + frac * (s[i] - s[i - 1])), True, target, shown)


@dataclass(frozen=True)
class Memorisation:
    """Whether the pre-request model remembers the forget set.

    Attributes
    ----------
    memorised : bool
        ``loss-match``: the forget set is more member-like than held-out data by more than
        ``z`` standard errors — the loss-threshold attack's AUC above chance (stratified
        Mann-Whitney), or the forget accuracy above the held-out accuracy; without the
        attack's figures, the forget mean loss below the held-out one; or (with
        ``unsupported-acc``) the model still predicts, above the floor, classes only the
        departing clients hold. ``accuracy-floor``: the forget accuracy is above the floor.
    statistic : float
        The larger of the two z scores (resp. the mean-loss z, or the forget accuracy minus
        the floor).
    auc : float
        The loss-threshold attack's AUC, forget set vs held-out (0.5: indistinguishable).
    """

    memorised: bool
    statistic: float
    auc: float


def memorisation(
    pre: dict[str, float], target: str = "loss-match", floor: float = 0.02, z: float = 1.0
) -> Memorisation:
    """Test whether the pre-request model remembers the forget set (the ``pre`` figures of :func:`pooled`).

    Raises
    ------
    ValueError
        On an unknown target, or non-finite figures.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown calibration target '{target}'; valid: {', '.join(TARGETS)}")
    f, h, se, auc, acc = (float(pre[k]) for k in ("forget-loss", "heldout-loss", "se", "auc", "forget-acc"))
    if not all(np.isfinite(v) for v in (f, h, se, auc, acc)):
        raise ValueError("the memorisation test needs finite figures")
    if target == "accuracy-floor":
        return Memorisation(acc > floor, acc - floor, auc)
    ua = float(pre.get("unsupported-acc", 0.0))
    if not np.isfinite(ua):
        raise ValueError("the memorisation test needs finite figures")
    unsupported = "unsupported-acc" in pre and ua > floor
    if "auc-z" in pre and "acc-z" in pre:
        stat = max(float(pre["auc-z"]), float(pre["acc-z"]))
        if not np.isfinite(stat):
            raise ValueError("the memorisation test needs finite figures")
        return Memorisation(stat > z or unsupported, stat, auc)
    stat = (h - f) / se if se > 0 else (float("inf") if h > f else 0.0)
    return Memorisation(stat > z or unsupported, stat, auc)


def utility_scale(
    scales: Sequence[float], values: Sequence[float], tolerance: float, higher_is_better: bool = False
) -> float:
    """The largest scale whose utility stays within ``tolerance`` (relative) of the utility at scale 0.

    ``values`` are the remaining clients' evaluation (a loss, or with ``higher_is_better``
    an accuracy) of ``base + c d`` for each ``c`` in ``scales``. Walking up the scales, the
    first candidate outside ``values[0] * (1 + tolerance)`` (resp. ``1 - tolerance``) ends
    the walk; the scale is interpolated linearly to where the bound is crossed. The rule a
    federation has without the forgetting clients' help: the step goes as far as the
    clients who stay do not pay for it.

    Raises
    ------
    ValueError
        On scales not increasing from 0, lengths that differ, non-finite values or a negative tolerance.
    """
    s, v = np.asarray(scales, np.float64), np.asarray(values, np.float64)
    if not len(s) or s[0] != 0 or np.any(np.diff(s) <= 0):
        raise ValueError(f"scales must increase from 0, got {list(scales)}")
    if v.shape != s.shape or not np.all(np.isfinite(v)):
        raise ValueError("the utility bound needs one finite value per scale")
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    sign = -1.0 if higher_is_better else 1.0
    cost = sign * v  # lower is better
    limit = cost[0] + tolerance * abs(cost[0])
    for i in range(1, len(s)):
        if cost[i] > limit:
            frac = (limit - cost[i - 1]) / (cost[i] - cost[i - 1]) if cost[i] > cost[i - 1] else 0.0
            return float(s[i - 1] + max(0.0, min(1.0, frac)) * (s[i] - s[i - 1]))
    return float(s[-1])


def extension_limit(scales: Sequence[float], guards: Sequence[Sequence[float]], tolerance: float) -> float:
    """How far beyond the method's own step (scale 1) a calibration may go: the guards' utility bound.

    ``scales`` start ``0, 1`` and go on with the longer candidates; each guard holds, per
    scale (possibly for a prefix of them: a walk stopped where the cost is already too
    high), a cost on data the federation keeps (a loss, or an accuracy negated) — the
    remaining clients' evaluation, the forgetting clients' other held-out samples. A
    candidate beyond 1 is admissible while every guard stays within ``tolerance`` (relative) of its value at scale 0
    (:func:`utility_scale`): an ascent step driven further to make the forget set look
    unseen must not get there by breaking the model for everything else. Without any guard,
    1: no evidence that a longer step is harmless, so none is taken.

    Raises
    ------
    ValueError
        On scales that do not start ``0, 1``, or as :func:`utility_scale`.
    """
    s = [float(c) for c in scales]
    if len(s) < 2 or s[0] != 0.0 or s[1] != 1.0:
        raise ValueError(f"extension scales must start 0, 1, got {s}")
    if not guards:
        return 1.0
    if any(len(g) < 2 or len(g) > len(s) for g in guards):
        raise ValueError("each guard needs a value at scales 0 and 1, and at most one per scale")
    return max(1.0, min(utility_scale(s[: len(g)], g, tolerance) for g in guards))


def mann_whitney_z(aucs: Sequence[float], forget_n: Sequence[float], heldout_n: Sequence[float]) -> tuple[float, float]:
    """Stratified Mann-Whitney z (van Elteren) of per-client AUCs, and the pooled AUC.

    Client ``i``'s statistic is ``U_i = AUC_i n_i m_i`` (``n_i`` forget, ``m_i`` held-out
    samples) with null mean ``n_i m_i / 2`` and variance ``n_i m_i (n_i + m_i + 1) / 12``;
    the strata add up.
    """
    a, n, m = (np.asarray(v, np.float64) for v in (aucs, forget_n, heldout_n))
    pairs = n * m
    var = float(np.sum(pairs * (n + m + 1) / 12.0))
    if var <= 0:
        raise ValueError("the memorisation test needs forget and held-out samples")
    return float(np.sum((a - 0.5) * pairs) / np.sqrt(var)), float(np.sum(a * pairs) / np.sum(pairs))


@dataclass(frozen=True)
class Measurement:
    """One model measured by a forgetting client: per-sample losses and correct counts of its forget set, of
    its held-out samples like it and of its other held-out samples (the raw material of :func:`client_stats`)."""

    forget_loss: np.ndarray
    forget_correct: float
    heldout_loss: np.ndarray
    heldout_correct: float
    #: the client's other held-out samples (what it keeps being served on), when it has any
    rest_loss: np.ndarray | None = None
    rest_correct: float = 0.0
    #: per class (the model's output classes), the forget samples it gets right
    forget_class_correct: np.ndarray | None = None


def client_stats(
    per_scale: Sequence[Measurement],
    pre_request: Measurement | None,
    forget_n: int,
    heldout_n: int,
    forget_class_n: Sequence[int] | None = None,
) -> dict[str, list[float]]:
    """What a forgetting client reports of the candidates ``base + c * direction`` (and of the pre-request model).

    Sums and counts only — no sample leaves the client — in the form :func:`pooled` reads:
    per scale the forget and held-out loss sums and correct counts and the loss-threshold
    attack's AUC (forget vs held-out); for the pre-request model the same with the sums of
    squared losses (for the standard error of the memorisation test). With ``forget_class_n``
    (the forget set's size per class) and every measurement's ``forget_class_correct``: the
    per-class correct counts too (``forget-class-correct``, scale-major), for the class target
    of classes the clients who stay do not hold.
    """
    from .metrics import loss_mia_auc

    out: dict[str, list[float]] = {
        "forget-loss-sum": [float(np.sum(m.forget_loss)) for m in per_scale],
        "forget-correct": [float(m.forget_correct) for m in per_scale],
        "heldout-loss-sum": [float(np.sum(m.heldout_loss)) for m in per_scale],
        "heldout-correct": [float(m.heldout_correct) for m in per_scale],
        # the loss-threshold attack's AUC, forget vs held-out: the whole distributions
        "forget-auc": [loss_mia_auc(m.forget_loss, m.heldout_loss) for m in per_scale],
    }
    rest = [m.rest_loss for m in per_scale if m.rest_loss is not None and len(m.rest_loss)]
    if per_scale and len(rest) == len(per_scale):
        # the guard of steps beyond the method's own: what the client keeps must not pay for it
        out["rest-loss-sum"] = [float(np.sum(r)) for r in rest]
        out["rest-correct"] = [float(m.rest_correct) for m in per_scale]
        out["rest-n"] = [float(len(rest[0]))]
    per_class = [m.forget_class_correct for m in per_scale]
    if (
        forget_class_n is not None
        and per_scale
        and all(c is not None and len(c) == len(forget_class_n) for c in per_class)
    ):
        out["forget-class-n"] = [float(n) for n in forget_class_n]
        out["forget-class-correct"] = [float(v) for c in per_class for v in np.asarray(c)]
        pre_class = None if pre_request is None else pre_request.forget_class_correct
        if pre_class is not None and len(pre_class) == len(forget_class_n):
            out["pre-forget-class-correct"] = [float(v) for v in np.asarray(pre_class)]
    if pre_request is not None:
        f, h = pre_request.forget_loss, pre_request.heldout_loss
        out.update(
            {
                "pre-forget-loss-sum": [float(np.sum(f))],
                "pre-forget-loss-sq": [float(np.sum(f * f))],
                "pre-forget-correct": [float(pre_request.forget_correct)],
                "pre-heldout-correct": [float(pre_request.heldout_correct)],
                "pre-heldout-loss-sum": [float(np.sum(h))],
                "pre-heldout-loss-sq": [float(np.sum(h * h))],
                "pre-auc": [loss_mia_auc(f, h)],
            }
        )
    return {**out, "forget-n": [float(forget_n)], "heldout-n": [float(heldout_n)]}


def pooled(stats: Sequence[dict[str, Sequence[float]]]) -> dict[str, Any]:
    """Pool several clients' per-scale sums into means: ``forget-loss``, ``heldout-loss``, ``forget-acc``.

    Each entry holds per-scale lists ``forget-loss-sum``, ``forget-correct``, ``heldout-loss-sum``
    and the counts ``forget-n``, ``heldout-n``. When every entry also measured the pre-request
    model (single-element lists ``pre-forget-loss-sum``, ``pre-forget-loss-sq``,
    ``pre-forget-correct``, ``pre-heldout-loss-sum``, ``pre-heldout-loss-sq`` and ``pre-auc``,
    the loss-threshold attack's AUC on its forget vs held-out samples), ``pre`` holds its
    pooled means, the standard error ``se`` of the difference of the mean losses, the pooled
    AUC and its stratified Mann-Whitney ``auc-z``. With other held-out samples (``rest-loss-sum``,
    ``rest-correct``, ``rest-n``) on any client: their pooled ``rest-loss`` and ``rest-acc`` per
    scale.
    """
    fn = sum(float(st["forget-n"][0]) for st in stats)
    hn = sum(float(st["heldout-n"][0]) for st in stats)
    if fn <= 0 or hn <= 0:
        raise ValueError("calibration needs forget and held-out samples")
    k = len(stats[0]["forget-loss-sum"])
    out: dict[str, Any] = {"forget-loss": [], "heldout-loss": [], "forget-acc": []}
    for j in range(k):
        out["forget-loss"].append(sum(float(st["forget-loss-sum"][j]) for st in stats) / fn)
        out["heldout-loss"].append(sum(float(st["heldout-loss-sum"][j]) for st in stats) / hn)
        out["forget-acc"].append(sum(float(st["forget-correct"][j]) for st in stats) / fn)
    if all("heldout-correct" in st for st in stats):
        out["heldout-acc"] = [sum(float(st["heldout-correct"][j]) for st in stats) / hn for j in range(k)]
    rn = sum(float(st["rest-n"][0]) for st in stats if "rest-n" in st)
    if rn > 0:
        # clients without other held-out samples add nothing to the rest's means
        has = [st for st in stats if "rest-n" in st]
        out["rest-loss"] = [sum(float(st["rest-loss-sum"][j]) for st in has) / rn for j in range(k)]
        out["rest-acc"] = [sum(float(st["rest-correct"][j]) for st in has) / rn for j in range(k)]
    widths = {len(st["forget-class-n"]) for st in stats if "forget-class-n" in st}
    if len(widths) == 1 and all("forget-class-n" in st for st in stats):
        width = widths.pop()
        out["class-n"] = [sum(float(st["forget-class-n"][c]) for st in stats) for c in range(width)]
        rows = [np.asarray(st["forget-class-correct"], np.float64) for st in stats]
        if any(r.shape != (k * width,) for r in rows):
            raise ValueError("the per-class counts need one row per scale")
        out["class-correct"] = np.sum([r.reshape(k, width) for r in rows], axis=0).tolist()
        if all("pre-forget-class-correct" in st for st in stats):
            pre_rows = [np.asarray(st["pre-forget-class-correct"], np.float64) for st in stats]
            if any(r.shape != (width,) for r in pre_rows):
                raise ValueError("the per-class counts of the pre-request model need one per class")
            out["pre-class-correct"] = np.sum(pre_rows, axis=0).tolist()
    if all("forget-auc" in st for st in stats):
        zs, aucs = [], []
        for j in range(k):
            z_j, a_j = mann_whitney_z(
                [float(st["forget-auc"][j]) for st in stats],
                [float(st["forget-n"][0]) for st in stats],
                [float(st["heldout-n"][0]) for st in stats],
            )
            zs.append(z_j)
            aucs.append(a_j)
        out["auc"], out["auc-z"] = aucs, zs
    if all("pre-forget-loss-sum" in st for st in stats):

        def total(key: str) -> float:
            return sum(float(st[key][0]) for st in stats)

        auc_z, auc = mann_whitney_z(
            [float(st["pre-auc"][0]) for st in stats],
            [float(st["forget-n"][0]) for st in stats],
            [float(st["heldout-n"][0]) for st in stats],
        )
        f, h = total("pre-forget-loss-sum") / fn, total("pre-heldout-loss-sum") / hn
        var_f = max(total("pre-forget-loss-sq") / fn - f * f, 0.0)
        var_h = max(total("pre-heldout-loss-sq") / hn - h * h, 0.0)
        fa = total("pre-forget-correct") / fn
        out["pre"] = {
            "forget-loss": f,
            "heldout-loss": h,
            "forget-acc": fa,
            "se": float(np.sqrt(var_f / fn + var_h / hn)),
            "auc": auc,
            "auc-z": auc_z,
        }
        if all("pre-heldout-correct" in st for st in stats):
            ha = total("pre-heldout-correct") / hn
            out["pre"]["heldout-acc"] = ha
            out["pre"]["acc-z"] = accuracy_z(fa, ha, fn, hn)
    return out


def unsupported_classes(
    remaining: Sequence[float], forget_class_n: Sequence[float], support_floor: float
) -> tuple[int, ...]:
    """The classes of the forget set the clients who stay (almost) do not hold.

    Class ``c`` is unsupported when the clients who stay hold fewer than ``support_floor``
    of the federation's samples of it: ``R_c < support_floor * (R_c + F_c)`` with ``R_c``
    their label count and ``F_c`` the forget set's. A model retrained without the departing
    clients has (almost) never seen such a class and does not predict it.
    ``support_floor = 0`` turns the rule off.

    Raises
    ------
    ValueError
        On counts that are negative or not finite, or a floor outside ``[0, 1)``.
    """
    if not (np.isfinite(support_floor) and 0 <= support_floor < 1):
        raise ValueError(f"the support floor must be in [0, 1), got {support_floor}")
    f = np.asarray(forget_class_n, np.float64)
    r = np.zeros_like(f)
    held = np.asarray(remaining, np.float64)[: len(f)]
    r[: len(held)] = held
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(f)) and np.all(r >= 0) and np.all(f >= 0)):
        raise ValueError("label counts must be finite and >= 0")
    return tuple(int(c) for c in np.flatnonzero((f > 0) & (r < support_floor * (r + f))))


def unsupported_accuracy(
    class_correct: Sequence[Sequence[float]], class_n: Sequence[float], classes: Sequence[int]
) -> list[float]:
    """Per scale, the accuracy on the forget samples of ``classes`` (the pooled per-class counts of :func:`pooled`)."""
    n = float(sum(float(class_n[c]) for c in classes))
    if n <= 0:
        raise ValueError("no forget sample of the unsupported classes")
    return [float(sum(float(row[c]) for c in classes)) / n for row in class_correct]


def summed_counts(counts: Sequence[Sequence[float]]) -> list[float]:
    """Per class, the sum of several clients' label counts (lists of any length; a missing class counts 0)."""
    width = max((len(c) for c in counts), default=0)
    return [float(sum(c[i] for c in counts if i < len(c))) for i in range(width)]


def with_unsupported(measured: dict[str, Any], classes: Sequence[int], class_n: Sequence[float]) -> None:
    """Add to pooled figures ``measured`` the accuracy on the forget samples of ``classes``: per scale
    (``unsupported-acc``) and, where measured, the pre-request model's (``pre["unsupported-acc"]``)."""
    if not classes:
        return
    if "class-correct" in measured:
        measured["unsupported-acc"] = unsupported_accuracy(measured["class-correct"], class_n, classes)
    if "pre-class-correct" in measured and "pre" in measured:
        measured["pre"]["unsupported-acc"] = unsupported_accuracy([measured["pre-class-correct"]], class_n, classes)[0]


def accuracy_z(forget_acc: float, heldout_acc: float, forget_n: float, heldout_n: float) -> float:
    """Two-proportion z statistic of the forget accuracy above the held-out one (pooled standard error)."""
    p = (forget_acc * forget_n + heldout_acc * heldout_n) / (forget_n + heldout_n)
    se = float(np.sqrt(p * (1 - p) * (1 / forget_n + 1 / heldout_n)))
    diff = forget_acc - heldout_acc
    return diff / se if se > 0 else (float("inf") if diff > 0 else 0.0)
