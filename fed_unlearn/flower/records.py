"""Conversions between Flower records and the library's named numpy arrays."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord


def to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ``{name: ndarray}``.

    ``Array.numpy()`` deserialises into a fresh array every call, so the result never
    aliases the record (no second copy needed).
    """
    return {name: arr.numpy() for name, arr in record.items()}


def to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{name: ndarray}`` -> ArrayRecord, keeping the names."""
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(w)) for name, w in weights.items()})


def metric_dict(record: MetricRecord) -> dict[str, float]:
    """MetricRecord -> plain dict (scalars only)."""
    return {k: v for k, v in record.items() if not isinstance(v, list)}
