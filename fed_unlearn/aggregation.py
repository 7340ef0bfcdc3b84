"""Weights as named numpy arrays: validation, FedAvg and pseudo-gradients.

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
    num_examples : int
        Training examples behind the update (FedAvg weight ``n_k``).
    metrics : Mapping[str, Any]
        The reply's metrics (a method may read statistics its clients computed).
    """

    client_id: int
    weights: Weights
    num_examples: int
    metrics: Mapping[str, Any] = field(default_factory=dict)


def compatible_dtype(got: np.dtype, want: np.dtype) -> bool:
    """Whether an array of dtype ``got`` may stand for one of dtype ``want``.

    Floats must arrive as floats of at least 32 bits (a float32 client of a float64 global
    model is fine; int8, bool or float16 in place of float weights are not); any other
    dtype must match exactly.
    """
    if np.issubdtype(want, np.floating):
        return bool(np.issubdtype(got, np.floating) and np.dtype(got).itemsize >= 4)
    return bool(np.dtype(got) == np.dtype(want))


def validate_update(update: Weights, reference: Weights, source: str) -> None:
    """Check that ``update`` has exactly the reference's names and shapes, compatible dtypes and finite values.

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
                f"{source}: array '{name}' has dtype {arr.dtype}, expected {np.asarray(ref).dtype}"
            )
        if np.issubdtype(arr.dtype, np.number) and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise InvalidUpdateError(f"{source}: array '{name}' contains {bad} NaN/inf values")


def validate_updates(updates: Sequence[ClientUpdate], reference: Weights) -> None:
    """Validate every update against the global model, and its example count."""
    for u in updates:
        if not (isinstance(u.num_examples, (int, np.integer)) and u.num_examples > 0):
            raise InvalidUpdateError(
                f"client {u.client_id}: num-examples must be a positive integer, got {u.num_examples!r}"
            )
        validate_update(u.weights, reference, f"client {u.client_id}")


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def weighted_sum(arrays: Sequence[Weights], coefs: Sequence[float], template: Weights) -> OrderedDict[str, np.ndarray]:
    """``sum_i coefs[i] * arrays[i]`` per name, accumulated in float64, cast to the template's dtypes."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, ref in template.items():
        acc = np.zeros(np.shape(ref), dtype=np.float64)
        for a, c in zip(arrays, coefs, strict=False):
            acc += c * np.asarray(a[name], dtype=np.float64)
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
