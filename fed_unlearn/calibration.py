"""Gold-free calibration of how far to unlearn: the scale of the unlearning step.

A method's unlearning round produces ``w_new``; the model the remaining clients alone would
give is ``base`` (their FedAvg step, or the unchanged model when they did not train), and the
unlearning step is ``d = w_new - base``. Calibration searches ``w(c) = base + c d`` for
``c`` in ``[0, 1]``: the forgetting clients evaluate the candidates on their own forget set
and their own held-out data (nothing else leaves them: sums and counts), and the server
picks the smallest ``c`` at which the forget set looks like data the model never saw — what
a model retrained without it shows. When nothing was memorised that is ``c = 0``: no step
beyond dropping the data. The gold model is never consulted.

What "looks like unseen data" means depends on what is deleted (:func:`target_for`):

* ``loss-match`` (a whole client, random samples, hard samples): the mean loss on the forget
  set reaches the mean loss on held-out samples like them (same classes; for hard samples,
  the held-out samples the same selection rule ranks highest);
* ``accuracy-floor`` (a class): the model no longer predicts the class on its samples —
  accuracy on the forget set at or below ``floor`` (a retrained model never saw the class
  and never predicts it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TARGETS = ("loss-match", "accuracy-floor")
#: The default candidate scales (fractions of the method's own step; never more than it).
DEFAULT_SCALES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def target_for(scenario: str) -> str:
    """The calibration target of a deletion scenario (``client``, ``samples`` or ``class``)."""
    return "accuracy-floor" if scenario == "class" else "loss-match"


@dataclass(frozen=True)
class Calibration:
    """The outcome of a calibration.

    Attributes
    ----------
    scale : float
        The chosen ``c`` (interpolated between the evaluated candidates).
    reached : bool
        Whether the target is reached within ``[0, 1]`` (``False``: ``c = 1``, the method's full step).
    target : str
        ``loss-match`` or ``accuracy-floor``.
    gaps : tuple of float
        Per candidate: forget loss minus held-out loss (``loss-match``) or forget accuracy
        minus the floor (``accuracy-floor``); the target is ``gap >= 0`` resp. ``gap <= 0``.
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
) -> Calibration:
    """The smallest scale reaching the target, linearly interpolated between candidates.

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
        gap = np.asarray(forget_loss, np.float64) - np.asarray(heldout_loss, np.float64)  # target: gap >= 0
    else:
        gap = floor - np.asarray(forget_acc, np.float64)  # target: accuracy <= floor, i.e. gap >= 0
    if gap.shape != s.shape or not np.all(np.isfinite(gap)):
        raise ValueError("calibration needs one finite measurement per scale")
    shown = tuple(float(g) if target == "loss-match" else float(-g) for g in gap)
    hit = np.flatnonzero(gap >= 0)
    if not len(hit):
        return Calibration(float(s[-1]), False, target, shown)
    i = int(hit[0])
    if i == 0:
        return Calibration(0.0, True, target, shown)
    # the gap crosses zero between candidates i-1 and i
    frac = float(-gap[i - 1] / (gap[i] - gap[i - 1]))
    return Calibration(float(s[i - 1] + frac * (s[i] - s[i - 1])), True, target, shown)


def pooled(stats: Sequence[dict[str, Sequence[float]]]) -> dict[str, list[float]]:
    """Pool several clients' per-scale sums into means: ``forget-loss``, ``heldout-loss``, ``forget-acc``.

    Each entry holds per-scale lists ``forget-loss-sum``, ``forget-correct``, ``heldout-loss-sum``
    and the counts ``forget-n``, ``heldout-n``.
    """
    fn = sum(float(st["forget-n"][0]) for st in stats)
    hn = sum(float(st["heldout-n"][0]) for st in stats)
    if fn <= 0 or hn <= 0:
        raise ValueError("calibration needs forget and held-out samples")
    k = len(stats[0]["forget-loss-sum"])
    out: dict[str, list[float]] = {"forget-loss": [], "heldout-loss": [], "forget-acc": []}
    for j in range(k):
        out["forget-loss"].append(sum(float(st["forget-loss-sum"][j]) for st in stats) / fn)
        out["heldout-loss"].append(sum(float(st["heldout-loss-sum"][j]) for st in stats) / hn)
        out["forget-acc"].append(sum(float(st["forget-correct"][j]) for st in stats) / fn)
    return out
