"""The reply-checking part of the strategy: every training reply checked before any aggregation.

What is checked is :mod:`fed_unlearn.flower.replies` (pure functions); this mixin applies it
to a round: which records a node was asked for, strikes and exclusion after ``max_strikes``
bad replies, the round's metric keys, outlying updates, and the round's cost roll-up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.common import log

from .. import protocol as P
from ..aggregation import InvalidUpdateError, clip_update, update_norm
from .records import array_records, metric_records
from .replies import (
    Checked,
    StructureError,
    check_role,
    examples_cap,
    harmonise,
    majority_keys,
    training_records,
    update_outliers,
    weighted_means,
)
from .requests import client_failure


class CheckedReply:
    """A checked reply, split by role (the retained-data and the forget-set update)."""

    __slots__ = ("node", "retain", "forget", "own")

    def __init__(self, node: int, own: bool) -> None:
        self.node = node
        self.retain: Checked | None = None
        self.forget: Checked | None = None
        self.own = own  # a reply to the wrapped strategy's own message type


class ReplyIntake:
    """The reply-checking part of :class:`~fed_unlearn.flower.Unlearning` (state lives on the strategy)."""

    max_strikes: int
    max_update_norm: float | None
    max_update_ratio: float | None
    examples_growth: float | None
    reproducible: bool
    current_round: int
    last_update_norm: float | None
    last_round_problems: dict[int, str]
    strikes: Counter[int]
    excluded: set[int]
    declared: dict[int, float]
    claimed: dict[int, float]
    _norms: dict[int, float]
    _scratch: dict[str, np.ndarray]  # float32 buffers the round's update norms reuse
    _global: dict[str, np.ndarray] | None
    _moving: list[str]
    _asked: dict[int, dict[str, str]]
    _sent: dict[int, Message]
    _own_type: str

    if TYPE_CHECKING:  # provided by the strategy this mixin is part of

        def client_id(self, node_id: int) -> int: ...

        def _weight_key(self) -> str: ...

    def _check(self, reply: Message) -> tuple[CheckedReply | None, str | None, bool]:
        """Check one reply against what its node was asked; returns the roles, the problem, whether it is structural."""
        node = reply.metadata.src_node_id
        asked = self._asked.get(node)
        if asked is None:
            return None, "a reply to an instruction it was not sent this round", False
        if reply.has_error():
            return None, f"failed: {client_failure(reply.error.reason or '')}", False
        if self._global is None:
            return None, "no round in progress", False
        sent = self._sent.get(node)
        out = CheckedReply(node, own=sent is not None and sent.metadata.message_type == self._own_type)
        content = reply.content
        arrays, metrics = array_records(content), metric_records(content)
        if "*" in asked:  # a plain training reply: one ArrayRecord, one MetricRecord
            try:
                akey, mkey = training_records(reply)
            except StructureError as exc:
                return None, str(exc), True
            roles = {asked["*"]: (akey, mkey)}
        else:
            metric_of = {a: m for a, m in P.ROLE_KEYS.values()}
            expected = set(asked) | {metric_of[a] for a in asked}
            got = set(arrays) | set(metrics)
            if got != expected:
                return (
                    None,
                    f"a {P.TRAIN_UNLEARN} reply needs exactly the records {sorted(expected)}, got {sorted(got)}",
                    False,
                )
            roles = {role: (akey, metric_of[akey]) for akey, role in asked.items()}
        weight_key = self._weight_key()
        moving = self._moving

        def clip(w: Mapping[str, np.ndarray], norm: float | None) -> dict[str, np.ndarray] | None:
            if self.max_update_norm is None or self._global is None:
                return None
            return clip_update(w, self._global, self.max_update_norm, moving, norm)

        for role, (akey, mkey) in roles.items():
            if mkey not in metrics or akey not in arrays:
                return None, f"its reply lacks the records '{akey}' / '{mkey}'", True
            try:
                checked, notes = check_role(
                    reply, akey, mkey, self._global, weight_key, self.client_id(node),
                    examples_cap(self.declared.get(node), self.claimed.get(node), self.examples_growth),
                    clip, keep_others="*" in asked, measured=moving, scratch=self._scratch,
                )  # fmt: skip
            except InvalidUpdateError as exc:
                return None, str(exc), False
            for note in notes:
                log(WARNING, "node %s %s", node, note)
            if role == "retain":
                out.retain = checked
            else:
                out.forget = checked
        return out, None, False

    def _strike(self, node: int, problem: str) -> None:
        self.strikes[node] += 1
        log(
            WARNING,
            "round %s: the reply of node %s is not used: %s (strike %d of %s)",
            self.current_round,
            node,
            problem,
            self.strikes[node],
            self.max_strikes or "unlimited",
        )
        if self.max_strikes and self.strikes[node] >= self.max_strikes and node not in self.excluded:
            self.excluded.add(node)
            log(WARNING, "node %s is excluded from the federation after %d invalid replies", node, self.strikes[node])

    def _collect(self, replies: Sequence[Message]) -> tuple[list[CheckedReply], bool]:
        """Checked replies (arrival order, or client order with ``reproducible``); whether to hand all over unchecked.

        When no reply is usable and every one failed on its structure (the app's own reply
        format, e.g. two ArrayRecords), the wrapped strategy gets them as they are and
        decides as stock Flower does.
        """
        parsed: list[CheckedReply] = []
        self.last_round_problems = {}
        structural: list[tuple[int, str]] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            p, problem, is_structure = self._check(reply)
            if p is None:
                self.last_round_problems[node] = problem or "invalid"
                if is_structure:
                    structural.append((node, problem or "invalid"))
                elif problem and not problem.startswith("failed"):
                    self._strike(node, problem)
                else:
                    log(WARNING, "round %s: node %s %s", self.current_round, node, problem)
                continue
            self.last_round_problems[node] = "ok"
            parsed.append(p)
        if not parsed and structural and len(structural) == len([r for r in replies if not r.has_error()]):
            return [], True
        for node, problem in structural:
            self._strike(node, problem)
        # metric keys: the majority key set among the replies to the strategy's own messages is the round's
        own = [p.retain for p in parsed if p.own and p.retain is not None]
        keys = majority_keys([c.metric_keys for c in own])
        if keys is not None:
            for p in list(parsed):
                if p.own and p.retain is not None and p.retain.metric_keys != keys:
                    problem = f"its metric keys {sorted(p.retain.metric_keys)} differ from the round's {sorted(keys)}"
                    self.last_round_problems[p.node] = problem
                    self._strike(p.node, problem)
                    parsed.remove(p)
            odd = [p for p in parsed if not p.own and p.retain is not None and p.retain.metric_keys != keys]
            if odd:
                holders = [c for c in own if c.metric_keys == keys]
                ordered = list(holders[0].update.metrics)
                means = weighted_means(holders, self._weight_key())
                for p in odd:
                    if p.retain is not None:
                        p.retain = harmonise(p.retain, ordered, means)
        self._drop_outliers(parsed)
        for p in parsed:
            if p.retain is not None:
                self.claimed[p.node] = max(self.claimed.get(p.node, 0.0), float(p.retain.update.num_examples))
        if self.reproducible:
            parsed.sort(key=lambda p: (self.client_id(p.node), p.node))
        return parsed, False

    def _drop_outliers(self, parsed: list[CheckedReply]) -> None:
        """Strike the replies whose update dwarfs the others' (:func:`update_outliers`); keeps the round's norms."""
        g = self._global
        self._norms = {
            p.node: update_norm(p.retain.update.weights, g, self._moving) if p.retain.norm is None else p.retain.norm
            for p in parsed
            if p.retain is not None and g is not None
        }
        if self.max_update_ratio is None:
            return
        still = len(self._norms) < 3 or float(np.median(list(self._norms.values()))) == 0.0
        size = update_norm(g, {k: np.zeros_like(v) for k, v in g.items()}, self._moving) if g and still else None
        for node, problem in update_outliers(self._norms, self.max_update_ratio, self.last_update_norm, size).items():
            self.last_round_problems[node] = problem
            self._strike(node, problem)
            parsed[:] = [p for p in parsed if p.node != node]
            del self._norms[node]

    def _rollup(self, parsed: Sequence[CheckedReply]) -> MetricRecord:
        """The round's cost over every role's valid reply: clients, weights, and the steps and seconds reported."""
        ms = [c.update.metrics for p in parsed for c in (p.retain, p.forget) if c is not None]
        weight_key = self._weight_key()
        total = sum(float(m.get(weight_key, 0)) for m in ms)
        out: dict[str, Any] = {
            "clients": len(parsed),
            "total-examples": int(total) if float(total).is_integer() else total,
        }
        if any("train-steps" in m for m in ms):
            out["total-train-steps"] = int(sum(float(m.get("train-steps", 0)) for m in ms))
        if any("train-seconds" in m for m in ms):
            out["total-train-seconds"] = float(sum(float(m.get("train-seconds", 0.0)) for m in ms))
        return MetricRecord(out)
