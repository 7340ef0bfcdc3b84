"""Weights as named numpy arrays: validation, FedAvg, pseudo-gradients, update norms and steps.

A model is a ``dict[str, np.ndarray]`` keyed by state-dict names, the same keys the
Flower ``ArrayRecord`` of a torch ``state_dict`` carries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Weights = Mapping[str, np.ndarray]


class InvalidUpdateError(ValueError):
    """A client update that must not enter aggregation (NaN/inf, wrong names or shapes)."""


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply to a training round.

    Attributes
    ----------
    client_id : int
        The client's stable identifier (its partition id), not Flower's node id.
    weights : Mapping[str, np.ndarray]
        The client's locally trained model.
    num_examples : float
        The reply's FedAvg weight ``n_k`` (usually its training examples; any positive finite number).
    metrics : Mapping[str, Any]
        The reply's metrics (a method may read statistics its clients computed).
    """

    client_id: int
    weights: Weights
    num_examples: float
    metrics: Mapping[str, Any] = field(default_factory=dict)


#: Array-name endings of torch's BatchNorm buffers: statistics, not weights (never unlearned, never in a weight norm).
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_batchnorm_buffer(name: str) -> bool:
    """Whether ``name`` is a torch BatchNorm buffer (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    return name.rsplit(".", 1)[-1] in BATCHNORM_BUFFERS


#: numpy dtype kinds an update may carry: booleans, integers, floats (anything else is not a number).
NUMERIC_KINDS = ("b", "i", "u", "f")


def compatible_dtype(got: np.dtype, want: np.dtype) -> bool:
    """Whether an array of dtype ``got`` may stand for one of dtype ``want``.

    Both must be real numbers (bool, integer or float of any width: an int64 BatchNorm
    counter returned for the float64 one a FedAvg average sent, a float16 model): what a
    stock Flower strategy aggregates. Complex, text, object and raw-byte arrays are not.
    """
    return np.dtype(got).kind in NUMERIC_KINDS and np.dtype(want).kind in NUMERIC_KINDS


def validate_update(update: Weights, reference: Weights, source: str, finite: bool = True) -> None:
    """Check that ``update`` has exactly the reference's names and shapes, compatible dtypes and finite values.

    With ``finite=False`` the values are not looked at (a caller that proves them finite
    another way, e.g. by a finite norm).

    Raises
    ------
    InvalidUpdateError
        Naming ``source``, the offending array and the problem.
    """
    missing, extra = set(reference) - set(update), set(update) - set(reference)
    if missing or extra:
        raise InvalidUpdateError(
            f"{source}: update arrays do not match the global model "
            f"(missing {sorted(missing)}, unexpected {sorted(extra)})"
        )
    for name, ref in reference.items():
        arr = np.asarray(update[name])
        if arr.shape != np.shape(ref):
            raise InvalidUpdateError(f"{source}: array '{name}' has shape {arr.shape}, expected {np.shape(ref)}")
        if not compatible_dtype(arr.dtype, np.asarray(ref).dtype):
            raise InvalidUpdateError(
                f"{source}: array '{name}' has dtype {arr.dtype}, which is not a real number "
                f"(the model's is {np.asarray(ref).dtype})"
            )
        if finite:
            _check_finite(arr, name, source)


def _check_finite(arr: np.ndarray, name: str, source: str) -> None:
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InvalidUpdateError(f"{source}: array '{name}' contains {bad} NaN/inf values")


def conform_update(
    update: Weights,
    reference: Weights,
    source: str,
    measured: Sequence[str] = (),
    scratch: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], bool, float | None]:
    """:func:`validate_update`, floats wider than the reference's cast down to it; whether any was, and the norm.

    A reply never widens the global model's dtype (a float64 reply to a float32 model is
    cast to float32). Values are checked again after the cast: a finite float64 of 1e300 is
    infinite as a float32 and refused. Narrower floats (a float32 client of the float64
    model a server optimizer sends) and integer arrays (an int64 counter for the float64
    average FedAvg sent) are left as they are, as the strategy would get them.

    With ``measured`` names, the update's :func:`update_norm` against ``reference`` over them
    is returned too (else ``None``), and it doubles as their finiteness check: a finite sum of
    squared differences to a finite reference has only finite terms, so those arrays are
    scanned for NaN/inf only when the norm is not finite (to name the culprit). The norm can
    still be infinite for finite values whose squares overflow float64.

    Raises
    ------
    InvalidUpdateError
        As :func:`validate_update`, or when a value does not fit the model's dtype.
    """
    validate_update(update, reference, source, finite=False)
    out: dict[str, np.ndarray] = {}
    changed = False
    by_norm = set(measured)
    for name, ref in reference.items():
        arr, want = np.asarray(update[name]), np.asarray(ref).dtype
        narrower = arr.dtype.kind == "f" and want.kind == "f" and arr.dtype.itemsize > want.itemsize
        if name not in by_norm or narrower:  # before any cast: NaN in the reply is named as such
            _check_finite(arr, name, source)
        if narrower:
            with np.errstate(over="ignore"):
                arr = arr.astype(want)
            _check_finite(arr, name, f"{source} (as {want})")
            changed = True
        out[name] = arr
    if not measured:
        return out, changed, None
    norm = update_norm(out, reference, measured, scratch)
    if not np.isfinite(norm):
        for name in measured:
            _check_finite(np.asarray(update[name]), name, source)
    return out, changed, norm


def validate_updates(updates: Sequence[ClientUpdate], reference: Weights) -> None:
    """Validate every update against the global model, and its weight (a positive finite number)."""
    for u in updates:
        n = u.num_examples
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, float, np.integer, np.floating)):
            raise InvalidUpdateError(f"client {u.client_id}: num-examples must be a positive number, got {n!r}")
        if not (np.isfinite(n) and n > 0):
            raise InvalidUpdateError(f"client {u.client_id}: num-examples must be a positive number, got {n!r}")
        validate_update(u.weights, reference, f"client {u.client_id}")


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def weighted_sum(arrays: Sequence[Weights], coefs: Sequence[float], template: Weights) -> OrderedDict[str, np.ndarray]:
    """``sum_i coefs[i] * arrays[i]`` per name, accumulated in float64, cast to the template's dtypes."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, ref in template.items():
        acc = np.zeros(np.shape(ref), dtype=np.float64)
        term = np.empty_like(acc)
        for a, c in zip(arrays, coefs, strict=False):
            # the product computed in float64 into one reused buffer: the same sum, no temporaries
            np.multiply(a[name], c, out=term, dtype=np.float64)
            acc += term
        out[name] = acc.astype(np.asarray(ref).dtype)
    return out


def fedavg(updates: Sequence[ClientUpdate]) -> OrderedDict[str, np.ndarray]:
    """FedAvg (McMahan et al. 2017): ``sum_k (n_k / N) w_k`` with ``N = sum_k n_k``.

    Updates are summed in ``client_id`` order so the result does not depend on the
    order replies arrived in.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    ordered = sorted(updates, key=lambda u: u.client_id)
    total = float(sum(u.num_examples for u in ordered))
    return weighted_sum([u.weights for u in ordered], [u.num_examples / total for u in ordered], ordered[0].weights)


def pseudo_gradient(local: Weights, global_weights: Weights) -> OrderedDict[str, np.ndarray]:
    """``Delta = w_local - w_global`` per name (float64; non-float arrays give zeros)."""
    return OrderedDict(
        (k, (np.asarray(local[k], np.float64) - np.asarray(g, np.float64)) if _is_float(g) else np.zeros(np.shape(g)))
        for k, g in global_weights.items()
    )


def weighted_delta_sum(
    locals_: Sequence[Weights], coefs: Sequence[float], global_weights: Weights
) -> OrderedDict[str, np.ndarray]:
    """``sum_i coefs[i] * (locals_[i] - w)`` per name in float64, streamed.

    Equal to ``weighted_sum([pseudo_gradient(l, w) for l in locals_], coefs, ...)`` but holds one
    accumulator per array instead of every client's float64 pseudo-gradient at once (the
    unlearning round of a large federation). Non-float arrays give zeros.
    """
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, g in global_weights.items():
        acc = np.zeros(np.shape(g), dtype=np.float64)
        if _is_float(g):
            g64 = np.asarray(g, np.float64)
            for local, c in zip(locals_, coefs, strict=False):
                acc += c * (np.asarray(local[name], np.float64) - g64)
        out[name] = acc
    return out


def update_norm(
    weights: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    names: Sequence[str],
    scratch: dict[str, np.ndarray] | None = None,
) -> float:
    """L2 norm of ``weights - start`` over ``names``.

    Float32 pairs are differenced and dotted in float32 (a BLAS dot: what a bound or an
    outlier test needs, to about 1e-6 relative, at a twentieth of the cost of float64); any
    other pair in float64. ``scratch`` (name -> buffer, filled on first use) holds the float32
    differences between calls: one allocation per array for a whole round of replies, the
    same values and the same result.
    """
    total = 0.0
    for k in names:
        w, s = np.asarray(weights[k]), np.asarray(start[k])
        if w.dtype == np.float32 and s.dtype == np.float32:
            buf = scratch.get(k) if scratch is not None else None
            if buf is None or buf.shape != w.shape:
                buf = np.empty(w.shape, np.float32)
                if scratch is not None:
                    scratch[k] = buf
            with np.errstate(over="ignore", invalid="ignore"):
                np.subtract(w, s, out=buf)
                d = buf.reshape(-1)
                sq = float(np.dot(d, d))
            if np.isfinite(sq):
                total += sq
                continue
            # beyond float32's range (a hostile 1e38) or not finite: float64 tells which
        # one float64 temporary squared in place (an array even for 0-dim weights)
        e = np.array(w, dtype=np.float64)
        e -= np.asarray(s, dtype=np.float64)
        np.multiply(e, e, out=e)
        total += float(np.sum(e))
    return float(np.sqrt(total))


def mean_update_norm(
    updates: Sequence[ClientUpdate], start: Mapping[str, np.ndarray], names: Sequence[str]
) -> float | None:
    """Mean L2 norm of the updates' pseudo-gradients against ``start`` over ``names`` (``None`` without updates)."""
    if not updates:
        return None
    return float(np.mean([update_norm(u.weights, start, names) for u in updates]))


def clip_update(
    weights: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    bound: float,
    names: Sequence[str],
    norm: float | None = None,
) -> dict[str, np.ndarray] | None:
    """``start + (w - start) * min(1, bound / ||w - start||)`` on ``names``, or ``None`` when already within.

    ``norm`` is that norm when the caller has it already.
    """
    if norm is None:
        norm = update_norm(weights, start, names)
    if norm <= bound:
        return None
    scale = bound / norm
    moving = set(names)
    return {
        k: (
            (
                np.asarray(start[k], np.float64)
                + (np.asarray(w, np.float64) - np.asarray(start[k], np.float64)) * scale
            ).astype(np.asarray(w).dtype)
            if k in moving
            else w
        )
        for k, w in weights.items()
    }


def step_from(
    base: Mapping[str, np.ndarray], direction: Mapping[str, np.ndarray], scale: float, like: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``base + scale * direction`` in float64, cast to the dtypes of ``like``."""
    return {
        k: (np.asarray(base[k], np.float64) + scale * np.asarray(direction[k], np.float64)).astype(np.asarray(g).dtype)
        for k, g in like.items()
    }
