"""The composing part of the strategy: how a round's checked replies reach the wrapped strategy.

An ordinary round hands the wrapped strategy the checked replies of the nodes still in the
federation. An unlearning round runs the method's rule on them, carries the arrays that are
not weights, bounds and scales the step (:mod:`fed_unlearn.flower.stepping`), and lets the
result enter the wrapped strategy's own aggregation (:mod:`fed_unlearn.flower.inner`): as
synthetic replies of a weighted mean, as a correction added to a robust aggregate, or as
the model itself. Under differential privacy the step is clipped like one client's update.
The per-layer diagnostics of the unlearning round are recorded here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from ..aggregation import ClientUpdate, fedavg, validate_update
from ..spectral import analyze, motion_share
from ..unlearning import UnlearningMethod
from . import inner as I
from .intake import CheckedReply, ReplyIntake
from .records import array_view, read_weights, to_record, with_content
from .replies import Checked, weighted_means
from .stepping import StepControl


def finite(arrays: ArrayRecord) -> bool:
    """Whether every floating-point value of ``arrays`` is finite."""
    values = read_weights(arrays).values()
    return all(bool(np.isfinite(a).all()) for a in values if np.issubdtype(a.dtype, np.inexact))


@dataclass(slots=True)
class RoundPlan:
    """What a round hands the wrapped strategy.

    ``messages`` to aggregate (checked replies, plus synthetic ones in a mean-composed
    unlearning round); or ``direct``: the round's model as it is (the wrapped strategy's
    aggregation is still run for its metrics when ``direct_metrics_only``); or
    ``unchecked``: the raw replies, for the strategy to judge. ``correction`` is added to
    the strategy's aggregate (additive composition); ``recode`` writes the aggregate back
    in the round's dtypes (bfloat16).
    """

    messages: list[Message] = field(default_factory=list)
    direct: ArrayRecord | None = None
    direct_metrics_only: bool = False
    unchecked: list[Message] | None = None
    correction: dict[str, np.ndarray] | None = None
    rollup: MetricRecord | None = None
    recode: bool = False
    unlearning: bool = False
    dp: dict[str, Any] | None = None


class Composition(ReplyIntake, StepControl):
    """The composing part of :class:`~fed_unlearn.flower.Unlearning` (state lives on the strategy)."""

    #: Whether the strategy aggregates through FedAvg's own rule (the synthetic replies reach it).
    _mean_rule = False
    strategy: Strategy
    method: UnlearningMethod | None
    on_missing: str
    diagnostics: bool
    calibrate: bool
    reset_server_momentum: bool
    pending: tuple[int, ...]
    failed: tuple[int, ...]
    departed: set[int]
    retain_only: set[int]
    unlearning_rounds_run: int
    unlearning_report: dict[str, Any] | None
    _method: UnlearningMethod | None
    _round_start: dict[str, np.ndarray] | None
    _unlearn_start: dict[str, np.ndarray] | None

    if TYPE_CHECKING:  # provided by the strategy this mixin is part of

        def cancel(self) -> tuple[int, ...]: ...

        def is_unlearning_round(self, server_round: int) -> bool: ...

        def _keys(self) -> tuple[str, str, str]: ...

        def _record(self, weights: Mapping[str, np.ndarray]) -> ArrayRecord: ...

        def _dp(self) -> tuple[Strategy | None, str | None]: ...

        def _composition(self) -> str: ...

    def _add(self, arrays: ArrayRecord, correction: Mapping[str, np.ndarray]) -> ArrayRecord:
        """The wrapped strategy's aggregate plus the unlearning correction, in the aggregate's dtypes."""
        got = read_weights(arrays)
        return to_record(
            {
                k: (np.asarray(v, np.float64) + np.asarray(correction[k], np.float64)).astype(v.dtype)
                if k in correction
                else v
                for k, v in got.items()
            }
        )

    def _recode(self, arrays: ArrayRecord) -> ArrayRecord:
        """The wrapped strategy's aggregate with the round's bfloat16 arrays written as bfloat16 again.

        Strategies average bfloat16 replies as float32 (numpy has no bfloat16); every other
        array stays as the strategy returned it.
        """
        bf16 = [k for k, v in self._wire.items() if v == "bfloat16" and k in arrays]
        if not bf16:
            return arrays
        out = dict(arrays.items())
        recoded = to_record({k: array_view(arrays[k]) for k in bf16}, self._wire)
        out.update(recoded.items())
        return ArrayRecord(array_dict=out)

    def _plan(self, server_round: int, replies: list[Message]) -> RoundPlan:
        """What goes to the wrapped strategy this round (see :class:`RoundPlan`)."""
        parsed, unchecked = self._collect(replies)
        rollup = self._rollup(parsed)
        if unchecked:
            return RoundPlan(unchecked=replies, rollup=rollup)
        bf16 = any(v == "bfloat16" for v in self._wire.values())
        retain = [p.retain for p in parsed if p.retain is not None and p.node not in self.departed]
        retain_updates = [c.update for c in retain]
        retain_msgs = [c.message for c in retain]
        if not self.is_unlearning_round(server_round):
            if not retain:
                log(WARNING, "aggregate_train: no valid replies in round %s; global model unchanged", server_round)
                return RoundPlan(rollup=rollup)
            if self.method is not None and self._round_start is not None:
                self.method.observe(server_round, self._round_start, retain_updates)
            if self._global is not None:
                kept = [self._norms[p.node] for p in parsed if p.node in self._norms and p.node not in self.departed]
                self.last_update_norm = float(np.mean(kept)) if kept else None
            return RoundPlan(messages=retain_msgs, rollup=rollup, recode=bf16)
        return self._plan_unlearning(server_round, parsed, retain, rollup)

    def _plan_unlearning(
        self, server_round: int, parsed: list[CheckedReply], retain: list[Checked], rollup: MetricRecord
    ) -> RoundPlan:
        method, start = self._method, self._global
        if method is None or start is None:
            raise RuntimeError("unlearning round without a method")
        retain_updates = [c.update for c in retain]
        retain_msgs = [c.message for c in retain]
        forget_updates = [p.forget.update for p in parsed if p.forget is not None]
        asked_forget = {n for n, k in self._asked.items() if "forget" in k.values()}
        expected = asked_forget | (set(self.pending) if method.departing_clients_train else set())
        got = {p.node for p in parsed if p.forget is not None}
        missing = sorted(expected - got)
        if missing and self.on_missing == "skip":
            self.failed = self.cancel()
            log(
                WARNING,
                "node(s) %s did not reply in unlearning round %s; their requests stay pending",
                missing,
                server_round,
            )
            return RoundPlan(messages=retain_msgs, rollup=rollup, recode=True)
        if missing:
            why = {n: self.last_round_problems.get(n, "no reply") for n in missing}
            raise RuntimeError(
                f"departing node(s) {why} did not reply in unlearning round {server_round}; nothing was unlearned"
            )
        replied = [*retain, *(p.forget for p in parsed if p.forget is not None)]
        integer = {k for c in replied for k, v in c.update.weights.items() if np.asarray(v).dtype.kind != "f"}
        if integer & set(self._moving):
            # clients return these as integers (a counter FedAvg turned into float64): carried, never unlearned
            self._moving = [k for k in self._moving if k not in integer]
        new = method.aggregate(start, retain_updates, forget_updates)
        validate_update(new, start, f"method {method.name}")  # the method itself must not emit NaN
        new = self._carry(new, retain_updates)
        new, step = self._bound_departing_step(new, retain_updates, forget_updates)
        if self.calibrate and method.calibratable and method.num_rounds == 1 and forget_updates:
            new, cal = self._calibrate(new, retain_updates, [p.node for p in parsed if p.forget is not None])
            step = {**step, "calibration": cal}
        plan = self._compose(
            server_round, new, retain, forget_updates, rollup, kept=bool(step.get("calibration", {}).get("kept"))
        )
        if plan.dp is not None:
            step = {**step, "dp": plan.dp}
        self.unlearning_rounds_run += 1
        if self.unlearning_rounds_run >= method.num_rounds:
            batch = self._batch
            if self.diagnostics:
                self.unlearning_report = {**self._diagnose(server_round, new, parsed), **step}
            if batch is not None and batch.leave:
                self.departed |= set(self.pending)
            else:
                self.retain_only |= set(self.pending)
            log(INFO, "aggregate_train: %s served the requests of nodes %s", method.name, list(self.pending))
            self.pending, self._batch = (), None
        return plan

    def _carry(self, new: dict[str, np.ndarray], retain: list[ClientUpdate]) -> dict[str, np.ndarray]:
        """Carried arrays take the remaining clients' weighted mean (or stay) instead of the method's value."""
        if self._global is None:
            return new
        carried = set(self._global) - set(self._moving)
        if not carried:
            return new
        mean = fedavg(retain) if retain else self._global
        out = dict(new)
        for k in carried:
            out[k] = np.asarray(mean[k], np.float64).astype(np.asarray(self._global[k]).dtype)
        return out

    def _compose(
        self,
        server_round: int,
        new: dict[str, np.ndarray],
        retain: list[Checked],
        forget: list[ClientUpdate],
        rollup: MetricRecord,
        kept: bool = False,
    ) -> RoundPlan:
        """How the unlearning round's model enters the wrapped strategy (module docstring)."""
        start = self._global
        if start is None:
            raise RuntimeError("no round in progress")
        if kept:
            # nothing memorised: the pre-request model stands, the wrapped strategy's state untouched
            return RoundPlan(direct=self._record(new), rollup=rollup)
        if self.reset_server_momentum and self.unlearning_rounds_run == 0 and I.reset_server_momentum(self.strategy):
            log(INFO, "the server optimizer's momentum was reset for the unlearning round")
        found = I.describe(self.strategy)
        dp, where = self._dp()
        retain_msgs = [c.message for c in retain]
        retain_updates = [c.update for c in retain]
        if found.aggregation == "mean" and dp is None and not self._mean_rule:
            return RoundPlan(messages=retain_msgs, direct_metrics_only=True, direct=self._record(new), rollup=rollup)
        if self._composition() == "additive":
            if not retain_msgs:
                return RoundPlan(direct=self._record(new), rollup=rollup)
            mean = fedavg(retain_updates)
            correction = {k: np.asarray(new[k], np.float64) - np.asarray(mean[k], np.float64) for k in self._moving}
            dp_info = None
            if dp is not None:
                n_rem = float(sum(u.num_examples for u in retain_updates))
                n_syn = float(sum(u.num_examples for u in forget)) or n_rem
                correction, dp_info = self._dp_bound(correction, dp, where, n_syn / (n_rem + n_syn))
            return RoundPlan(messages=retain_msgs, correction=correction, rollup=rollup, unlearning=True, dp=dp_info)
        synthetic, dp_info = self._synthetic_replies(new, retain, forget, dp, where)
        return RoundPlan(messages=[*retain_msgs, *synthetic], rollup=rollup, recode=True, unlearning=True, dp=dp_info)

    def _synthetic_replies(
        self,
        new: dict[str, np.ndarray],
        retain: list[Checked],
        forget: list[ClientUpdate],
        dp: Strategy | None,
        where: str | None,
    ) -> tuple[list[Message], dict[str, Any] | None]:
        """Replies (one per departing client) chosen so that the weighted mean of all replies is ``new``."""
        start = self._global
        if start is None:
            raise RuntimeError("no round in progress")
        weight_key, akey, _ = self._keys()
        retain_updates = [c.update for c in retain]
        n_rem = float(sum(u.num_examples for u in retain_updates))
        weights = [float(u.num_examples) for u in forget] or [max(n_rem, 1.0)]
        common = {float(u.num_examples) for u in retain_updates}
        accountant = dp is not None and getattr(dp, "accountant", None) is not None
        if accountant and len(common) == 1:
            weights = [common.pop()] * len(weights)  # the accountant needs equal weights in every reply
        n_syn = float(sum(weights))
        total = n_rem + n_syn
        syn: dict[str, np.ndarray] = {}
        for k in start:
            acc = total * np.asarray(new[k], np.float64)
            for u in retain_updates:
                acc -= u.num_examples * np.asarray(u.weights[k], np.float64)
            syn[k] = acc / n_syn
        dp_info = None
        if dp is not None:
            delta = {k: syn[k] - np.asarray(start[k], np.float64) for k in self._moving}
            delta, dp_info = self._dp_bound(delta, dp, where, 1.0)
            syn = {k: (np.asarray(start[k], np.float64) + delta[k]) if k in delta else syn[k] for k in start}
        syn = {k: v.astype(np.asarray(start[k]).dtype) for k, v in syn.items()}
        template = retain[0] if retain else None
        mkey = template.metric_key if template is not None else "metrics"
        akey = template.array_key if template is not None else akey
        keys = list(template.message.content.metric_records[mkey].keys()) if template is not None else [weight_key]
        means = weighted_means(retain, weight_key) if retain else {}
        source = forget[0].metrics if forget else {}
        origin = (
            template.message if template is not None else (self._sent.get(self.pending[0]) if self.pending else None)
        )
        if origin is None:
            raise RuntimeError("no message to attach the unlearning reply to")
        record = to_record(syn)
        out = []
        for w in weights:
            values: dict[str, Any] = {}
            for key in keys:
                v = source.get(key, means.get(key))
                values[key] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else means.get(key, 0.0)
            values[weight_key] = int(w) if float(w).is_integer() else w
            out.append(with_content(origin, RecordDict({akey: record, mkey: MetricRecord(values)})))
        return out, dp_info

    def _dp_bound(
        self, delta: dict[str, np.ndarray], dp: Strategy, where: str | None, share: float
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The unlearning step as one client's update under DP: clipped to ``share`` x the clipping norm."""
        clip = float(getattr(dp, "clipping_norm", 0.0) or 0.0)
        norm = float(np.sqrt(sum(float(np.sum(v**2)) for v in delta.values())))
        limit = clip * share
        kept = 1.0 if norm <= limit or norm == 0 else limit / norm
        out = {k: v * kept for k, v in delta.items()} if kept < 1.0 else delta
        z = float(getattr(dp, "noise_multiplier", 0.0))
        m = int(getattr(dp, "num_sampled_clients", 1) or 1)
        std = z * clip / m
        info = {
            "clipping": where,
            "clipping-norm": clip,
            "step-norm": norm,
            "kept-fraction": kept,
            "noise-std": std,
            "accountant": getattr(dp, "accountant", None) is not None,
        }
        log(
            WARNING if kept < 1.0 else INFO,
            "differential privacy (%s-side clipping): the unlearning step enters the release as one client's "
            "update: norm %.3g clipped to %.3g (%.0f%% of the step kept), then noised with std %.3g like every "
            "release; the privacy accounting covers the departing clients too",
            where,
            norm,
            limit,
            100 * kept,
            std,
        )
        return out, info

    def _diagnose(
        self, server_round: int, new: dict[str, np.ndarray], parsed: Sequence[CheckedReply]
    ) -> dict[str, Any]:
        """Per-layer exponent, stability weight and share of the unlearning motion ``||dw_l|| / ||dw||``."""
        start = self._unlearn_start
        method = self._method
        if start is None or method is None:
            return {}
        spectra = {s.layer: s for s in analyze(start, getattr(method, "gate", None))}
        share = motion_share(
            {
                k: np.asarray(new[k], np.float64) - np.asarray(g, np.float64)
                for k, g in start.items()
                if k in self._moving
            }
        )
        layers = []
        for layer, frac in share.items():
            s = spectra.get(layer)
            layers.append(
                {
                    "layer": layer,
                    "motion-share": frac,
                    **(
                        {
                            "shape": list(s.shape),
                            "alpha": s.alpha,
                            "xmin": s.xmin,
                            "ks-distance": s.ks_distance,
                            "nu": s.nu,
                        }
                        if s
                        else {}
                    ),
                }
            )
        clients = {
            str(self.client_id(p.node)): {k: v for k, v in p.forget.update.metrics.items() if not isinstance(v, list)}
            for p in parsed
            if p.forget is not None and p.node in self.pending
        }
        return {
            "round": server_round,
            "rounds": self.unlearning_rounds_run,
            "method": method.name,
            "departing": sorted(self.client_id(n) for n in self.pending),
            "layers": layers,
            "departing-clients": clients,
            "history-bytes": method.history_bytes(),
        }
