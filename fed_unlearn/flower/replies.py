"""Checking training replies against what the server sent, before any strategy aggregates them.

A reply is hostile until checked. What a stock Flower strategy aggregates passes: any real
dtype (an int64 BatchNorm counter for the float64 average FedAvg sent, float16, bfloat16),
0-dim arrays, fractional weights, extra ConfigRecords. Refused, costing only its node that
round: arrays whose names or shapes differ from the model sent, non-finite values (also
after the cast to the model's dtype: 1e300 is infinite as a float32), a weight that is not
a positive finite number. A weight above what the node declared is capped, and so is one
more than ``examples_growth`` times the largest the node claimed before (a sudden 10¹² claim).
A reply whose update is more than ``max_update_ratio`` times larger than the others' (their
median norm) is not used: finite values such as 1e38 would make the next model non-finite
on every client.

Consistency across replies (Flower raises ``InconsistentMessageReplies`` when metric keys
differ): a key set held by more than half of the replies is the round's; a reply without
it is that node's problem. Without such a majority the replies go to the strategy as they
are, and it decides as stock Flower does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from ..aggregation import ClientUpdate, InvalidUpdateError, conform_update, update_norm
from .records import array_records, metric_records, read_weights, remember_values, to_record, with_content


class StructureError(ValueError):
    """A reply whose records are not what a training reply is (stock Flower would refuse the whole round)."""


def examples_cap(declared: float | None, seen: float | None, growth: float | None) -> float | None:
    """The most examples a node may claim: what it declared, and ``growth`` times its largest claim so far."""
    caps = [c for c in (declared, seen * growth if seen is not None and growth is not None else None) if c]
    return min(caps) if caps else None


def update_outliers(norms: Mapping[int, float], ratio: float, *fallbacks: float | None) -> dict[int, str]:
    """Nodes whose update norm is more than ``ratio`` times the median of the other replies' norms.

    When the others did not move (or there are none), the comparison is with the first
    positive ``fallbacks`` (e.g. the last rounds' mean update norm, then the model's own
    norm). Returns node -> why its reply is not used.
    """
    out: dict[int, str] = {}
    for node, n in norms.items():
        others = [v for k, v in norms.items() if k != node]
        refs = [float(np.median(others))] if others else []
        ref = next((r for r in (*refs, *fallbacks) if r is not None and r > 0), None)
        if not np.isfinite(n):
            out[node] = "its update's norm is not finite"
        elif ref is not None and n > ratio * ref:
            out[node] = f"its update (norm {n:.3g}) is more than {ratio:g} times the others' ({ref:.3g})"
    return out


def weight_of(metrics: Mapping[str, Any], key: str) -> float:
    """The reply's weight ``metrics[key]``: a positive finite number.

    Raises
    ------
    InvalidUpdateError
        If it is missing, not a number (booleans and lists are not), not finite or not positive.
    """
    n = metrics.get(key)
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise InvalidUpdateError(f"'{key}' must be a positive number, got {n!r}")
    if not (np.isfinite(n) and n > 0):
        raise InvalidUpdateError(f"'{key}' must be a positive finite number, got {n!r}")
    return float(n) if isinstance(n, float) else n


@dataclass
class Checked:
    """One role of a checked reply.

    Attributes
    ----------
    message : Message
        What the wrapped strategy is given: the reply itself, or a copy whose arrays were
        cast to the model's dtypes / clipped, or whose weight was capped (other records kept).
    update : ClientUpdate
        The same, as named arrays (for the unlearning math).
    array_key, metric_key : str
        The names of the reply's ArrayRecord and MetricRecord.
    """

    message: Message
    update: ClientUpdate
    array_key: str
    metric_key: str
    modified: bool = False
    metric_keys: frozenset[str] = field(default_factory=frozenset)
    norm: float | None = None  # of the update against the reference, over the ``measured`` names


def check_role(
    reply: Message,
    array_key: str,
    metric_key: str,
    reference: Mapping[str, np.ndarray],
    weight_key: str,
    client_id: int,
    cap: float | None = None,
    clip: Any = None,
    keep_others: bool = True,
    measured: Sequence[str] = (),
    scratch: dict[str, np.ndarray] | None = None,
) -> tuple[Checked, list[str]]:
    """Check one (array record, metric record) pair of ``reply``; returns it and any notes (a capped weight).

    ``clip(weights, norm) -> weights or None`` bounds the update (``max_update_norm``). With
    ``measured`` names the update's norm against ``reference`` over them is computed once
    (it is also their finiteness check, :func:`~fed_unlearn.aggregation.conform_update`) and
    kept on the result. With
    ``keep_others`` the returned message keeps every other record of the reply. bfloat16
    arrays reach the strategy as float32 (numpy cannot average bfloat16).

    Raises
    ------
    InvalidUpdateError
        If the arrays or the weight are not acceptable (names the problem).
    """
    content = reply.content
    metrics = metric_records(content)[metric_key]
    n = weight_of(metrics, weight_key)
    notes: list[str] = []
    modified = False
    if cap is not None and n > cap:
        notes.append(f"claims {n} examples, more than the {cap} it declared: capped")
        n = cap
        metrics = MetricRecord({**dict(metrics), weight_key: n})
        modified = True
    record = array_records(content)[array_key]
    try:
        weights = read_weights(record)
    except Exception as exc:  # noqa: BLE001  (undecodable arrays are the client's fault, not the round's)
        raise InvalidUpdateError(f"its arrays cannot be read: {type(exc).__name__}: {exc}") from None
    weights, cast, norm = conform_update(weights, reference, "its update", measured, scratch)
    if clip is not None:
        clipped = clip(weights, norm)
        if clipped is not None:
            weights, cast = clipped, True
            norm = update_norm(weights, reference, measured) if measured else None
    bf16 = any(str(a.dtype) == "bfloat16" for a in record.values())
    if cast or bf16:
        record = to_record(weights)
        weights = read_weights(record)  # read-only views of the bytes the strategy gets
        modified = True
    # the strategy reads the values checked here instead of decoding the bytes again
    remember_values(record, weights)
    if modified or not keep_others:
        records: dict[str, Any] = dict(content.items()) if keep_others else {}
        records[array_key], records[metric_key] = record, metrics
        message = with_content(reply, RecordDict(records))
    else:
        message = reply
    update = ClientUpdate(client_id, weights, n, dict(metrics))
    return Checked(message, update, array_key, metric_key, modified, frozenset(metrics.keys()), norm), notes


def training_records(reply: Message) -> tuple[str, str]:
    """The one ArrayRecord and one MetricRecord of an ordinary training reply.

    Raises
    ------
    StructureError
        If the reply has another number of either.
    """
    arrays, metrics = array_records(reply.content), metric_records(reply.content)
    if len(arrays) != 1 or len(metrics) != 1:
        raise StructureError(
            f"a training reply needs exactly one ArrayRecord and one MetricRecord, got "
            f"{sorted(arrays)} and {sorted(metrics)}"
        )
    return next(iter(arrays)), next(iter(metrics))


def majority_keys(keysets: Sequence[frozenset[str]]) -> frozenset[str] | None:
    """The metric key set more than half of the replies have, or ``None`` when none has a majority."""
    if not keysets:
        return None
    keys, count = Counter(keysets).most_common(1)[0]
    return keys if 2 * count > len(keysets) else None


def harmonise(checked: Checked, keys: Sequence[str], means: Mapping[str, float]) -> Checked:
    """``checked`` with exactly the metric ``keys`` of the round's own replies.

    For a reply to one of this library's own messages (``train.retain`` after a deletion,
    where the helpers name metrics their own way): keys the others lack are dropped, keys it
    lacks take the others' weighted mean (which leaves every weighted mean unchanged).
    """
    metrics = dict(metric_records(checked.message.content)[checked.metric_key])
    values = {k: metrics[k] if k in metrics else means[k] for k in keys if k in metrics or k in means}
    record = MetricRecord(values)
    records = dict(checked.message.content.items())
    records[checked.metric_key] = record
    msg = with_content(checked.message, RecordDict(records))
    return Checked(msg, checked.update, checked.array_key, checked.metric_key, True, frozenset(values), checked.norm)


def weighted_means(checked: Sequence[Checked], weight_key: str) -> dict[str, float]:
    """Per scalar metric key, the weighted mean over the replies that have it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for c in checked:
        rec = metric_records(c.message.content)[c.metric_key]
        n = float(rec[weight_key])  # type: ignore[arg-type]
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = sums.get(k, 0.0) + n * float(v)
                weights[k] = weights.get(k, 0.0) + n
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
