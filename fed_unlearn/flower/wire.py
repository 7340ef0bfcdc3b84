"""Encoders and decoders of the query messages: one of each, shared by the client helpers and the server.

:mod:`fed_unlearn.protocol` names every record and key; this module is the only place that
builds or reads the records of ``query.identify``, ``query.info``, ``query.forget``,
``query.relearn``, ``query.calibrate`` and ``query.support``, so the client side
(:mod:`fed_unlearn.flower.client`) and the server side (the strategy's identification and
deletion request, the project's ServerApp) cannot drift apart. A decoder reads a reply
from a node as hostile: a missing record or key raises ``KeyError``, a value of the wrong
kind ``TypeError`` or ``ValueError``; the caller turns that into one line about the node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .. import protocol as P
from ..deletion import DeletionRequest
from .records import number


def as_int(value: Any) -> int:
    """An integer a node sent (a whole number, or a string of one); anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(value)


# -- query.identify -------------------------------------------------------------------------
def identify_request(keys: Sequence[str]) -> RecordDict:
    """``query.identify``: the node-config keys the server asks for."""
    return RecordDict({P.CONFIG_RECORD: ConfigRecord({P.KEYS: [str(k) for k in keys]})})


def read_identify_request(config: Mapping[str, Any]) -> list[str]:
    """The node-config keys a ``query.identify`` asks for."""
    keys = config.get(P.KEYS, [])
    return [str(k) for k in keys] if isinstance(keys, list) else []


def identify_reply(identity: Mapping[str, Any], capabilities: Mapping[str, Any] | None = None) -> RecordDict:
    """The ``query.identify`` reply: the asked keys the node's config has, and what the node can do."""
    records: dict[str, Any] = {P.IDENTITY_RECORD: ConfigRecord(dict(identity))}
    if capabilities is not None:
        records[P.CAPABILITIES_RECORD] = ConfigRecord(dict(capabilities))
    return RecordDict(records)


def read_identify_reply(content: RecordDict) -> tuple[dict[str, Any], dict[str, Any]]:
    """A node's identity and capabilities (``{}`` without the record: a hand-written handler).

    Raises ``KeyError`` without an identity record.
    """
    records = content.config_records
    if P.IDENTITY_RECORD not in records:
        raise KeyError(f"its {P.IDENTIFY} reply has no '{P.IDENTITY_RECORD}' ConfigRecord")
    caps = dict(records[P.CAPABILITIES_RECORD]) if P.CAPABILITIES_RECORD in records else {}
    return dict(records[P.IDENTITY_RECORD]), caps


def handlers_of(capabilities: Mapping[str, Any]) -> list[str]:
    """The message types a node said it answers (none when it did not say, or said it wrongly)."""
    handlers = capabilities.get(P.HANDLERS, [])
    return [str(h) for h in handlers] if isinstance(handlers, list) else []


# -- query.info ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeData:
    """What a node's ``query.info`` reply says about its data and model."""

    train_n: int
    heldout_n: int
    num_classes: int
    input_shape: tuple[int, ...]
    #: ``"ok"``, or what does not match when the node was sent a model to check.
    architecture: str = "ok"


def info_reply(data: NodeData) -> RecordDict:
    """The ``query.info`` reply's records."""
    metrics = MetricRecord(
        {
            P.TRAIN_N: data.train_n,
            P.HELDOUT_N: data.heldout_n,
            P.NUM_CLASSES: data.num_classes,
            P.INPUT_SHAPE: [int(s) for s in data.input_shape],
        }
    )
    return RecordDict({P.INFO_RECORD: metrics, P.CHECK_RECORD: ConfigRecord({P.ARCHITECTURE: data.architecture})})


def read_info_reply(content: RecordDict) -> NodeData:
    """A node's ``query.info`` reply (``KeyError`` / ``TypeError`` / ``ValueError`` when malformed)."""
    m = content.metric_records[P.INFO_RECORD]
    checks = content.config_records
    arch = str(checks[P.CHECK_RECORD].get(P.ARCHITECTURE, "ok")) if P.CHECK_RECORD in checks else "ok"
    shape = m[P.INPUT_SHAPE]
    if not isinstance(shape, list):
        raise TypeError(f"{P.INPUT_SHAPE} must be a list, got {type(shape).__name__}")
    return NodeData(
        train_n=as_int(m[P.TRAIN_N]),
        heldout_n=as_int(m[P.HELDOUT_N]),
        num_classes=as_int(m[P.NUM_CLASSES]),
        input_shape=tuple(as_int(s) for s in shape),
        architecture=arch,
    )


# -- query.forget ----------------------------------------------------------------------------
def forget_request(deletion: DeletionRequest, seed: int | None = None) -> ConfigRecord:
    """The deletion request's config (``seed``: the selection's seed; the node's run config otherwise)."""
    values: dict[str, Any] = {
        P.SCENARIO: deletion.scenario,
        P.SELECTION: deletion.selection,
        P.FRACTION: deletion.fraction,
        P.FORGET_CLASS: deletion.forget_class,
    }
    if seed is not None:
        values[P.SEED] = int(seed)
    return ConfigRecord(values)


def read_forget_request(config: Mapping[str, Any]) -> tuple[DeletionRequest, int | None]:
    """The deletion request a node was sent, and the selection's seed if the server gave one."""
    request = DeletionRequest(
        scenario=str(config.get(P.SCENARIO, "client")),
        selection=str(config.get(P.SELECTION, "random")),
        fraction=number(config, P.FRACTION) if P.FRACTION in config else 0.1,
        forget_class=as_int(config.get(P.FORGET_CLASS, 0)),
    )
    seed = config.get(P.SEED)
    return request, (None if seed is None else as_int(seed))


def forget_reply(forget_n: int, retain_n: int, digest: str) -> RecordDict:
    """The ``query.forget`` reply: counts and the digest of the node's selection (never the samples)."""
    return RecordDict(
        {
            P.METRICS_RECORD: MetricRecord({P.FORGET_N: int(forget_n), P.RETAIN_N: int(retain_n)}),
            P.RECEIPT_RECORD: ConfigRecord({P.DIGEST: digest}),
        }
    )


def read_forget_reply(content: RecordDict) -> dict[str, Any]:
    """A node's receipt: ``{"forget-n", "retain-n", "digest"}`` (``KeyError`` / ``TypeError`` when malformed)."""
    m = content.metric_records[P.METRICS_RECORD]
    digest = content.config_records[P.RECEIPT_RECORD][P.DIGEST]
    if not isinstance(digest, str):
        raise TypeError(f"{P.DIGEST} must be text, got {type(digest).__name__}")
    forget_n, retain_n = as_int(m[P.FORGET_N]), as_int(m[P.RETAIN_N])
    if forget_n < 0 or retain_n < 0:
        raise ValueError(f"negative counts ({P.FORGET_N} {forget_n}, {P.RETAIN_N} {retain_n})")
    return {P.FORGET_N: forget_n, P.RETAIN_N: retain_n, P.DIGEST: digest}


# -- query.relearn ---------------------------------------------------------------------------
def relearn_request(target_accuracy: float, max_steps: int) -> ConfigRecord:
    """The relearn probe's config: SGD on the forget set until ``target_accuracy`` or ``max_steps``."""
    return ConfigRecord({P.TARGET_ACCURACY: float(target_accuracy), P.MAX_STEPS: int(max_steps)})


def read_relearn_request(config: Mapping[str, Any]) -> tuple[float, int]:
    """The relearn probe's target accuracy and step limit."""
    return number(config, P.TARGET_ACCURACY), as_int(config[P.MAX_STEPS])


def relearn_reply(steps: int, reached: bool, start_accuracy: float, final_accuracy: float) -> RecordDict:
    """The relearn probe's reply."""
    return RecordDict(
        {
            P.METRICS_RECORD: MetricRecord(
                {
                    P.RELEARN_STEPS: steps,
                    P.RELEARN_REACHED: int(reached),
                    P.RELEARN_START_ACC: start_accuracy,
                    P.RELEARN_FINAL_ACC: final_accuracy,
                }
            )
        }
    )


def read_relearn_reply(content: RecordDict) -> tuple[float, bool]:
    """A node's relearn steps and whether it reached the target."""
    m = content.metric_records[P.METRICS_RECORD]
    return number(m, P.RELEARN_STEPS), bool(as_int(m[P.RELEARN_REACHED]))


__all__ = [
    "NodeData",
    "handlers_of",
    "identify_reply",
    "identify_request",
    "read_identify_reply",
    "read_identify_request",
    "forget_reply",
    "forget_request",
    "info_reply",
    "read_forget_reply",
    "read_forget_request",
    "read_info_reply",
    "read_relearn_reply",
    "read_relearn_request",
    "relearn_reply",
    "read_support_reply",
    "support_reply",
    "support_request",
]


# -- query.calibrate ------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrateRequest:
    """What a forgetting client is asked to measure: ``base + c * direction`` for each scale ``c``."""

    base: ArrayRecord
    direction: ArrayRecord
    scales: tuple[float, ...]
    #: The pre-request model, for the memorisation test (absent when it was already decided).
    pre_request: ArrayRecord | None = None


def calibrate_request(request: CalibrateRequest, config: Mapping[str, Any]) -> RecordDict:
    """``query.calibrate``: the candidates' base and direction, the scales, and the config the client reads."""
    records: dict[str, Any] = {
        P.BASE_RECORD: request.base,
        P.DIRECTION_RECORD: request.direction,
        P.CONFIG_RECORD: ConfigRecord({**dict(config), P.SCALES: [float(c) for c in request.scales]}),
    }
    if request.pre_request is not None:
        records[P.PRE_REQUEST_RECORD] = request.pre_request
    return RecordDict(records)


def read_calibrate_request(content: RecordDict) -> CalibrateRequest:
    """The candidates a ``query.calibrate`` asks about (``KeyError`` without base or direction)."""
    arrays = content.array_records
    config = content.config_records.get(P.CONFIG_RECORD, ConfigRecord())
    scales = config.get(P.SCALES, [])
    return CalibrateRequest(
        arrays[P.BASE_RECORD],
        arrays[P.DIRECTION_RECORD],
        tuple(float(c) for c in scales) if isinstance(scales, list) else (),
        arrays.get(P.PRE_REQUEST_RECORD),
    )


def calibrate_reply(stats: Mapping[str, Sequence[float]]) -> RecordDict:
    """The ``query.calibrate`` reply: :func:`fed_unlearn.calibration.client_stats` (sums and counts)."""
    return RecordDict({P.CALIBRATION_RECORD: MetricRecord({k: [float(v) for v in vs] for k, vs in stats.items()})})


def read_calibrate_reply(content: RecordDict) -> dict[str, Any]:
    """A forgetting client's measurements (``KeyError`` without the record; the values are checked when pooled)."""
    records = content.metric_records
    if P.CALIBRATION_RECORD not in records:
        raise KeyError(f"its {P.CALIBRATE} reply has no '{P.CALIBRATION_RECORD}' MetricRecord")
    return dict(records[P.CALIBRATION_RECORD])


# -- query.support --------------------------------------------------------------------------
#: The most classes a ``query.support`` reply may count (a longer list is refused as hostile).
MAX_CLASSES = 100_000


def support_request(config: Mapping[str, Any]) -> RecordDict:
    """``query.support``: nothing but the config (the server round)."""
    return RecordDict({P.CONFIG_RECORD: ConfigRecord(dict(config))})


def support_reply(labels: Sequence[int] | np.ndarray, num_classes: int = 0) -> RecordDict:
    """The ``query.support`` reply: how many of the client's training samples have each label (counts only)."""
    counts = np.bincount(np.asarray(labels, np.int64).ravel(), minlength=int(num_classes))
    return RecordDict({P.SUPPORT_RECORD: MetricRecord({P.LABEL_COUNTS: [int(c) for c in counts]})})


def read_support_reply(content: RecordDict, at_most: float | None = None) -> list[float]:
    """A client's label counts (``KeyError`` without them; ``ValueError`` unless whole numbers >= 0, at most
    :data:`MAX_CLASSES` of them, adding up to no more than ``at_most`` samples — what the client declared)."""
    records = content.metric_records
    if P.SUPPORT_RECORD not in records:
        raise KeyError(f"its {P.SUPPORT} reply has no '{P.SUPPORT_RECORD}' MetricRecord")
    counts = records[P.SUPPORT_RECORD][P.LABEL_COUNTS]
    if not isinstance(counts, list) or len(counts) > MAX_CLASSES:
        raise ValueError(f"'{P.LABEL_COUNTS}' must be a list of at most {MAX_CLASSES} counts")
    out = [float(as_int(c)) for c in counts]
    if any(c < 0 for c in out):
        raise ValueError(f"'{P.LABEL_COUNTS}' must be counts >= 0")
    if at_most is not None and sum(out) > at_most:  # labels it cannot hold: hostile
        raise ValueError(f"counts {sum(out):g} labels, more than the {at_most:g} examples it declared")
    return out
