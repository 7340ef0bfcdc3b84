"""Unlearning as a wrapper around the strategy a Flower federation already has.

``Unlearning(strategy, method="puf")`` behaves like ``strategy`` (FedAvg, FedProx,
FedAdam, FedTrimmedAvg, a DP wrapper around any of them, your own) in every ordinary
round: the wrapped strategy samples the nodes, builds the messages and aggregates the
replies, bit for bit, and attributes the wrapper does not own are the wrapped strategy's
(``w.fraction_train = 0.25`` sets it there). The wrapper adds three things:

* **Departures at run time.** :meth:`Unlearning.request_unlearning` (before or during
  ``start()``), or a ``requests`` callback consulted every round, names the clients to
  forget by node id or by a node-config key (:mod:`fed_unlearn.flower.requests`).
* **The unlearning round.** The configured method decides who trains and how the
  replies combine (:mod:`fed_unlearn.unlearning`); the step is bounded and scaled
  (:mod:`fed_unlearn.flower.stepping`). The result enters the wrapped strategy's own
  aggregation (:mod:`fed_unlearn.flower.compose`; :mod:`fed_unlearn.flower.inner` tells
  what the wrapped strategy is): as one more reply of a weighted mean (FedAvg, FedProx;
  a server optimizer then applies it like any pseudo-gradient, its first moment reset so
  momentum built from the departed client's past updates is not replayed), or added to
  the aggregate of the remaining replies (robust aggregators, QFedAvg). Under one of
  Flower's DP wrappers, in either order, the step enters the release as one client's
  update: clipped to the clipping norm and noised like any, so the accountant's epsilon
  covers the departing clients too (the log says how much the clip shortened it).
* **Checked replies.** Every reply is checked against what was sent
  (:mod:`fed_unlearn.flower.intake`, :mod:`fed_unlearn.flower.replies`); a bad one costs
  its node that round, never the round, and ``max_strikes`` bad replies exclude the node. A node that has left is hidden
  from the wrapped strategy's sampling (its node minimums drop accordingly) and is sent
  nothing; a node that deleted some samples is sent ``train.retain`` instead of ``train``.

Dtypes are those of the model sent: an int64 buffer stays int64, float16 and bfloat16
stay themselves, 0-dim arrays stay 0-dim. The unlearning math runs in float64 and is cast
back per array. Arrays that are not weights — integer buffers and BatchNorm statistics
(``running_mean``, ``running_var``, ``num_batches_tracked``; ``carry=`` names others) —
are carried, never negated: in the unlearning round they take the remaining clients'
weighted mean, as in an ordinary round.

The unlearning math is pure NumPy in :mod:`fed_unlearn.unlearning`; this module only moves
records. No state beyond what a normal round needs is kept: the model of the current
round, who has left, who trains on retained data only.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, Result, Strategy

from .. import protocol as P
from ..aggregation import is_batchnorm_buffer
from ..calibration import DEFAULT_SCALES
from ..unlearning import UnlearningMethod, make_method
from . import inner as I
from .compose import Composition, finite
from .grid import ActiveNodesGrid
from .outbox import MessageBuilder
from .records import metric_dict, metric_records, read_weights, to_record, wire_dtypes, with_content
from .replies import (
    majority_keys,
)
from .reproducible import ReproducibleFedAvg
from .requests import RequestBook, SetupError, UnlearningRequest, client_failure
from .stepping import evaluation_means

COMPOSITIONS = ("auto", "mean", "additive")

__all__ = ["ReproducibleFedAvg", "SetupError", "Unlearning", "UnlearningFedAvg", "UnlearningRequest"]


class Unlearning(RequestBook, MessageBuilder, Composition, Strategy):
    """Add federated unlearning to any Flower strategy.

    Parameters
    ----------
    strategy : Strategy
        The strategy the federation uses (a ``flwr.serverapp.strategy`` strategy, one of
        Flower's DP wrappers around one, or your own derived from FedAvg). It runs every
        ordinary round unchanged.
    method : UnlearningMethod or str
        The unlearning method (a registry name with default settings, or an instance).
    client_key : str
        Default node-config key naming clients in requests (``partition-id``).
    requests : callable, optional
        ``requests(server_round) -> iterable of UnlearningRequest``, consulted at the start
        of every round (e.g. a queue fed by your own intake).
    evaluate_departed : bool
        Keep sending evaluation messages to nodes that left (experiments measure forgetting
        on their data); default ``False``: a departed node receives nothing.
    on_missing : {"raise", "skip"}
        A client asked for the forget role that is absent or fails: ``raise`` (nothing is
        aggregated) or ``skip`` (the request is dropped from this round, left in
        :attr:`failed`, and the round is ordinary over the others: a service retries).
    composition : {"auto", "mean", "additive"}
        How the unlearning round's model enters the wrapped strategy: ``mean`` as one more
        reply of its weighted mean (FedAvg, FedProx, server optimizers), ``additive`` added
        to its aggregate of the remaining replies (robust aggregators, QFedAvg); ``auto`` chooses.
    reset_server_momentum : bool
        Reset the wrapped server optimizer's first moment in the unlearning round.
    max_strikes : int
        Invalid replies after which a node is excluded from the federation (0 = never).
    declared_examples : Mapping[int, float], optional
        Node id -> the most examples it may claim (``num-examples`` above it is capped);
        also settable with :meth:`declare_examples`.
    diagnostics : bool
        Record per-layer spectra and motion shares of every unlearning round.
    query_timeout : float
        Seconds to wait for the replies of the strategy's own queries (identify, deletion
        request, calibration).
    max_update_norm : float, optional
        Clip every reply's pseudo-gradient ``w_k - w`` to this L2 norm before aggregation
        (off by default: exact FedAvg).
    max_update_ratio : float, optional
        A reply whose update norm is more than this many times the median of the other
        replies' is not used (a strike): a finite but absurd update (values of 1e38) would
        make every client's next round non-finite. Default 100; ``None`` turns it off.
    examples_growth : float, optional
        A node's ``num-examples`` above this many times its largest earlier claim is capped
        there (a sudden 10¹² claim would make its update the new model). Default 2;
        ``None`` turns it off. :meth:`declare_examples` bounds the first claim too.
    departing_step_bound : float, optional
        The departing clients' step (the new model minus the remaining clients' plain
        average) is scaled down to at most this many times the remaining clients' mean
        update norm (this round's, or the last ordinary round's). ``None`` turns it off.
    calibrate : bool
        Scale the unlearning step (:mod:`fed_unlearn.flower.stepping`): on the forgetting
        clients' own data when they answer ``query.calibrate`` (the client helpers), else
        by the remaining clients' own evaluation.
    calibration_scales : sequence of float
        The candidate fractions of the step, increasing from 0 to at most 1.
    class_floor : float
        The forget accuracy that counts as "the class is gone" when a class is deleted (and
        for a class only departing clients held).
    support_floor : float
        When whole clients depart, a class of theirs of which the clients who stay hold less
        than this fraction (their ``query.support`` label counts) is forgotten too; 0 = off.
    memorisation_z : float
        Unless the forgetting clients' forget set is more member-like than their held-out
        data by more than this many standard errors (the loss-threshold attack's AUC, or the
        accuracy; for a class: unless the model still predicts it), nothing was memorised
        and the pre-request model is kept.
    utility_tolerance : float
        The utility bound's tolerance: the remaining clients' evaluation loss may rise by
        this fraction of its value without the step. It also bounds a calibrated step
        beyond the method's own (the forgetting clients' other held-out samples likewise).
    utility_key : str, optional
        The evaluation metric the utility bound reads (default: the app's loss metric,
        e.g. ``eval_loss``).
    reproducible : bool
        Hand replies to the wrapped strategy in client order instead of arrival order, so
        that the same seed gives the same numbers (Flower sums in arrival order).
    carry : callable, optional
        ``carry(name) -> bool``: arrays that are carried, never unlearned (default: torch
        BatchNorm buffers); integer arrays always are.

    Raises
    ------
    ValueError
        If the wrapped strategy cannot host unlearning (XGBoost models are not arrays),
        or the method cannot work with it (see :meth:`check_method`).
    """

    def __new__(cls, strategy: Strategy | None = None, *args: Any, **kwargs: Any) -> Unlearning:
        # around a strategy that aggregates with FedAvg's own rule, the wrapper is a FedAvg
        # too (aggregating through FedAvg.aggregate_train): Flower's DP accountant accepts it
        if (
            cls is Unlearning
            and isinstance(strategy, FedAvg)
            and type(strategy).aggregate_train is FedAvg.aggregate_train
        ):
            cls = UnlearningMean
        return super().__new__(cls)

    def __init__(
        self,
        strategy: Strategy,
        method: UnlearningMethod | str | None = "puf",
        *,
        client_key: str = "partition-id",
        requests: Callable[[int], Iterable[UnlearningRequest]] | None = None,
        evaluate_departed: bool = False,
        on_missing: str = "raise",
        composition: str = "auto",
        reset_server_momentum: bool = True,
        max_strikes: int = 3,
        declared_examples: Mapping[int, float] | None = None,
        diagnostics: bool = True,
        query_timeout: float = 600.0,
        max_update_norm: float | None = None,
        max_update_ratio: float | None = 100.0,
        examples_growth: float | None = 2.0,
        departing_step_bound: float | None = 10.0,
        calibrate: bool = True,
        calibration_scales: Sequence[float] = DEFAULT_SCALES,
        class_floor: float = 0.02,
        support_floor: float = 0.01,
        memorisation_z: float = 2.0,
        utility_tolerance: float = 0.05,
        utility_key: str | None = None,
        reproducible: bool = False,
        carry: Callable[[str], bool] | None = None,
    ) -> None:
        d = self.__dict__
        d["_initialising"] = True
        if isinstance(strategy, Unlearning):
            raise ValueError("the strategy is already wrapped for unlearning")
        if not isinstance(strategy, Strategy):
            raise ValueError(f"expected a Flower strategy, got {type(strategy).__name__}")
        found = I.describe(strategy)
        if isinstance(found.base, I.UNSUPPORTED):
            raise ValueError(
                f"{type(found.base).__name__} exchanges tree models, not arrays: pseudo-gradient unlearning "
                "cannot apply to it"
            )
        if on_missing not in ("raise", "skip"):
            raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)}, got {composition!r}")
        if max_strikes < 0:
            raise ValueError(f"max_strikes must be >= 0, got {max_strikes}")
        for name, bound in (
            ("max_update_norm", max_update_norm),
            ("departing_step_bound", departing_step_bound),
            ("max_update_ratio", max_update_ratio),
            ("examples_growth", examples_growth),
        ):
            if bound is not None and not (np.isfinite(bound) and bound > 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {bound!r}")
        scales = [float(c) for c in calibration_scales]
        increasing = all(b > a for a, b in zip(scales, scales[1:], strict=False))
        if not scales or scales[0] != 0 or scales[-1] > 1 or not increasing:
            raise ValueError(f"calibration_scales must increase from 0 to at most 1, got {scales}")
        if not 0 <= class_floor < 1:
            raise ValueError(f"class_floor must be in [0, 1), got {class_floor}")
        if not (np.isfinite(support_floor) and 0 <= support_floor < 1):
            raise ValueError(f"support_floor must be in [0, 1), got {support_floor!r}")
        if not (np.isfinite(memorisation_z) and memorisation_z >= 0):
            raise ValueError(f"memorisation_z must be a finite number >= 0, got {memorisation_z!r}")
        if not (np.isfinite(utility_tolerance) and utility_tolerance >= 0):
            raise ValueError(f"utility_tolerance must be a finite number >= 0, got {utility_tolerance!r}")
        self.strategy = strategy
        self.method = make_method(method) if isinstance(method, str) else method
        if self.method is not None:
            self.check_method(self.method)
        self.client_key = client_key
        self.requests_fn = requests
        self.evaluate_departed = evaluate_departed
        self.on_missing = on_missing
        self.composition = composition
        self.reset_server_momentum = reset_server_momentum
        self.max_strikes = max_strikes
        self.diagnostics = diagnostics
        self.query_timeout = query_timeout
        self.max_update_norm = max_update_norm
        self.max_update_ratio, self.examples_growth = max_update_ratio, examples_growth
        #: Node -> the largest ``num-examples`` it was accepted with (bounds the next claim).
        self.claimed: dict[int, float] = {}
        self._norms: dict[int, float] = {}
        self._scratch: dict[str, np.ndarray] = {}
        self.departing_step_bound = departing_step_bound
        self.calibrate = calibrate
        self.calibration_scales = tuple(scales)
        self.class_floor = class_floor
        self.support_floor = float(support_floor)
        self.memorisation_z = memorisation_z
        self.utility_tolerance = float(utility_tolerance)
        self.utility_key = utility_key
        self.reproducible = reproducible
        self.carry = carry if carry is not None else is_batchnorm_buffer
        #: Mean L2 norm of the clients' pseudo-gradients in the last ordinary round (one number, not history).
        self.last_update_norm: float | None = None
        #: node id -> node-config values it reported (``query.identify``), by key.
        self.identities: dict[int, dict[str, Any]] = {}
        #: node id -> the capabilities it reported (protocol version, handlers, routines).
        self.capabilities: dict[int, dict[str, Any]] = {}
        #: node id -> the most examples it may claim.
        self.declared: dict[int, float] = dict(declared_examples or {})
        #: Nodes that have left (or were never part of this federation's training).
        self.departed: set[int] = set()
        #: Nodes that deleted data and train on their retained samples only.
        self.retain_only: set[int] = set()
        self.reference: dict[str, int] = {}
        #: Nodes excluded after ``max_strikes`` invalid replies.
        self.excluded: set[int] = set()
        self.strikes: Counter[int] = Counter()
        #: Requests not started yet.
        self.queue: list[UnlearningRequest] = []
        #: Node ids of the requests being served, and the batch they form.
        self.pending: tuple[int, ...] = ()
        self._support_ahead: tuple[list[int], list[str]] | None = None
        #: The last round's evaluation node by node: ``(round, node -> metrics)`` of the usable replies.
        self.last_evaluation: tuple[int, dict[int, dict[str, float]]] | None = None
        self._batch: UnlearningRequest | None = None
        self._method: UnlearningMethod | None = None
        #: Requests whose last unlearning attempt failed because a client did not reply.
        self.failed: tuple[int, ...] = ()
        #: node id -> what its deletion request selected (``forget-n``, ``retain-n``, ``digest``).
        self.receipts: dict[int, dict[str, Any]] = {}
        self.departure_round: int | None = None
        self.current_round = 0
        self.unlearning_rounds_run = 0
        #: Diagnostics of the last unlearning round (per-layer spectra, motion shares, client metrics).
        self.unlearning_report: dict[str, Any] | None = None
        #: What happened to every node's reply in the last round (``ok`` or the problem).
        self.last_round_problems: dict[int, str] = {}
        self._grid: Grid | None = None
        self._configured: int | None = None
        self._identified = False
        self._global: dict[str, np.ndarray] | None = None
        self._round_start: dict[str, np.ndarray] | None = None
        self._unlearn_start: dict[str, np.ndarray] | None = None
        self._wire: dict[str, str] = {}
        self._moving: list[str] = []
        self._asked: dict[int, dict[str, str]] = {}
        self._sent: dict[int, Message] = {}
        self._own_type: str = MessageType.TRAIN
        self._outer_dp: Strategy | None = None
        self._min_base: dict[tuple[int, str], int] = {}
        self._min_set: dict[tuple[int, str], int] = {}
        self._rollup_pending: MetricRecord | None = None
        d["_initialising"] = False

    # -- the wrapped strategy's attributes ------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # only called for names this object lacks: they are the wrapped strategy's
        if name.startswith("__") or name in ("strategy", "_initialising"):
            raise AttributeError(name)
        inner = self.__dict__.get("strategy")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        inner = d.get("strategy")
        if (
            not d.get("_initialising", True)
            and inner is not None
            and name not in d
            and not hasattr(type(self), name)
            and hasattr(inner, name)
        ):
            setattr(inner, name, value)  # a setting of the wrapped strategy (fraction_train, min_*_nodes, ...)
            return
        object.__setattr__(self, name, value)

    def _keys(self) -> tuple[str, str, str]:
        """The wrapped strategy's weight, array and config record keys (FedAvg's defaults otherwise)."""
        base = I.describe(self.strategy).base
        return (
            str(getattr(base, "weighted_by_key", P.NUM_EXAMPLES)),
            str(getattr(base, "arrayrecord_key", "arrays")),
            str(getattr(base, "configrecord_key", "config")),
        )

    def _weight_key(self) -> str:
        return self._keys()[0]

    def _array_key(self) -> str:
        return self._keys()[1]

    # -- configuration checks ------------------------------------------------------------
    def check_method(self, method: UnlearningMethod) -> None:
        """Refuse a method the wrapped strategy cannot host.

        Raises
        ------
        ValueError
            A method that rebuilds the global model before training (NoT, MPRU, retrain,
            FedEraser) with FedAvgM's server optimizer, which keeps its own copy of the
            model and would take the rebuilt model for a pseudo-gradient; under a DP
            accountant, a method whose unlearning round only the departing clients train
            in (the accountant needs every sampled client's reply in every release).
        """
        found = I.describe(self.strategy)
        rebuilds = type(method).prepare_global is not UnlearningMethod.prepare_global
        if rebuilds and isinstance(found.base, FedAvgM) and found.base.server_opt:
            raise ValueError(
                f"method '{method.name}' replaces the global model before training, which FedAvgM's server "
                "optimizer (it keeps its own copy of the model) cannot follow; use FedAdam/FedYogi, FedAvg "
                "or FedProx, or a method that does not (puf, spectral-puf, sragu, ...)"
            )
        if found.accountant is not None and not method.remaining_clients_train:
            raise ValueError(
                f"method '{method.name}' trains only the departing clients in its unlearning round, but the DP "
                "accountant of the wrapped strategy counts every sampled client's reply in each release: use a "
                "method whose remaining clients train in that round (puf with variant='regular', fine-tune, ...)"
            )

    def _composition(self) -> str:
        if self.composition != "auto":
            return self.composition
        return "additive" if I.describe(self.strategy).aggregation in ("robust", "reweighted") else "mean"

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop (``Strategy.start``), after refusing requests it could never serve.

        Raises
        ------
        SetupError
            A queued request for a round after ``num_rounds``.
        """
        late = sorted({r.round for r in self.queue if r.round is not None and r.round > num_rounds})
        if late:
            raise SetupError(
                f"an unlearning request is due in round {late[0]}, after the last round ({num_rounds}): "
                f"it would never be served; request an earlier round or run more rounds"
            )
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    # -- helpers ---------------------------------------------------------------------------
    def _find_outer_dp(self) -> Strategy | None:
        """The Flower DP wrapper that calls this strategy, if any (``DP(Unlearning(...))``).

        Flower's DP wrappers call ``self.strategy.configure_train`` and never tell the
        strategy they wrap; the caller's frame is the only place that says so.
        """
        frame = sys._getframe(2)
        for _ in range(3):
            if frame is None:
                return None
            caller = frame.f_locals.get("self")
            if caller is not None and caller is not self and I.dp_clipping(caller):
                return caller if getattr(caller, "strategy", None) is self else None
            frame = frame.f_back  # type: ignore[assignment]
        return None

    def _dp(self) -> tuple[Strategy | None, str | None]:
        """The DP wrapper that clips this federation's updates (inside or around the wrapper) and where it clips."""
        found = I.describe(self.strategy)
        if found.dp is not None:
            return found.dp, found.dp_clipping
        if self._outer_dp is not None:
            return self._outer_dp, I.dp_clipping(self._outer_dp)
        return None, None

    def _adjust_minimums(self, also_hidden: int = 0) -> None:
        """Lower every node minimum along the DP chain by the nodes that will never take part again.

        A value changed since this wrapper last set it (``w.min_available_nodes = 5``) is
        taken as the new setting. ``also_hidden``: nodes a query of the wrapper's own leaves
        out besides (the departing ones, while the remaining clients evaluate a candidate).
        """
        gone = len(self.departed | self.excluded) + also_hidden
        slots = I.minimum_slots(self.strategy)
        if self._outer_dp is not None:
            slots += [(self._outer_dp, n) for n in I.DP_MINIMUMS if isinstance(getattr(self._outer_dp, n, None), int)]
        for obj, attr in slots:
            key = (id(obj), attr)
            current = int(getattr(obj, attr))
            if key not in self._min_set or current != self._min_set[key]:
                self._min_base[key] = current
            base = self._min_base[key]
            value = max(1, base - gone) if base > 0 else base
            setattr(obj, attr, value)
            self._min_set[key] = value

    def _hidden(self) -> set[int]:
        return self.departed | self.excluded

    def _carried(self) -> set[str]:
        """Arrays carried rather than unlearned: integer ones and those ``carry`` names."""
        return {k for k, dt in self._wire.items() if np.dtype(_numpy_dtype(dt)).kind != "f" or self.carry(k)}

    def _record(self, weights: Mapping[str, np.ndarray]) -> ArrayRecord:
        """The model as sent back out: the dtypes (bfloat16 included) and shapes of the round's model."""
        return to_record(weights, self._wire)

    # -- training ---------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's round, or the unlearning round of the pending requests."""
        outer = self._find_outer_dp()
        if outer is not None:
            self._outer_dp = outer
        self.current_round = server_round
        self._configured = server_round
        self._grid = grid
        wire = wire_dtypes(arrays)
        back = [k for k, v in wire.items() if v == "float32" and self._wire.get(k) == "bfloat16"]
        if back:
            # the strategy averaged a bfloat16 model in float32 (numpy has no bfloat16): it travels as bfloat16
            wire.update({k: "bfloat16" for k in back})
            arrays = to_record(read_weights(arrays), wire)
        self._wire = wire
        self._global = self._round_start = read_weights(arrays)
        self._moving = sorted(set(self._global) - self._carried())
        self._asked, self._sent = {}, {}
        self.failed = ()
        if not self._identified:
            self.check_identification(grid)
            self._identified = True
        if not self.pending:
            self._start_due_requests(server_round, grid, arrays)
        self._adjust_minimums()
        connected = set(grid.get_node_ids())
        if connected and connected <= self._hidden():
            raise RuntimeError(
                f"round {server_round}: every connected client has left or was excluded for invalid replies "
                f"({len(self.excluded)} excluded): nobody is left to train"
            )
        active = ActiveNodesGrid(grid, self._hidden)
        keep_last = self.method is not None and self.method.client_keeps_last_local
        if not self.is_unlearning_round(server_round):
            out = []
            for msg in self.strategy.configure_train(server_round, arrays, config, active):
                node = msg.metadata.dst_node_id
                self._own_type = msg.metadata.message_type
                extra: dict[str, Any] = {P.KEEP_LAST_LOCAL: True} if keep_last else {}
                mtype = P.TRAIN_RETAIN if node in self.retain_only else msg.metadata.message_type
                if self.reference:
                    extra, mtype = {**extra, **self.reference}, P.TRAIN_REFERENCE
                content = self._content(msg.content, arrays, config, extra) if extra else msg.content
                out.append(self._message(node, content, mtype, {"*": "retain"}))
            return out
        messages = self._configure_unlearning(server_round, arrays, config, grid, active)
        self._ride_support(grid, messages)
        return messages

    # -- aggregation ---------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, then the wrapped strategy's aggregation (ordinary round) or the method's rule.

        Called without a ``configure_train`` of the same round (a unit test, your own loop),
        the replies go to the wrapped strategy as an ordinary round.
        """
        replies = list(replies)
        if self._global is None or server_round != self._configured:
            return self.strategy.aggregate_train(server_round, replies)
        plan = self._plan(server_round, replies)
        if plan.unchecked is not None:
            return self.strategy.aggregate_train(server_round, plan.unchecked)
        if plan.direct is not None:
            metrics = None
            if plan.direct_metrics_only and plan.messages:
                _, metrics = self.strategy.aggregate_train(server_round, plan.messages)
            return plan.direct, _merge(metrics, plan.rollup)
        if not plan.messages:
            return None, plan.rollup
        arrays, metrics = self.strategy.aggregate_train(server_round, plan.messages)
        if arrays is not None and not plan.unlearning and not finite(arrays):
            log(WARNING, "round %s: the aggregate is not finite; the global model is kept", server_round)
            return None, _merge(metrics, plan.rollup)
        if plan.correction is not None and arrays is not None:
            arrays = self._add(arrays, plan.correction)
        if arrays is not None:
            arrays = self._recode(arrays)
        if plan.unlearning and arrays is None:
            raise RuntimeError(f"{type(self.strategy).__name__} aggregated nothing in the unlearning round")
        return arrays, _merge(metrics, plan.rollup)

    # -- evaluation -----------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation of the nodes still in the federation (+ departed ones if asked)."""
        self._adjust_minimums()
        active = ActiveNodesGrid(grid, self._hidden)
        msgs = list(self.strategy.configure_evaluate(server_round, arrays, config, active))
        if self.evaluate_departed:
            template = msgs[0].content if msgs else None
            connected = set(grid.get_node_ids())
            for node in sorted((self.departed - self.excluded) & connected):
                content = (
                    template
                    if template is not None
                    else self._content(None, arrays, config, {P.SERVER_ROUND: server_round})
                )
                msgs.append(Message(content, node, MessageType.EVALUATE))
        return msgs

    def _aggregate_evaluation(self, server_round: int, replies: list[Message]) -> dict[str, float]:
        return evaluation_means(replies, self._weight_key(), lambda n: n in self.departed or n in self.pending)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The wrapped strategy's aggregate of the active nodes' metrics, plus the federation roll-up.

        When replies carry the per-part measurements of :func:`fed_unlearn.evaluation.measure_client`
        (the helpers' evaluation), their roll-up (:func:`fed_unlearn.evaluation.summarise`:
        ``test-acc``, ``forget-acc``, ...) is added over every replying node, departed ones
        included; keys the wrapped strategy produced are never replaced. Replies whose metric
        keys differ from those of most replies are left out (logged), as are failed ones.
        """
        from ..evaluation import summarise

        replies = list(replies)
        if server_round != self._configured:
            return self.strategy.aggregate_evaluate(server_round, replies)
        weight_key = self._weight_key()
        ok = []
        for r in replies:
            if r.has_error():
                log(
                    WARNING,
                    "evaluation failed on node %s: %s",
                    r.metadata.src_node_id,
                    client_failure(r.error.reason or ""),
                )
            else:
                ok.append(r)
        only = {id(r): next(iter(recs.values())) for r in ok if len(recs := metric_records(r.content)) == 1}
        usable = [r for r in ok if id(r) in only and isinstance(only[id(r)].get(weight_key), (int, float))]
        active = [r for r in usable if r.metadata.src_node_id not in self.departed]
        keysets = [frozenset(only[id(r)].keys()) for r in active]
        keys = majority_keys(keysets)
        if keys is not None:
            odd = [r for r, ks in zip(active, keysets, strict=True) if ks != keys]
            for r in odd:
                log(
                    WARNING,
                    "evaluation of node %s left out: its metric keys differ from the round's %s",
                    r.metadata.src_node_id,
                    sorted(keys),
                )
            active = [r for r, ks in zip(active, keysets, strict=True) if ks == keys]
        if self.reproducible:
            active.sort(key=lambda r: (self.client_id(r.metadata.src_node_id), r.metadata.src_node_id))
        metrics: MetricRecord | None = self.strategy.aggregate_evaluate(server_round, active) if active else None
        by_node = {r.metadata.src_node_id: metric_dict(only[id(r)]) for r in usable}
        self.last_evaluation = (server_round, by_node)
        evals = {self.client_id(n): m for n, m in by_node.items()}
        parts = {c: e for c, e in evals.items() if "forget-n" in e}
        if not parts:
            return metrics
        summary = {k: float(v) for k, v in summarise(parts).items() if np.isfinite(v)}
        return _merge(metrics, MetricRecord(dict(summary)))

    def summary(self) -> None:
        """Log the wrapped strategy's summary and the unlearning settings."""
        self.strategy.summary()
        log(
            INFO,
            "\t├──> Unlearning: method %s, clients named by '%s', %s composition",
            self.method.name if self.method else "(per request)",
            self.client_key,
            self._composition(),
        )
        if self.queue or self.pending:
            log(INFO, "\t└──> Requests: %d queued, nodes %s being served", len(self.queue), list(self.pending))


class UnlearningMean(Unlearning, FedAvg):
    """:class:`Unlearning` around a strategy that aggregates with FedAvg's own rule (FedAvg, FedProx).

    ``Unlearning(FedAvg(...))`` is one of these. It aggregates through
    ``FedAvg.aggregate_train`` itself, on the replies the unlearning wrapper chose (the
    checked replies; in an unlearning round, plus one per departing client so that their
    weighted mean is the unlearned model), so Flower's DP wrappers accept it where they
    require FedAvg's aggregation (their accountant).
    """

    aggregate_train = FedAvg.aggregate_train
    _mean_rule = True

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """The replies FedAvg's rule averages: the wrapper's choice for a configured training round."""
        replies = list(replies)
        inner = cast(FedAvg, self.strategy)
        if not is_train or self._global is None or self._configured != self.current_round:
            return inner._check_and_log_replies(replies, is_train, validate)
        plan = self._plan(self.current_round, replies)
        self._rollup_pending = plan.rollup
        if plan.unchecked is not None:
            return inner._check_and_log_replies(plan.unchecked, is_train, validate)
        if plan.direct is not None:
            # the model as it is: one reply carrying it (its mean is itself)
            weight_key, akey, _ = self._keys()
            origin = replies[0] if replies else None
            if origin is None:
                return [], []
            content = RecordDict({akey: plan.direct, "metrics": MetricRecord({weight_key: 1})})
            return [with_content(origin, content)], []
        msgs = plan.messages
        if plan.correction is not None:  # an additive plan cannot occur around FedAvg's mean; never silently
            raise RuntimeError("additive composition around a plain mean")
        valid, errors = inner._check_and_log_replies(msgs, is_train, validate)
        if plan.unlearning and not valid:
            raise RuntimeError("FedAvg aggregated nothing in the unlearning round")
        return valid, errors

    @property
    def train_metrics_aggr_fn(self) -> Callable[[list[RecordDict], str], MetricRecord]:
        """The wrapped strategy's metric aggregation, plus the wrapper's roll-up."""
        fn = cast(FedAvg, self.strategy).train_metrics_aggr_fn

        def aggregate(records: list[RecordDict], key: str) -> MetricRecord:
            metrics = fn(records, key)
            extra, self._rollup_pending = self._rollup_pending, None
            merged = _merge(metrics, extra)
            return merged if merged is not None else MetricRecord()

        return aggregate

    @train_metrics_aggr_fn.setter
    def train_metrics_aggr_fn(self, fn: Callable[[list[RecordDict], str], MetricRecord]) -> None:
        cast(FedAvg, self.strategy).train_metrics_aggr_fn = fn


class UnlearningFedAvg(UnlearningMean):
    """FedAvg with unlearning: takes every FedAvg argument, plus :class:`Unlearning`'s.

    ``UnlearningFedAvg(fraction_train=0.5, min_available_nodes=10, method="puf")`` is
    ``Unlearning(FedAvg(fraction_train=0.5, min_available_nodes=10), method="puf")``.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        *,
        method: UnlearningMethod | str | None = "puf",
        **unlearning: Any,
    ) -> None:
        inner = FedAvg(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        super().__init__(inner, method, **unlearning)


def _numpy_dtype(wire: str) -> str:
    """A wire dtype as numpy knows it (bfloat16 is a float)."""
    return "float32" if wire == "bfloat16" else wire


def _merge(first: MetricRecord | None, extra: MetricRecord | None) -> MetricRecord | None:
    """``first`` with the keys of ``extra`` it does not have (never replacing one)."""
    if first is None:
        return extra
    if extra is None:
        return first
    out = MetricRecord(dict(first))
    for k, v in extra.items():
        if k not in out:
            out[k] = v
    return out
