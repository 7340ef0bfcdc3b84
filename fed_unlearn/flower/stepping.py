"""How far the unlearning round moves the model: the departing-step bound and the calibrated scale.

The unlearning round's model is ``base + d``: ``base`` what the remaining clients alone
give (their FedAvg step, or the round's model when they did not train), ``d`` the method's
step. Three rules act on ``d``, in this order:

* **the departing-step bound**: ``||d||`` at most ``departing_step_bound`` times the
  remaining clients' mean update norm (a malicious departing client cannot throw the model
  anywhere);
* **calibration on the forgetting clients' own data** (``query.calibrate``): the smallest
  scale at which their forget set looks like data the model never saw
  (:mod:`fed_unlearn.calibration`), after a memorisation test that keeps the model when
  nothing was memorised; beyond the method's own step only as far as the remaining
  clients' evaluation and the forgetting clients' other held-out samples do not pay for it.
  When whole clients depart, the clients who stay count their labels (``query.support``,
  in the same exchange, or where the grid can push a query behind an exchange, right behind
  the round's training): classes they (almost) do not hold must stop being predicted too;
* **the utility bound, when no forgetting client can calibrate**: the remaining clients
  evaluate ``base + c d`` for a few ``c`` with their ordinary ``evaluate`` handler (every
  Flower app has one) and the largest ``c`` whose loss stays within ``utility_tolerance``
  of the loss at ``c = 0`` is taken (:func:`fed_unlearn.calibration.utility_scale`).

Arrays that are carried rather than unlearned (integer buffers, BatchNorm statistics) take
no part in any norm and never move along ``d``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common import log
from flwr.serverapp import Grid

from .. import protocol as P
from ..aggregation import ClientUpdate, fedavg, mean_update_norm, step_from, update_norm
from ..calibration import (
    Calibration,
    choose_scale,
    extension_limit,
    memorisation,
    pooled,
    summed_counts,
    target_for,
    unsupported_classes,
    utility_scale,
    with_unsupported,
)
from ..unlearning import UnlearningMethod
from .grid import RidingGrid, collect
from .records import metric_dict, metric_records, to_record
from .requests import UnlearningRequest, client_failure
from .wire import (
    CalibrateRequest,
    calibrate_request,
    handlers_of,
    read_calibrate_reply,
    read_support_reply,
    support_request,
)

#: The scales the utility bound evaluates on the remaining clients (fractions of the step).
UTILITY_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The pooled calibration figures measured per candidate scale.
_PER_SCALE = (
    "forget-loss",
    "heldout-loss",
    "forget-acc",
    "heldout-acc",
    "auc",
    "auc-z",
    "rest-loss",
    "rest-acc",
    "unsupported-acc",
)


class StepControl:
    """The step-sizing part of :class:`~fed_unlearn.flower.Unlearning` (state lives on the strategy)."""

    departing_step_bound: float | None
    last_update_norm: float | None
    calibration_scales: tuple[float, ...]
    class_floor: float
    support_floor: float
    calibrate: bool
    pending: tuple[int, ...]
    departed: set[int]
    memorisation_z: float
    utility_tolerance: float
    utility_key: str | None
    query_timeout: float
    capabilities: dict[int, dict[str, Any]]
    declared: dict[int, float]
    current_round: int
    _batch: UnlearningRequest | None
    _method: UnlearningMethod | None
    #: the label counts asked behind the unlearning round's training: (nodes, message ids)
    _support_ahead: tuple[list[int], list[str]] | None
    _grid: Grid | None
    _global: dict[str, np.ndarray] | None
    _wire: dict[str, str]
    _moving: list[str]

    if TYPE_CHECKING:  # provided by the strategy this mixin is part of

        def _evaluate_template(self, grid: Grid, arrays: ArrayRecord) -> list[Message]: ...

        def _with_arrays(self, messages: Sequence[Message], arrays: ArrayRecord) -> list[Message]: ...

        def _aggregate_evaluation(self, server_round: int, replies: list[Message]) -> dict[str, float]: ...

    # -- the departing-step bound -------------------------------------------------------------
    def _bound_departing_step(
        self, new: dict[str, np.ndarray], retain: list[ClientUpdate], forget: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Scale the departing clients' step down to ``departing_step_bound`` x the remaining clients' update norm."""
        if self._global is None or not forget:
            return new, {}
        base = fedavg(retain) if retain else self._global
        norm = update_norm(new, base, self._moving)
        ref = mean_update_norm(retain, self._global, self._moving) if retain else self.last_update_norm
        info: dict[str, Any] = {"departing-step-norm": norm, "reference-update-norm": ref}
        if self.departing_step_bound is None or not ref or not np.isfinite(norm):
            return new, info
        info["departing-step-ratio"] = norm / ref
        limit = self.departing_step_bound * ref
        if norm <= limit:
            return new, {**info, "departing-step-bounded": 0}
        log(
            WARNING,
            "the departing clients' step (%.3g) exceeds %.3g x the remaining clients' update norm (%.3g): "
            "scaled down to the bound",
            norm,
            self.departing_step_bound,
            ref,
        )
        direction = {k: np.asarray(new[k], np.float64) - np.asarray(base[k], np.float64) for k in self._global}
        return step_from(base, direction, limit / norm, self._global), {**info, "departing-step-bounded": 1}

    def _longer_scales(self, direction: Mapping[str, np.ndarray]) -> list[float]:
        """Scales beyond 1 (doubling) up to the departing-step bound, for a step too short to reach the target."""
        norm = float(np.sqrt(sum(float(np.sum(np.asarray(direction[k]) ** 2)) for k in self._moving)))
        if self.departing_step_bound is None or not self.last_update_norm or not norm or not np.isfinite(norm):
            return []
        limit = self.departing_step_bound * self.last_update_norm / norm
        out = [2.0**k for k in range(1, 13) if 2.0**k < limit]
        return [*out, limit] if limit > 1 else []

    # -- calibration on the forgetting clients' data ------------------------------------------
    def _calibrate(
        self, new: dict[str, np.ndarray], retain: list[ClientUpdate], nodes: list[int]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Scale the step: on the forgetting clients' own data if they can, else the utility bound."""
        batch, grid, start = self._batch, self._grid, self._global
        if batch is None or grid is None or start is None:
            return new, {"used": False, "why": "no request being served"}
        lacking = [n for n in nodes if n in self.capabilities and P.CALIBRATE not in handlers_of(self.capabilities[n])]
        base = fedavg(retain) if retain else start
        base = {k: np.asarray(base[k]).astype(np.asarray(start[k]).dtype) for k in start}
        direction = {k: np.asarray(new[k], np.float64) - np.asarray(base[k], np.float64) for k in start}
        if lacking or not nodes:
            why = f"node(s) {lacking} have no {P.CALIBRATE} handler" if lacking else "no forgetting client replied"
            return self._utility_bound(new, base, direction, why)
        target = target_for(batch.scenario)

        support_nodes, support_why = self._support_nodes(nodes) if batch.leave and target == "loss-match" else ([], "")
        support: dict[str, Any] = {"asked": support_nodes} if support_nodes else {}
        if support_why:
            support["skipped"] = support_why
        # the label counts asked right behind the round's training (:meth:`_ride_support`), if they went to
        # exactly the clients who stay now; else they are asked beside the calibration
        ahead, self._support_ahead = self._support_ahead, None
        ridden = (
            ahead is not None and bool(ahead[1]) and bool(support_nodes) and sorted(ahead[0]) == sorted(support_nodes)
        )
        if ridden:
            support["ahead"] = True
        elif isinstance(grid, RidingGrid):
            grid.cancel_riders("support")  # no training exchange carried them

        def ask(scales: Sequence[float], pre_request: bool, counts: Sequence[int] = ()) -> dict[str, Any]:
            """The forgetting clients' pooled measurements of ``base + c * direction`` for each scale ``c``;
            with ``counts``, those nodes' label counts, asked in the same exchange or read where they rode ahead."""
            request = CalibrateRequest(
                to_record(base, self._wire),
                to_record(direction),
                tuple(scales),
                to_record(start, self._wire) if pre_request else None,
            )
            config = {P.FORGET_ALL: batch.leave, P.SERVER_ROUND: self.current_round}
            msgs = [Message(calibrate_request(request, config), n, P.CALIBRATE) for n in nodes]
            if counts and not ridden:
                msgs += [Message(support_request({P.SERVER_ROUND: self.current_round}), n, P.SUPPORT) for n in counts]
            replies = list(grid.send_and_receive(msgs, timeout=self.query_timeout))
            if counts and ridden and ahead is not None:  # answered while the server waited for the training
                replies += collect(grid, ahead[1], self.query_timeout)
            stats: list[dict[str, Any]] = []
            labels: list[list[float]] = []
            why: list[str] = []
            lacking: list[str] = []
            for reply in replies:
                src = reply.metadata.src_node_id
                try:
                    if reply.has_error():
                        raise ValueError(client_failure(reply.error.reason or ""))
                    if src in counts:
                        labels.append(read_support_reply(reply.content, self.declared.get(src)))
                    else:
                        stats.append(read_calibrate_reply(reply.content))
                except (KeyError, ValueError, TypeError) as exc:
                    (lacking if src in counts else why).append(f"node {src}: {exc}")
            if why or len(stats) != len(nodes):
                raise ValueError("; ".join(why) or "some clients did not answer")
            out = pooled(stats)  # malformed lists raise and are caught below
            if counts:
                if lacking or len(labels) != len(counts):
                    support["skipped"] = "; ".join(lacking) or "some clients who stay did not answer"
                else:
                    support["label-counts"] = summed_counts(labels)
            return out

        scales = list(self.calibration_scales)
        m: dict[str, Any] = {}
        extension: dict[str, Any] = {}

        def decide() -> Calibration:
            f, h, a = m["forget-loss"], m["heldout-loss"], m["forget-acc"]
            held, auc, ua = m.get("heldout-acc"), m.get("auc"), m.get("unsupported-acc")
            return choose_scale(scales, f, h, a, target, self.class_floor, held, auc, ua)

        try:
            m = ask(scales, pre_request=True, counts=support_nodes)
            if "label-counts" in support and "class-n" in m:
                support["class-n"] = m["class-n"]
                support["classes"] = list(
                    unsupported_classes(support["label-counts"], m["class-n"], self.support_floor)
                )
                with_unsupported(m, support["classes"], m["class-n"])
                if support["classes"]:
                    log(
                        INFO,
                        "calibration: class(es) %s of the departing clients are (almost) absent from the clients "
                        "who stay (fewer than %g of the federation's samples): a model without them does not "
                        "predict them, so they are forgotten too",
                        support["classes"],
                        self.support_floor,
                    )
            pre = memorisation(m["pre"], target, self.class_floor, self.memorisation_z) if "pre" in m else None
            cal = decide()
            # the forget set still clearly member-like after the full step: by the loss attack, or
            # classes only the departing clients held still predicted
            ua = m.get("unsupported-acc")
            still = (
                target != "loss-match"
                or "auc-z" not in m
                or m["auc-z"][-1] > self.memorisation_z
                or (ua is not None and ua[-1] > self.class_floor)
            )
            stop = cal.reached or not still or (pre is not None and not pre.memorised)
            longer = [] if stop else self._longer_scales(direction)
            better = 1.0 if target == "loss-match" else -1.0  # the sign in which a gap moves toward the target
            if longer and better * cal.gaps[-1] >= better * cal.gaps[0]:
                # the full step falls short, the forget set still clearly member-like, without moving away
                # from the target (an ascent step that barely starts): candidates beyond it, up to the bound.
                # Asked only now: each candidate costs the clients a pass over their forget set, which
                # for a large one outweighs the exchange
                more = ask(longer, pre_request=False)
                with_unsupported(more, support.get("classes", ()), support.get("class-n", ()))
                extension = self._extension(m, more, scales, longer, base, direction)
                n = extension["admitted"]
                if n < len(longer):
                    log(
                        WARNING,
                        "calibration: the step is not taken beyond %g x its length: %s",
                        extension["limit"],
                        "no measurement of what the federation keeps shows a longer step harmless"
                        if not extension["guards"]
                        else f"further, what the federation keeps pays more than {100 * self.utility_tolerance:.0f} %",
                    )
                scales += longer[:n]
                for key in _PER_SCALE:
                    if key in m and key in more:
                        m[key] = list(m[key]) + list(more[key])[:n]
                cal = decide()
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return self._utility_bound(new, base, direction, f"calibration failed ({exc})")
        figures = {k: v for k, v in m.items() if k not in ("pre", "class-correct", "pre-class-correct")}
        test = {} if pre is None else {"pre-request": m["pre"], "memorised": pre.memorised}
        memorised = pre is None or pre.memorised
        scale = cal.scale if memorised else 0.0
        info: dict[str, Any] = {
            "used": True,
            "kept": False,
            "rule": "forget-set",
            "scale": scale,
            "reached": cal.reached,
            "target": cal.target,
            "scales": scales,
            "gaps": list(cal.gaps),
            **({"extension": extension} if extension else {}),
            **({"support": support} if support else {}),
            **figures,
            **test,
        }
        if scale == 0.0 and not memorised:
            log(
                INFO,
                "calibration (%s): the pre-request model does not remember the forget set (%s): it is kept unchanged",
                target,
                f"forget set {pre.statistic:.2f} standard errors more member-like than held-out data "
                f"(loss attack AUC {pre.auc:.3f}) <= {self.memorisation_z}"
                if pre is not None and target == "loss-match"
                else f"forget accuracy {m['pre']['forget-acc']:.3f} <= {self.class_floor}",
            )
            kept = {k: np.asarray(v).copy() for k, v in start.items()}
            return kept, {**info, "kept": True, "reached": True}
        log(
            INFO,
            "calibration (%s): scale %.3f of the unlearning step%s",
            cal.target,
            scale,
            "" if cal.reached else f" (the target is not reached even by {scales[-1]:g} x the step)",
        )
        return step_from(base, direction, scale, start), info

    def _support_nodes(self, departing: Sequence[int]) -> tuple[list[int], str]:
        """The clients who stay, to be asked their label counts; ``([], why)`` when the class rule cannot apply.

        Every node the strategy knows of that neither departs now nor has departed must be
        connected and answer ``query.support``: the labels of one it cannot ask could be the
        support of a class, and a class is only called unsupported on the whole federation's
        counts.
        """
        grid = self._grid
        if self.support_floor <= 0 or grid is None:
            return [], ""
        gone = set(departing) | set(self.departed)
        connected = {int(n) for n in grid.get_node_ids()} - gone
        known = set(self.capabilities) - gone
        if known - connected:
            return [], f"node(s) {sorted(known - connected)} who stay are not connected: their labels are unknown"
        lacking = sorted(
            n for n in connected if n in self.capabilities and P.SUPPORT not in handlers_of(self.capabilities[n])
        )
        if lacking:
            return [], f"node(s) {lacking} who stay have no {P.SUPPORT} handler"
        if not connected:
            return [], "no client who stays is connected"
        return sorted(connected), ""

    def _ride_support(self, grid: Grid, messages: Sequence[Message]) -> None:
        """Ask the clients who stay for their label counts right behind the unlearning round's training.

        Where the grid can push a query behind an exchange (:class:`~fed_unlearn.flower.grid.RidingGrid`,
        a deployed service), each staying site counts its labels as soon as it has replied to its
        training, while the server waits for the slowest site: the calibration's exchange then waits
        for the departing sites alone, not for staying sites woken from their idle poll. Only for
        a departure that will be calibrated (whole clients, a one-round calibratable method whose
        departing clients train); :meth:`_calibrate` reads the replies.
        """
        self._support_ahead = None
        batch, method = self._batch, self._method
        if not isinstance(grid, RidingGrid):
            return
        grid.cancel_riders("support")  # of an earlier round whose training never went out
        if not messages or batch is None or method is None or self.support_floor <= 0:
            return
        calibrated = self.calibrate and method.calibratable and method.num_rounds == 1
        if not (
            calibrated and method.departing_clients_train and batch.leave and target_for(batch.scenario) == "loss-match"
        ):
            return
        nodes, _ = self._support_nodes(list(self.pending))
        if not nodes:
            return
        ids: list[str] = []
        msgs = [Message(support_request({P.SERVER_ROUND: self.current_round}), n, P.SUPPORT) for n in nodes]
        grid.ride_behind(messages[0].metadata.message_type, msgs, ids.extend, tag="support")
        self._support_ahead = (nodes, ids)

    def _remaining_costs(
        self,
        base: dict[str, np.ndarray],
        direction: dict[str, np.ndarray],
        scales: Sequence[float],
        tolerance: float,
        accuracy: bool = False,
    ) -> dict[str, Any] | None:
        """The remaining clients' evaluation of ``base + c d`` for ``c`` in ``scales``; ``None`` without a grid.

        Returns the metric's key (``utility_key``, else with ``accuracy`` the app's accuracy
        metric if it reports one, else its loss) and its values as costs (an accuracy
        negated), the walk stopping at the first candidate outside ``tolerance`` of the
        first; ``values`` is ``None`` when the replies hold no such metric (``metrics`` names
        what they hold).
        """
        grid, start = self._grid, self._global
        if grid is None or start is None:
            return None
        values: list[float] = []
        key = ""
        # one node set for every candidate (a strategy evaluating a fraction samples anew at each call)
        template = self._evaluate_template(grid, to_record(base, self._wire))
        batches = [
            self._with_arrays(template, to_record(step_from(base, direction, c, start), self._wire)) for c in scales
        ]
        for replies in exchange(grid, batches, self.query_timeout):
            metrics = self._aggregate_evaluation(self.current_round, replies)
            key = self.utility_key or (accuracy and _accuracy_key(metrics)) or _loss_key(metrics)
            if not key or key not in metrics or not np.isfinite(metrics[key]):
                return {"values": None, "key": key, "metrics": sorted(metrics)}
            values.append(-float(metrics[key]) if _higher_is_better(key) else float(metrics[key]))
            if values[-1] > values[0] + tolerance * abs(values[0]):
                break  # the candidates beyond cost the remaining clients more still: not counted
        return {"values": values, "key": key}

    def _utility_scale(self, base: dict[str, np.ndarray], direction: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """The remaining clients' evaluation of ``base + c d`` for the utility scales; ``None`` without a grid.

        Returns the scale (:func:`fed_unlearn.calibration.utility_scale`; ``None`` without a
        loss to read), the metric, the values and a line for the log.
        """
        seen = self._remaining_costs(base, direction, UTILITY_SCALES, float("inf"))
        if seen is None or seen["values"] is None:
            return None if seen is None else {"scale": None, "key": seen["key"], "metrics": seen["metrics"]}
        key, costs = seen["key"], seen["values"]
        scale = utility_scale(UTILITY_SCALES, costs, self.utility_tolerance)  # costs: lower is better
        values = [-v for v in costs] if _higher_is_better(key) else costs  # as the app reported them
        line = ", ".join(f"{c:g}: {v:.4g}" for c, v in zip(UTILITY_SCALES, values, strict=True))
        return {"scale": scale, "key": key, "values": values, "tolerance": self.utility_tolerance, "line": line}

    def _extension(
        self,
        measured: Mapping[str, Any],
        more: Mapping[str, Any],
        scales: Sequence[float],
        longer: Sequence[float],
        base: dict[str, np.ndarray],
        direction: dict[str, np.ndarray],
    ) -> dict[str, Any]:
        """How many of the ``longer`` candidates (beyond the full step) calibration may choose among.

        The guards (:func:`fed_unlearn.calibration.extension_limit`), accuracies where there
        are any: the forgetting clients' other held-out samples (``rest-acc``, measured with
        the candidates) and the remaining clients' ordinary evaluation of ``base``, the full
        step and the longer candidates. Accuracy, not loss: an ascent step inflates the
        logits, and with them the loss of samples it still classifies right, long before it
        costs any accuracy (and the recovery rounds rescale them).
        """
        candidates = [0.0, 1.0, *longer]
        guards: dict[str, list[float]] = {}
        one = [i for i, c in enumerate(scales) if c == 1.0]
        if one and "rest-acc" in measured and "rest-acc" in more:
            rest = [-float(v) for v in (measured["rest-acc"][0], measured["rest-acc"][one[0]], *more["rest-acc"])]
            guards["forgetting clients' other held-out accuracy (negated)"] = rest
        seen = self._remaining_costs(base, direction, candidates, self.utility_tolerance, accuracy=True)
        if seen is not None and seen["values"] is not None and len(seen["values"]) >= 2:
            sign = " (negated)" if _higher_is_better(seen["key"]) else ""
            guards[f"remaining clients' '{seen['key']}'{sign}"] = list(seen["values"])
        limit = extension_limit(candidates, list(guards.values()), self.utility_tolerance)
        admitted = sum(1 for c in longer if c <= limit)
        return {"candidates": list(longer), "limit": limit, "admitted": admitted, "guards": guards}

    # -- the utility bound: the remaining clients' own evaluation -------------------------------
    def _utility_bound(
        self, new: dict[str, np.ndarray], base: dict[str, np.ndarray], direction: dict[str, np.ndarray], why: str
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The largest scale whose remaining-client evaluation loss stays within the tolerance (module docstring)."""
        start = self._global
        info: dict[str, Any] = {"used": True, "kept": False, "rule": "remaining-utility", "why": why}
        utility = self._utility_scale(base, direction)
        if utility is None or start is None:
            return new, {**info, "used": False}
        if utility["scale"] is None:
            # no evidence at all of how far to go: the departing clients simply stop contributing
            log(
                WARNING,
                "%s and the remaining clients' evaluation reports no loss (metrics %s): the step cannot be "
                "sized without the gold, so none is taken and the departing clients simply stop "
                "contributing. Name the evaluation loss with utility_key=, or let the clients calibrate "
                "(fed_unlearn.flower.add_unlearning)",
                why,
                utility["metrics"],
            )
            return step_from(base, direction, 0.0, start), {
                **info,
                "rule": "no-evidence",
                "scale": 0.0,
                "why": f"{why}; no evaluation loss",
            }
        scale = float(utility["scale"])
        log(
            INFO,
            "%s: the step is bounded by the remaining clients' evaluation instead: scale %.2f, the largest "
            "whose '%s' stays within %.0f%% of the model without the step (%s)",
            why,
            scale,
            utility["key"],
            100 * self.utility_tolerance,
            utility["line"],
        )
        return step_from(base, direction, scale, start), {
            **info,
            "scale": scale,
            "scales": list(UTILITY_SCALES),
            "utility-key": utility["key"],
            "utility": utility["values"],
            "tolerance": self.utility_tolerance,
        }


def exchange(grid: Grid, batches: Sequence[Sequence[Message]], timeout: float) -> list[list[Message]]:
    """Send every batch of messages in one exchange; the replies, batch by batch.

    A SuperNode takes the messages queued for it one after the other, without the idle
    poll (3 s in Flower's SuperNode) it waits between exchanges, so ``n`` candidates cost
    one exchange and ``n`` short tasks instead of ``n`` exchanges. Each node may hold one
    message per batch, so the wait is ``timeout`` per batch. A grid that gives its messages
    no distinct ids (a test double; Flower's grids all do) cannot tell the replies apart:
    the batches then go one exchange each.
    """
    flat = [m for batch in batches for m in batch]
    if len(batches) == 1 or not flat:
        return [list(grid.send_and_receive(batch, timeout=timeout)) if batch else [] for batch in batches]
    replies = list(grid.send_and_receive(flat, timeout=timeout * len(batches)))
    ids = [m.metadata.message_id for m in flat]
    if "" in ids or len(set(ids)) < len(ids):
        return [list(grid.send_and_receive(batch, timeout=timeout)) for batch in batches]
    by_id = {r.metadata.reply_to_message_id: r for r in replies}
    return [[by_id[m.metadata.message_id] for m in batch if m.metadata.message_id in by_id] for batch in batches]


def _loss_key(metrics: Mapping[str, float]) -> str:
    """The evaluation loss among an app's metric names (``eval_loss``, ``loss``, ``test-loss``, ...), else ``""``."""
    keys = sorted(k for k in metrics if "loss" in k.lower() and isinstance(metrics[k], (int, float)))
    names = ("loss", "eval_loss", "eval-loss", "val_loss", "test_loss", "test-loss", "test_logloss")
    exact = [k for k in keys if k.lower() in names]
    return (exact or keys or [""])[0]


def _accuracy_key(metrics: Mapping[str, float]) -> str:
    """The evaluation accuracy among an app's metric names (``accuracy``, ``eval_acc``, ...), else ``""``."""
    keys = sorted(
        k for k in metrics if _higher_is_better(k) and "acc" in k.lower() and isinstance(metrics[k], (int, float))
    )
    names = ("accuracy", "acc", "eval_acc", "eval-acc", "eval_accuracy", "val_acc", "val_accuracy", "test_acc")
    exact = [k for k in keys if k.lower() in names]
    return (exact or keys or [""])[0]


def _higher_is_better(key: str) -> bool:
    low = key.lower()
    return any(w in low for w in ("acc", "auc", "f1", "r2", "score")) and "loss" not in low


def evaluation_means(replies: Sequence[Message], weight_key: str, skip: Callable[[int], bool]) -> dict[str, float]:
    """Weighted means of the scalar evaluation metrics of ``replies`` (nodes for which ``skip`` is true left out)."""
    sums: dict[str, float] = {}
    total: dict[str, float] = {}
    for r in replies:
        if r.has_error() or skip(r.metadata.src_node_id):
            continue
        recs = metric_records(r.content)
        if len(recs) != 1:
            continue
        rec = metric_dict(next(iter(recs.values())))
        n = rec.get(weight_key)
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not (np.isfinite(n) and n > 0):
            continue
        for k, v in rec.items():
            if k != weight_key and isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                sums[k] = sums.get(k, 0.0) + float(n) * float(v)
                total[k] = total.get(k, 0.0) + float(n)
    return {k: sums[k] / total[k] for k in sums}
