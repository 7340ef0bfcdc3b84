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
  aggregation (:mod:`fed_unlearn.flower.inner` says how): as one more reply of a weighted
  mean (FedAvg, FedProx; a server optimizer then applies it like any pseudo-gradient, its
  first moment reset so momentum built from the departed client's past updates is not
  replayed), or added to the aggregate of the remaining replies (robust aggregators,
  QFedAvg). Under one of Flower's DP wrappers, in either order, the step enters the
  release as one client's update: clipped to the clipping norm and noised like any, so the
  accountant's epsilon covers the departing clients too (the log says how much the clip
  shortened it).
* **Checked replies.** Every reply is checked against what was sent
  (:mod:`fed_unlearn.flower.replies`); a bad one costs its node that round, never the
  round, and ``max_strikes`` bad replies exclude the node. A node that has left is hidden
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
from ..aggregation import ClientUpdate, InvalidUpdateError, fedavg, is_batchnorm_buffer, validate_update
from ..calibration import DEFAULT_SCALES, target_for
from ..spectral import analyze, motion_share
from ..unlearning import UnlearningMethod, make_method
from . import inner as I
from .grid import ActiveNodesGrid
from .records import metric_dict, to_record, to_weights, wire_dtypes, with_content
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
from .reproducible import ReproducibleFedAvg
from .requests import RequestBook, SetupError, UnlearningRequest, client_failure
from .stepping import StepControl, clip_update, evaluation_means, update_norm

COMPOSITIONS = ("auto", "mean", "additive")

__all__ = ["ReproducibleFedAvg", "SetupError", "Unlearning", "UnlearningFedAvg", "UnlearningRequest"]


def _finite(arrays: ArrayRecord) -> bool:
    """Whether every floating-point value of ``arrays`` is finite."""
    values = [np.asarray(a) for a in to_weights(arrays).values()]
    return all(bool(np.isfinite(a).all()) for a in values if np.issubdtype(a.dtype, np.inexact))


class _Reply:
    """A checked reply, split by role."""

    __slots__ = ("node", "retain", "forget", "own")

    def __init__(self, node: int, own: bool) -> None:
        self.node = node
        self.retain: Checked | None = None
        self.forget: Checked | None = None
        self.own = own  # a reply to the wrapped strategy's own message type


class Unlearning(RequestBook, StepControl, Strategy):
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
        The forget accuracy that counts as "the class is gone" when a class is deleted.
    memorisation_z : float
        Unless the forgetting clients' forget set is more member-like than their held-out
        data by more than this many standard errors (the loss-threshold attack's AUC, or the
        accuracy; for a class: unless the model still predicts it), nothing was memorised
        and the pre-request model is kept.
    utility_tolerance : float
        The utility bound's tolerance: the remaining clients' evaluation loss may rise by
        this fraction of its value without the step.
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
        self.identify_timeout = query_timeout
        self.max_update_norm = max_update_norm
        self.max_update_ratio, self.examples_growth = max_update_ratio, examples_growth
        #: Node -> the largest ``num-examples`` it was accepted with (bounds the next claim).
        self.claimed: dict[int, float] = {}
        self._norms: dict[int, float] = {}
        self.departing_step_bound = departing_step_bound
        self.calibrate = calibrate
        self.calibration_scales = tuple(scales)
        self.class_floor = class_floor
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

    def _message(self, node: int, content: RecordDict, mtype: str, asked: dict[str, str]) -> Message:
        msg = Message(content, node, mtype)
        self._asked[node] = asked
        self._sent[node] = msg
        return msg

    def _content(
        self, template: RecordDict | None, arrays: ArrayRecord, config: ConfigRecord, extra: Mapping[str, Any]
    ) -> RecordDict:
        """A fresh RecordDict: the template's records (or arrays + config) with ``extra`` config keys."""
        _, akey, ckey = self._keys()
        if template is None:
            return RecordDict({akey: arrays, ckey: ConfigRecord({**dict(config), **extra})})
        records: dict[str, Any] = {}
        for k, rec in template.items():
            if isinstance(rec, ConfigRecord) and k == ckey:
                records[k] = ConfigRecord({**dict(rec), **extra})
            elif isinstance(rec, ArrayRecord) and k == akey:
                records[k] = arrays
            else:
                records[k] = rec
        if ckey not in records:
            records[ckey] = ConfigRecord(dict(extra))
        return RecordDict(records)

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
            arrays = to_record(to_weights(arrays), wire)
        self._wire = wire
        self._global = self._round_start = to_weights(arrays)
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
        return self._configure_unlearning(server_round, arrays, config, grid, active)

    def _configure_unlearning(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, active: Grid
    ) -> list[Message]:
        method, batch = self._method, self._batch
        if method is None or batch is None or self._global is None:
            raise RuntimeError("unlearning round without a request being served")
        if self.unlearning_rounds_run == 0:
            self._unlearn_start = self._global
            method.begin([self.client_id(n) for n in self.pending], batch.leave, batch.deletion)
        # a method may transform the model it sends out (NoT negates layers, FedEraser and
        # retrain rebuild from the initial model); replies are pseudo-gradients against it
        prepared = method.prepare_global(self._global)
        if prepared is not self._global:
            validate_update(prepared, self._global, f"method {method.name}")
            self._global = {k: np.asarray(v) for k, v in prepared.items()}
            arrays = self._record(self._global)
        template_msgs = list(self.strategy.configure_train(server_round, arrays, config, active))
        template = template_msgs[0].content if template_msgs else None
        if template_msgs:
            self._own_type = template_msgs[0].metadata.message_type
        connected = set(grid.get_node_ids())
        pending = set(self.pending)
        messages: list[Message] = []
        retain_extra = method.remaining_config()
        if method.remaining_clients_train:
            for msg in template_msgs:
                node = msg.metadata.dst_node_id
                if node in pending:
                    continue
                mtype = P.TRAIN_RETAIN if node in self.retain_only else msg.metadata.message_type
                content = self._content(msg.content, arrays, config, retain_extra) if retain_extra else msg.content
                messages.append(self._message(node, content, mtype, {"*": "retain"}))
        if method.departing_clients_train:
            # a client that leaves forgets all its data: say so (it needs no deletion request of its own)
            scenario = (
                batch.deletion.scenario if batch.deletion is not None else ("client" if batch.leave else "samples")
            )
            forget_extra = {
                **({P.FORGET_ALL: True} if batch.leave else {}),
                P.TARGET: target_for(scenario),
                P.FLOOR: self.class_floor,
                **batch.extra_config,
                **method.departing_config(self._global),
            }
            for node in sorted(pending):
                if node not in connected:
                    continue  # no reply: handled as missing in aggregate_train
                retain = method.remaining_clients_train and not batch.leave
                if batch.leave and method.departing_task == "train":
                    # a departing client's PUF round is an ordinary training round on all its data
                    messages.append(
                        self._message(
                            node, self._content(template, arrays, config, {}), self._own_type, {"*": "forget"}
                        )
                    )
                    continue
                extra = {**forget_extra, P.ROLES_KEY: "retain,forget" if retain else "forget"}
                if retain:
                    extra = {**retain_extra, **extra}
                asked = {P.ROLE_KEYS["forget"][0]: "forget", **({P.ROLE_KEYS["retain"][0]: "retain"} if retain else {})}
                messages.append(
                    self._message(node, self._content(template, arrays, config, extra), P.TRAIN_UNLEARN, asked)
                )
        elif not batch.leave and method.remaining_clients_train:
            # the requesting clients stay: they train on their retained data in the round
            for node in sorted(pending & connected):
                if node not in self._asked:
                    messages.append(
                        self._message(
                            node, self._content(template, arrays, config, retain_extra), P.TRAIN_RETAIN, {"*": "retain"}
                        )
                    )
        n_forget = sum("forget" in k.values() for k in self._asked.values())
        log(
            INFO,
            "configure_train: unlearning round %d/%d, %s clients (%s with a forget role)",
            self.unlearning_rounds_run + 1,
            method.num_rounds,
            len(messages),
            n_forget,
        )
        return messages

    # -- replies -----------------------------------------------------------------------------
    def _check(self, reply: Message) -> tuple[_Reply | None, str | None, bool]:
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
        out = _Reply(node, own=sent is not None and sent.metadata.message_type == self._own_type)
        content = reply.content
        if "*" in asked:  # a plain training reply: one ArrayRecord, one MetricRecord
            try:
                akey, mkey = training_records(reply)
            except StructureError as exc:
                return None, str(exc), True
            roles = {asked["*"]: (akey, mkey)}
        else:
            metric_of = {a: m for a, m in P.ROLE_KEYS.values()}
            expected = set(asked) | {metric_of[a] for a in asked}
            got = set(content.array_records) | set(content.metric_records)
            if got != expected:
                return (
                    None,
                    f"a {P.TRAIN_UNLEARN} reply needs exactly the records {sorted(expected)}, got {sorted(got)}",
                    False,
                )
            roles = {role: (akey, metric_of[akey]) for akey, role in asked.items()}
        weight_key = self._weight_key()
        moving = self._moving

        def clip(w: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
            if self.max_update_norm is None or self._global is None:
                return None
            return clip_update(w, self._global, self.max_update_norm, moving)

        for role, (akey, mkey) in roles.items():
            if mkey not in content.metric_records or akey not in content.array_records:
                return None, f"its reply lacks the records '{akey}' / '{mkey}'", True
            try:
                checked, notes = check_role(
                    reply, akey, mkey, self._global, weight_key, self.client_id(node),
                    examples_cap(self.declared.get(node), self.claimed.get(node), self.examples_growth),
                    clip, keep_others="*" in asked,
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

    def _collect(self, replies: Sequence[Message]) -> tuple[list[_Reply], bool]:
        """Checked replies (arrival order, or client order with ``reproducible``); whether to hand all over unchecked.

        When no reply is usable and every one failed on its structure (the app's own reply
        format, e.g. two ArrayRecords), the wrapped strategy gets them as they are and
        decides as stock Flower does.
        """
        parsed: list[_Reply] = []
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
            holders = [c for c in own if c.metric_keys == keys]
            ordered = list(holders[0].message.content.metric_records[holders[0].metric_key].keys())
            means = weighted_means(holders, self._weight_key())
            for p in parsed:
                if not p.own and p.retain is not None and p.retain.metric_keys != keys:
                    p.retain = harmonise(p.retain, ordered, means)
        self._drop_outliers(parsed)
        for p in parsed:
            if p.retain is not None:
                self.claimed[p.node] = max(self.claimed.get(p.node, 0.0), float(p.retain.update.num_examples))
        if self.reproducible:
            parsed.sort(key=lambda p: (self.client_id(p.node), p.node))
        return parsed, False

    def _drop_outliers(self, parsed: list[_Reply]) -> None:
        """Strike the replies whose update dwarfs the others' (:func:`update_outliers`); keeps the round's norms."""
        self._norms = {
            p.node: update_norm(p.retain.update.weights, self._global, self._moving)
            for p in parsed
            if p.retain is not None and self._global is not None
        }
        if self.max_update_ratio is None:
            return
        still = len(self._norms) < 3 or float(np.median(list(self._norms.values()))) == 0.0
        g = self._global
        size = update_norm(g, {k: np.zeros_like(v) for k, v in g.items()}, self._moving) if g and still else None
        for node, problem in update_outliers(self._norms, self.max_update_ratio, self.last_update_norm, size).items():
            self.last_round_problems[node] = problem
            self._strike(node, problem)
            parsed[:] = [p for p in parsed if p.node != node]
            del self._norms[node]

    def _rollup(self, parsed: Sequence[_Reply]) -> MetricRecord:
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
        if arrays is not None and not plan.unlearning and not _finite(arrays):
            log(WARNING, "round %s: the aggregate is not finite; the global model is kept", server_round)
            return None, _merge(metrics, plan.rollup)
        if plan.correction is not None and arrays is not None:
            arrays = self._add(arrays, plan.correction)
        if arrays is not None:
            arrays = self._recode(arrays)
        if plan.unlearning and arrays is None:
            raise RuntimeError(f"{type(self.strategy).__name__} aggregated nothing in the unlearning round")
        return arrays, _merge(metrics, plan.rollup)

    def _add(self, arrays: ArrayRecord, correction: Mapping[str, np.ndarray]) -> ArrayRecord:
        """The wrapped strategy's aggregate plus the unlearning correction, in the aggregate's dtypes."""
        got = to_weights(arrays)
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
        recoded = to_record({k: to_weights(ArrayRecord({k: arrays[k]}))[k] for k in bf16}, self._wire)
        out.update(recoded.items())
        return ArrayRecord(array_dict=out)

    def _plan(self, server_round: int, replies: list[Message]) -> _Plan:
        """What goes to the wrapped strategy this round (see :class:`_Plan`)."""
        parsed, unchecked = self._collect(replies)
        rollup = self._rollup(parsed)
        if unchecked:
            return _Plan(unchecked=replies, rollup=rollup)
        bf16 = any(v == "bfloat16" for v in self._wire.values())
        retain = [p.retain for p in parsed if p.retain is not None and p.node not in self.departed]
        retain_updates = [c.update for c in retain]
        retain_msgs = [c.message for c in retain]
        if not self.is_unlearning_round(server_round):
            if not retain:
                log(WARNING, "aggregate_train: no valid replies in round %s; global model unchanged", server_round)
                return _Plan(rollup=rollup)
            if self.method is not None and self._round_start is not None:
                self.method.observe(server_round, self._round_start, retain_updates)
            if self._global is not None:
                kept = [self._norms[p.node] for p in parsed if p.node in self._norms and p.node not in self.departed]
                self.last_update_norm = float(np.mean(kept)) if kept else None
            return _Plan(messages=retain_msgs, rollup=rollup, recode=bf16)
        return self._plan_unlearning(server_round, parsed, retain, rollup)

    def _plan_unlearning(
        self, server_round: int, parsed: list[_Reply], retain: list[Checked], rollup: MetricRecord
    ) -> _Plan:
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
            return _Plan(messages=retain_msgs, rollup=rollup, recode=True)
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
    ) -> _Plan:
        """How the unlearning round's model enters the wrapped strategy (module docstring)."""
        start = self._global
        if start is None:
            raise RuntimeError("no round in progress")
        if kept:
            # nothing memorised: the pre-request model stands, the wrapped strategy's state untouched
            return _Plan(direct=self._record(new), rollup=rollup)
        if self.reset_server_momentum and self.unlearning_rounds_run == 0 and I.reset_server_momentum(self.strategy):
            log(INFO, "the server optimizer's momentum was reset for the unlearning round")
        found = I.describe(self.strategy)
        dp, where = self._dp()
        retain_msgs = [c.message for c in retain]
        retain_updates = [c.update for c in retain]
        if found.aggregation == "mean" and dp is None and not isinstance(self, UnlearningMean):
            return _Plan(messages=retain_msgs, direct_metrics_only=True, direct=self._record(new), rollup=rollup)
        if self._composition() == "additive":
            if not retain_msgs:
                return _Plan(direct=self._record(new), rollup=rollup)
            mean = fedavg(retain_updates)
            correction = {k: np.asarray(new[k], np.float64) - np.asarray(mean[k], np.float64) for k in self._moving}
            dp_info = None
            if dp is not None:
                n_rem = float(sum(u.num_examples for u in retain_updates))
                n_syn = float(sum(u.num_examples for u in forget)) or n_rem
                correction, dp_info = self._dp_bound(correction, dp, where, n_syn / (n_rem + n_syn))
            return _Plan(messages=retain_msgs, correction=correction, rollup=rollup, unlearning=True, dp=dp_info)
        synthetic, dp_info = self._synthetic_replies(new, retain, forget, dp, where)
        return _Plan(messages=[*retain_msgs, *synthetic], rollup=rollup, recode=True, unlearning=True, dp=dp_info)

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

    def _diagnose(self, server_round: int, new: dict[str, np.ndarray], parsed: Sequence[_Reply]) -> dict[str, Any]:
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

    def _evaluate_template(self, grid: Grid, arrays: ArrayRecord) -> list[Message]:
        """The wrapped strategy's evaluation messages to the remaining clients (the utility bound's)."""
        hidden = self._hidden() | set(self.pending)
        active = ActiveNodesGrid(grid, lambda: hidden)
        self._adjust_minimums(also_hidden=len(set(self.pending) - self._hidden()))
        try:
            return list(self.strategy.configure_evaluate(self.current_round, arrays, ConfigRecord(), active))
        finally:
            self._adjust_minimums()

    def _with_arrays(self, messages: Sequence[Message], arrays: ArrayRecord) -> list[Message]:
        """Copies of ``messages`` (same nodes, types and records) carrying ``arrays``."""
        _, akey, _ = self._keys()
        out = []
        for m in messages:
            records = {k: (arrays if isinstance(r, ArrayRecord) and k == akey else r) for k, r in m.content.items()}
            out.append(Message(RecordDict(records), m.metadata.dst_node_id, m.metadata.message_type))
        return out

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
        usable = [
            r
            for r in ok
            if len(r.content.metric_records) == 1
            and isinstance(next(iter(r.content.metric_records.values())).get(weight_key), (int, float))
        ]
        active = [r for r in usable if r.metadata.src_node_id not in self.departed]
        keysets = [frozenset(next(iter(r.content.metric_records.values())).keys()) for r in active]
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
        evals = {
            self.client_id(r.metadata.src_node_id): metric_dict(next(iter(r.content.metric_records.values())))
            for r in usable
        }
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


class _Plan:
    """What a round hands the wrapped strategy.

    ``messages`` to aggregate (checked replies, plus synthetic ones in a mean-composed
    unlearning round); or ``direct``: the round's model as it is (the wrapped strategy's
    aggregation is still run for its metrics when ``direct_metrics_only``); or
    ``unchecked``: the raw replies, for the strategy to judge. ``correction`` is added to
    the strategy's aggregate (additive composition); ``recode`` writes the aggregate back
    in the round's dtypes (bfloat16).
    """

    __slots__ = (
        "messages",
        "direct",
        "direct_metrics_only",
        "unchecked",
        "correction",
        "rollup",
        "recode",
        "unlearning",
        "dp",
    )

    def __init__(
        self,
        messages: list[Message] | None = None,
        direct: ArrayRecord | None = None,
        direct_metrics_only: bool = False,
        unchecked: list[Message] | None = None,
        correction: dict[str, np.ndarray] | None = None,
        rollup: MetricRecord | None = None,
        recode: bool = False,
        unlearning: bool = False,
        dp: dict[str, Any] | None = None,
    ) -> None:
        self.messages = messages or []
        self.direct = direct
        self.direct_metrics_only = direct_metrics_only
        self.unchecked = unchecked
        self.correction = correction
        self.rollup = rollup
        self.recode = recode
        self.unlearning = unlearning
        self.dp = dp


class UnlearningMean(Unlearning, FedAvg):
    """:class:`Unlearning` around a strategy that aggregates with FedAvg's own rule (FedAvg, FedProx).

    ``Unlearning(FedAvg(...))`` is one of these. It aggregates through
    ``FedAvg.aggregate_train`` itself, on the replies the unlearning wrapper chose (the
    checked replies; in an unlearning round, plus one per departing client so that their
    weighted mean is the unlearned model), so Flower's DP wrappers accept it where they
    require FedAvg's aggregation (their accountant).
    """

    aggregate_train = FedAvg.aggregate_train

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
