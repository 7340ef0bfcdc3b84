"""Conversions between Flower records and the library's named numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict


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


def with_content(msg: Message, content: RecordDict) -> Message:
    """``msg`` with other content and the same metadata (sender, reply-to, type): e.g. a reply with fewer records."""
    return Message(metadata=msg.metadata, content=content)  # type: ignore[call-overload]


def number(record: MetricRecord | Any, key: str) -> float:
    """A scalar of a record as ``float``.

    Raises
    ------
    ValueError
        If the key is missing or not a single number.
    """
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    return float(value)
