"""Unlearning as a wrapper around the strategy a Flower federation already has.

``Unlearning(strategy, method="puf")`` behaves exactly like ``strategy`` (FedAvg, FedProx,
FedAdam, FedTrimmedAvg, ...) in every ordinary round: the wrapped strategy samples the
nodes, builds the messages and aggregates the replies, bit for bit. The wrapper adds three
things:

* **Departures at run time.** :meth:`Unlearning.request_unlearning` (before or during
  ``start()``), or a ``requests`` callback consulted every round, names the clients to
  forget by node id or by a node-config key (``partition-id``, ``site``, ...). Names are
  resolved with one small query (``query.identify``, :mod:`fed_unlearn.protocol`) sent
  only to nodes not identified yet; node ids are never guessed from their order.
* **The unlearning round.** The configured method decides who trains and how the
  replies combine (:mod:`fed_unlearn.unlearning`). The result enters the wrapped
  strategy's own aggregation as a reply, so a server optimizer (FedAdam, FedYogi,
  FedAvgM) applies PUF's negated pseudo-gradient like any other one; its first moment is
  reset in that round so that momentum built from the departed client's past updates is
  not replayed. With a robust aggregator (FedMedian, FedTrimmedAvg, Krum, MultiKrum,
  Bulyan) the remaining clients' replies are aggregated robustly and the method's
  correction is added to the result.
* **After it.** A node that has left is hidden from the wrapped strategy's sampling
  (its minimum node counts drop accordingly) and is sent nothing, unless
  ``evaluate_departed`` asks for its evaluation; a node that deleted some samples is
  sent ``train.retain`` instead of ``train``. Every reply is validated (names, shapes,
  dtype, finite values, a positive ``num-examples`` within what the node declared); an
  invalid one costs its node that round, never the round, and ``max_strikes`` invalid
  replies exclude the node.

The unlearning math is pure NumPy in :mod:`fed_unlearn.unlearning`; this module only moves
records. No state beyond what a normal round needs is kept: the model of the current
round, who has left, who trains on retained data only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from types import EllipsisType
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from .. import protocol as P
from ..aggregation import ClientUpdate, InvalidUpdateError, fedavg, validate_update
from ..calibration import DEFAULT_SCALES, Calibration, choose_scale, memorisation, pooled, target_for
from ..deletion import DeletionRequest
from ..spectral import analyze, motion_share
from ..unlearning import UnlearningMethod, make_method
from .grid import ActiveNodesGrid
from .records import metric_dict, number, to_record, to_weights, with_content

#: Strategies that aggregate robustly: the method's correction is added after their aggregation.
ROBUST_AGGREGATORS: tuple[type, ...] = (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan)
#: Strategies whose models are not arrays: unlearning by pseudo-gradients cannot apply.
UNSUPPORTED: tuple[type, ...] = (FedXgbBagging, FedXgbCyclic)
COMPOSITIONS = ("auto", "mean", "additive")


@dataclass(frozen=True)
class UnlearningRequest:
    """One deletion request the strategy serves.

    Attributes
    ----------
    clients : tuple
        Who asks: values of the node-config key ``key`` (compared as text), or node ids
        when ``key`` is ``None``.
    key : str or None
        The node-config key naming the clients (``partition-id``, ``site``, ...).
    round : int or None
        Serve it from this server round (``None``: the next round).
    leave : bool
        The clients leave the federation (their whole data is forgotten). ``False``: they
        deleted some samples (or a class) and stay, training on the rest afterwards; their
        nodes must answer :data:`~fed_unlearn.protocol.TRAIN_UNLEARN` and
        :data:`~fed_unlearn.protocol.TRAIN_RETAIN` (``fed_unlearn.flower.add_unlearning``).
    deletion : DeletionRequest, optional
        What is deleted (a class-unlearning method reads the class from it).
    joint : bool
        One request spread over the clients (a class removed from every client) rather
        than one request each.
    method : UnlearningMethod, optional
        Serve this request with another method than the strategy's (a service's fallback).
    extra_config : Mapping
        Sent with every forget-role instruction of the request.
    send_request : bool
        For a deletion where the clients stay (``leave=False`` with ``deletion``): send them
        the deletion request (:data:`~fed_unlearn.protocol.FORGET`) with the current model
        when the request starts, so that each selects the samples to forget on its own data.
        ``False`` when it already reached them.
    """

    clients: tuple[Any, ...]
    key: str | None = "partition-id"
    round: int | None = None
    leave: bool = True
    deletion: DeletionRequest | None = None
    joint: bool = False
    method: UnlearningMethod | None = None
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    send_request: bool = True


class ReproducibleFedAvg(FedAvg):
    """FedAvg whose model average is accumulated in float64, in the order the replies are given.

    Flower's FedAvg sums float32 arrays in arrival order, which varies between runs; the
    :class:`Unlearning` wrapper hands replies over in a fixed client order, so with this
    strategy the same seed gives the same numbers to the last bit. Takes FedAvg's arguments.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the replies' arrays in float64 (cast back to their dtype); metrics as FedAvg."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        updates = []
        for i, msg in enumerate(valid):
            n = next(iter(msg.content.metric_records.values()))[self.weighted_by_key]
            updates.append(ClientUpdate(i, to_weights(next(iter(msg.content.array_records.values()))), n))  # type: ignore[arg-type]
        arrays = to_record(fedavg(updates))
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


def _is_plain_mean(strategy: Strategy) -> bool:
    """Whether the strategy's new model is the example-weighted mean of the replies (FedAvg, FedProx)."""
    agg = type(strategy).aggregate_train
    return agg in (FedAvg.aggregate_train, ReproducibleFedAvg.aggregate_train)


def _reset_server_momentum(strategy: Strategy) -> bool:
    """Drop a server optimizer's first moment (FedOpt family, FedAvgM); whether there was one."""
    if isinstance(strategy, FedOpt):
        had = bool(strategy.m_t)
        strategy.m_t = None
        return had
    if isinstance(strategy, FedAvgM):
        had = strategy.momentum_vector is not None
        strategy.momentum_vector = None
        return had
    return False


@dataclass
class _Parsed:
    """A validated reply, split by role."""

    node: int
    retain: Message | None = None
    retain_update: ClientUpdate | None = None
    forget_update: ClientUpdate | None = None


class Unlearning(Strategy):
    """Add federated unlearning to any Flower strategy.

    Parameters
    ----------
    strategy : Strategy
        The strategy the federation uses (a ``flwr.serverapp.strategy`` strategy derived
        from FedAvg, or your own). It runs every ordinary round unchanged.
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
        to its aggregate of the remaining replies (robust aggregators); ``auto`` chooses.
    reset_server_momentum : bool
        Reset the wrapped server optimizer's first moment in the unlearning round.
    max_strikes : int
        Invalid replies after which a node is excluded from the federation (0 = never).
    declared_examples : Mapping[int, int], optional
        Node id -> the most examples it may claim (``num-examples`` above it is capped);
        also settable with :meth:`declare_examples`.
    diagnostics : bool
        Record per-layer spectra and motion shares of every unlearning round.
    query_timeout : float
        Seconds to wait for the replies of the strategy's own queries (identify, deletion request).
    max_update_norm : float, optional
        Clip every reply's pseudo-gradient ``w_k - w`` to this L2 norm before aggregation
        (off by default: exact FedAvg).
    departing_step_bound : float, optional
        In an unlearning round driven by the departing clients' replies, the step they cause
        (the new model minus the remaining clients' plain average) is scaled down to at most
        this many times the remaining clients' mean update norm (this round's, or the last
        ordinary round's), so a malicious departing client cannot throw the model anywhere.
        ``None`` turns the bound off.
    calibrate : bool
        Scale the unlearning step so that the forget set ends up looking like data the model
        never saw, as measured by the forgetting clients on their own data
        (:mod:`fed_unlearn.calibration`; needs ``query.calibrate``, i.e. the client helpers —
        a client without them gets the method's full step). When even the full step falls short
        of the target without moving away from it (an ascent step that barely starts), doubling
        multiples of it are tried, up to the departing-step bound.
    calibration_scales : sequence of float
        The candidate fractions of the step, increasing from 0 to at most 1.
    class_floor : float
        The forget accuracy that counts as "the class is gone" when a class is deleted.
    memorisation_z : float
        The forgetting clients first measure the pre-request model: unless their forget
        mean loss is below their held-out mean loss by more than this many standard errors
        (or, for a class, the model still predicts it), nothing was memorised and the
        pre-request model is kept.

    Raises
    ------
    ValueError
        If the wrapped strategy cannot host unlearning (XGBoost models are not arrays),
        or the method cannot work with it (see :meth:`check_method`).
    """

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
        declared_examples: Mapping[int, int] | None = None,
        diagnostics: bool = True,
        query_timeout: float = 600.0,
        max_update_norm: float | None = None,
        departing_step_bound: float | None = 10.0,
        calibrate: bool = True,
        calibration_scales: Sequence[float] = DEFAULT_SCALES,
        class_floor: float = 0.02,
        memorisation_z: float = 1.0,
    ) -> None:
        if isinstance(strategy, Unlearning):
            raise ValueError("the strategy is already wrapped for unlearning")
        if isinstance(strategy, UNSUPPORTED):
            raise ValueError(
                f"{type(strategy).__name__} exchanges tree models, not arrays: pseudo-gradient unlearning "
                "cannot apply to it"
            )
        if on_missing not in ("raise", "skip"):
            raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)}, got {composition!r}")
        if max_strikes < 0:
            raise ValueError(f"max_strikes must be >= 0, got {max_strikes}")
        for name, bound in (("max_update_norm", max_update_norm), ("departing_step_bound", departing_step_bound)):
            if bound is not None and not (np.isfinite(bound) and bound > 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {bound!r}")
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
        self.departing_step_bound = departing_step_bound
        scales = [float(c) for c in calibration_scales]
        increasing = all(b > a for a, b in zip(scales, scales[1:], strict=False))
        if not scales or scales[0] != 0 or scales[-1] > 1 or not increasing:
            raise ValueError(f"calibration_scales must increase from 0 to at most 1, got {scales}")
        if not 0 <= class_floor < 1:
            raise ValueError(f"class_floor must be in [0, 1), got {class_floor}")
        self.calibrate = calibrate
        self.calibration_scales = tuple(scales)
        self.class_floor = class_floor
        if not (np.isfinite(memorisation_z) and memorisation_z >= 0):
            raise ValueError(f"memorisation_z must be a finite number >= 0, got {memorisation_z!r}")
        self.memorisation_z = memorisation_z
        self._grid: Grid | None = None
        #: Mean L2 norm of the clients' pseudo-gradients in the last ordinary round (one number, not history).
        self.last_update_norm: float | None = None
        self.arrayrecord_key: str = getattr(strategy, "arrayrecord_key", "arrays")
        self.configrecord_key: str = getattr(strategy, "configrecord_key", "config")
        self.weighted_by_key: str = getattr(strategy, "weighted_by_key", P.NUM_EXAMPLES)
        #: node id -> node-config values it reported (``query.identify``), by key.
        self.identities: dict[int, dict[str, Any]] = {}
        #: node id -> the capabilities it reported (protocol version, handlers, routines).
        self.capabilities: dict[int, dict[str, Any]] = {}
        #: node id -> the most examples it may claim.
        self.declared: dict[int, int] = dict(declared_examples or {})
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
        self._global: dict[str, np.ndarray] | None = None
        self._round_start: dict[str, np.ndarray] | None = None
        self._unlearn_start: dict[str, np.ndarray] | None = None
        self._asked: dict[int, dict[str, str]] = {}
        self._sent: dict[int, Message] = {}
        self._minimums: dict[str, int] = {
            k: getattr(strategy, k)
            for k in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")
            if isinstance(getattr(strategy, k, None), int)
        }

    # -- configuration checks ------------------------------------------------------------
    def check_method(self, method: UnlearningMethod) -> None:
        """Refuse a method the wrapped strategy cannot host.

        Raises
        ------
        ValueError
            A method that rebuilds the global model before training (NoT, MPRU, retrain,
            FedEraser) with FedAvgM's server optimizer, which keeps its own copy of the
            model and would take the rebuilt model for a pseudo-gradient.
        """
        rebuilds = type(method).prepare_global is not UnlearningMethod.prepare_global
        if rebuilds and isinstance(self.strategy, FedAvgM) and self.strategy.server_opt:
            raise ValueError(
                f"method '{method.name}' replaces the global model before training, which FedAvgM's server "
                "optimizer (it keeps its own copy of the model) cannot follow; use FedAdam/FedYogi, FedAvg "
                "or FedProx, or a method that does not (puf, spectral-puf, sragu, ...)"
            )

    def _composition(self) -> str:
        if self.composition != "auto":
            return self.composition
        return "additive" if isinstance(self.strategy, ROBUST_AGGREGATORS) else "mean"

    # -- requests --------------------------------------------------------------------------
    def request_unlearning(
        self,
        *clients: Any,
        key: str | None | EllipsisType = ...,
        round: int | None = None,  # noqa: A002
        leave: bool = True,
        deletion: DeletionRequest | None = None,
        joint: bool = False,
        method: UnlearningMethod | None = None,
        extra_config: Mapping[str, Any] | None = None,
        send_request: bool = True,
    ) -> None:
        """Ask for the influence of ``clients`` to be removed (served from ``round``, default the next one).

        ``clients`` are values of the node-config key ``key`` (default :attr:`client_key`),
        or node ids with ``key=None``. Requests due in the same round are served together.
        See :class:`UnlearningRequest` for the other arguments.

        Raises
        ------
        ValueError
            Without clients, or with a method the wrapped strategy cannot host.
        """
        if not clients:
            raise ValueError("request_unlearning needs at least one client")
        if method is not None:
            self.check_method(method)
        elif self.method is None:
            raise ValueError("this strategy has no unlearning method: pass method= to the request or the strategy")
        use_key = self.client_key if key is ... else key
        if not leave and deletion is not None and deletion.scenario == "client":
            raise ValueError("a client-level deletion means the clients leave: use leave=True")
        self.queue.append(
            UnlearningRequest(
                tuple(clients),
                use_key if isinstance(use_key, str) else None,
                round,
                leave,
                deletion,
                joint,
                method,
                dict(extra_config or {}),
                send_request,
            )
        )

    def set_identity(self, node_id: int, **node_config: Any) -> None:
        """What a node's node config says (learned in your own handshake): the strategy will not ask that node."""
        self.identities[node_id] = {**self.identities.get(node_id, {}), **node_config}

    def restore(
        self,
        *,
        strikes: Mapping[int, int] | None = None,
        excluded: Iterable[int] = (),
        last_update_norm: float | None = None,
    ) -> None:
        """Take up state a restarted server kept: strikes per node, excluded nodes, the last round's update norm."""
        for node, n in (strikes or {}).items():
            self.strikes[node] = int(n)
        self.excluded |= set(excluded)
        if last_update_norm is not None:
            self.last_update_norm = float(last_update_norm)

    def exclude(self, *node_ids: int) -> None:
        """Leave these nodes out of training from now on (a gold federation's left-out clients)."""
        self.departed |= set(node_ids)

    def restrict_to_retained(self, *node_ids: int) -> None:
        """Have these nodes train on their retained samples only (they answer ``train.retain``)."""
        self.retain_only |= set(node_ids)

    def train_reference(self, index: int, count: int, seed: int) -> None:
        """Make ordinary rounds train reference model ``index`` of ``count`` of the strong leakage audit.

        Every node answers :data:`~fed_unlearn.protocol.TRAIN_REFERENCE`, training on the half
        of its samples that reference takes (chosen on the node from ``seed`` and its client id).
        """
        if not 0 <= index < count:
            raise ValueError(f"reference index {index} out of range for {count} reference models")
        self.reference = {P.REFERENCE_INDEX: int(index), P.REFERENCE_COUNT: int(count), P.REFERENCE_SEED: int(seed)}

    def declare_examples(self, node_id: int, num_examples: int) -> None:
        """The most examples ``node_id`` may claim in a reply (larger claims are capped to it)."""
        if num_examples < 1:
            raise ValueError(f"node {node_id}: declared examples must be >= 1, got {num_examples}")
        self.declared[node_id] = int(num_examples)

    def cancel(self) -> tuple[int, ...]:
        """Drop the requests being served (their attempt failed); returns their nodes. Membership is unchanged."""
        dropped, self.pending = self.pending, ()
        self._batch, self._method = None, None
        self.unlearning_rounds_run = 0
        return dropped

    @property
    def active(self) -> list[int]:
        """Nodes known to this strategy that still take part (not departed, not excluded)."""
        known = set(self.identities) | set(self.pending) | set(self._asked)
        return sorted(known - self.departed - self.excluded)

    def is_unlearning_round(self, server_round: int) -> bool:
        """Whether ``server_round`` serves the pending requests (a method may take several rounds)."""
        return bool(self.pending) and self.departure_round is not None and server_round >= self.departure_round

    @property
    def unlearning_done(self) -> bool:
        """Whether every started request has been served and none is queued."""
        return not self.pending and not self.queue

    def client_id(self, node_id: int) -> int:
        """A stable integer for ``node_id``: its ``client_key`` value when that is an integer, else the node id.

        Replies are combined in this order, so runs do not depend on the order replies arrive in.
        """
        value = self.identities.get(node_id, {}).get(self.client_key)
        try:
            return int(value) if value is not None and not isinstance(value, bool) else node_id
        except (TypeError, ValueError):
            return node_id

    def membership(self) -> dict[str, list[int]]:
        """Who has left and who trains on retained data only (node ids; a service checkpoints it)."""
        return {
            "departed": sorted(self.departed),
            "retain-only": sorted(self.retain_only),
            "excluded": sorted(self.excluded),
        }

    # -- identification ----------------------------------------------------------------------
    def identify(
        self, grid: Grid, node_ids: Iterable[int], keys: Sequence[str] = (), timeout: float | None = None
    ) -> dict[int, str]:
        """Ask ``node_ids`` (those not identified yet) for their node-config ``keys``; returns node -> problem.

        One :data:`~fed_unlearn.protocol.IDENTIFY` message per node; results land in
        :attr:`identities` and :attr:`capabilities`.
        """
        keys = list(dict.fromkeys([self.client_key, *keys]))
        todo = sorted(n for n in node_ids if n not in self.identities or not set(keys) <= set(self.identities[n]))
        problems: dict[int, str] = {}
        if not todo:
            return problems
        cfg = ConfigRecord({P.KEYS: keys})
        msgs = [Message(RecordDict({P.CONFIG_RECORD: cfg}), n, P.IDENTIFY) for n in todo]
        answered = set()
        timeout = self.identify_timeout if timeout is None else timeout
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                problems[node] = f"does not answer {P.IDENTIFY}: {_first_line(reply.error.reason or '')}"
                continue
            content = reply.content
            if P.IDENTITY_RECORD not in content.config_records:
                problems[node] = f"its {P.IDENTIFY} reply has no '{P.IDENTITY_RECORD}' ConfigRecord"
                continue
            ident = dict(content.config_records[P.IDENTITY_RECORD])
            self.identities[node] = {**self.identities.get(node, {}), **ident}
            # no capabilities record: a hand-written identify handler, no fed-unlearn helpers
            self.capabilities[node] = (
                dict(content.config_records[P.CAPABILITIES_RECORD])
                if P.CAPABILITIES_RECORD in content.config_records
                else {}
            )
        for node in set(todo) - answered:
            problems[node] = f"did not answer {P.IDENTIFY} within {timeout:.0f} s"
        return problems

    def _resolve(self, req: UnlearningRequest, grid: Grid) -> tuple[list[int], list[str]]:
        """Node ids of a request's clients, and the problems (unknown names, unidentified nodes)."""
        if req.key is None:  # node ids: a node that is down fails its round (see on_missing), if it must train
            return [int(c) for c in req.clients], []
        connected = list(grid.get_node_ids())
        problems = self.identify(grid, connected, [req.key])
        by_value: dict[str, list[int]] = {}
        for node in connected:
            value = self.identities.get(node, {}).get(req.key)
            if value is not None:
                by_value.setdefault(str(value), []).append(node)
        nodes, out = [], []
        for c in req.clients:
            found = by_value.get(str(c), [])
            if len(found) > 1:
                out.append(f"{req.key}={c!r} is claimed by nodes {sorted(found)}")
            elif not found:
                why = "; ".join(f"node {n} {p}" for n, p in sorted(problems.items()))
                out.append(f"no connected node has {req.key}={c!r}" + (f" ({why})" if why else ""))
            else:
                nodes.append(found[0])
        return nodes, out

    def _missing_handlers(self, req: UnlearningRequest, nodes: Sequence[int]) -> list[str]:
        """What the request needs from its nodes that their ``query.identify`` reply says they lack.

        A node that answered this strategy's ``query.identify`` without capabilities runs no
        fed-unlearn helpers; a node it never asked (named by node id) is not judged here.
        """
        method = req.method or self.method
        need = []
        if method is not None and method.departing_clients_train and method.departing_task != "train":
            need.append(P.TRAIN_UNLEARN)
        if not req.leave:
            need += (
                [P.FORGET, P.TRAIN_RETAIN, P.TRAIN_UNLEARN] if req.send_request else [P.TRAIN_RETAIN, P.TRAIN_UNLEARN]
            )
        out = []
        for node in nodes:
            if not need or node not in self.capabilities:
                continue
            have = list(self.capabilities.get(node, {}).get("handlers", []))
            missing = [h for h in dict.fromkeys(need) if h not in have]
            if missing:
                what = (
                    f"{method.name}'s client routine"
                    if method is not None and P.TRAIN_UNLEARN in missing
                    else "this request"
                )
                out.append(
                    f"node {node} cannot serve {what}: its ClientApp does not answer {missing} "
                    "(add them with fed_unlearn.flower.add_unlearning)"
                )
        return out

    def _deliver(self, grid: Grid, nodes: list[int], deletion: DeletionRequest, arrays: ArrayRecord) -> list[str]:
        """Send the deletion request to ``nodes`` with the current model; record their receipts; returns problems."""
        spec = ConfigRecord(
            {
                "scenario": deletion.scenario,
                "selection": deletion.selection,
                "fraction": deletion.fraction,
                "class": deletion.forget_class,
            }
        )
        msgs = [Message(RecordDict({self.arrayrecord_key: arrays, P.CONFIG_RECORD: spec}), n, P.FORGET) for n in nodes]
        problems, answered = [], set()
        for reply in grid.send_and_receive(msgs, timeout=self.identify_timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                problems.append(
                    f"node {node} cannot process the deletion request ({P.FORGET}): "
                    f"{_first_line(reply.error.reason or '')}"
                )
                continue
            try:
                m = reply.content["metrics"]
                self.receipts[node] = {
                    "forget-n": int(number(m, "forget-n")),
                    "retain-n": int(number(m, "retain-n")),
                    "digest": str(reply.content["receipt"]["digest"]),
                }
            except (KeyError, TypeError, ValueError) as exc:
                problems.append(f"node {node}: malformed {P.FORGET} reply ({exc})")
        problems += [f"node {n} did not answer the deletion request" for n in nodes if n not in answered]
        return problems

    def _start_due_requests(self, server_round: int, grid: Grid, arrays: ArrayRecord | None = None) -> None:
        """Move the requests due by ``server_round`` from the queue into one batch."""
        if self.requests_fn is not None:
            self.queue.extend(self.requests_fn(server_round))
        due = [r for r in self.queue if r.round is None or r.round <= server_round]
        if not due:
            return
        first = due[0]
        batch = [
            r
            for r in due
            if (r.leave, r.joint, r.method, r.deletion) == (first.leave, first.joint, first.method, first.deletion)
        ]
        nodes: list[int] = []
        problems: list[str] = []
        for r in batch:
            found, bad = self._resolve(r, grid)
            nodes += found
            problems += bad
        gone = sorted(set(nodes) & (self.departed | self.excluded))
        if gone:
            problems.append(f"node(s) {gone} have already left")
        problems += self._missing_handlers(first, nodes)
        if (
            not problems
            and not first.leave
            and first.deletion is not None
            and first.send_request
            and arrays is not None
        ):
            problems += self._deliver(grid, sorted(set(nodes)), first.deletion, arrays)
            nothing = [n for n in nodes if self.receipts.get(n, {}).get("forget-n", 1) == 0]
            if nothing:
                log(INFO, "node(s) %s have nothing to forget under this request", nothing)
                nodes = [n for n in nodes if n not in nothing]
                if not nodes and not problems:
                    problems.append("the deletion request selects no sample on any node")
        if problems and self.on_missing == "raise":
            raise ValueError("cannot serve the unlearning request: " + "; ".join(problems))
        for r in batch:
            self.queue.remove(r)
        nodes = sorted(set(nodes) - set(gone))
        if problems:
            log(WARNING, "unlearning request(s) not served in round %s: %s", server_round, "; ".join(problems))
            self.failed = tuple(nodes)
            return
        if first.leave and not set(grid.get_node_ids()) - self.departed - self.excluded - set(nodes):
            raise ValueError("no client would remain in the federation")
        method = first.method or self.method
        if method is None:
            raise ValueError("no unlearning method to serve the request with")
        method.joint_request = first.joint
        extra: dict[str, Any] = {}
        for r in batch:
            extra.update(r.extra_config)
        self._batch = UnlearningRequest(
            tuple(nodes), None, server_round, first.leave, first.deletion, first.joint, method, extra
        )
        self._method = method
        self.pending = tuple(nodes)
        self.departure_round = server_round
        self.unlearning_rounds_run = 0
        self.unlearning_report = None
        log(
            INFO, "round %s: serving the unlearning request of nodes %s with %s", server_round, list(nodes), method.name
        )

    # -- helpers ---------------------------------------------------------------------------
    def _adjust_minimums(self) -> None:
        """Lower the wrapped strategy's minimum node counts by the nodes that will never take part again."""
        gone = len(self.departed | self.excluded)
        for attr, value in self._minimums.items():
            setattr(self.strategy, attr, max(1, value - gone) if value > 0 else value)

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
        if template is None:
            return RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({**dict(config), **extra})}
            )
        records: dict[str, Any] = {}
        for k, rec in template.items():
            if isinstance(rec, ConfigRecord) and k == self.configrecord_key:
                records[k] = ConfigRecord({**dict(rec), **extra})
            else:
                records[k] = rec
        if self.configrecord_key not in records:
            records[self.configrecord_key] = ConfigRecord(dict(extra))
        return RecordDict(records)

    # -- training ---------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's round, or the unlearning round of the pending requests."""
        self.current_round = server_round
        self._grid = grid
        self._global = self._round_start = to_weights(arrays)
        self._asked, self._sent = {}, {}
        self.failed = ()
        if not self.pending:
            self._start_due_requests(server_round, grid, arrays)
        self._adjust_minimums()
        active = ActiveNodesGrid(grid, self._hidden)
        keep_last = self.method is not None and self.method.client_keeps_last_local
        if not self.is_unlearning_round(server_round):
            out = []
            for msg in self.strategy.configure_train(server_round, arrays, config, active):
                node = msg.metadata.dst_node_id
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
            arrays = to_record(self._global)
        template_msgs = list(self.strategy.configure_train(server_round, arrays, config, active))
        template = template_msgs[0].content if template_msgs else None
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
        elif not batch.leave:
            pass  # clients that stay get their retain role with the forget role below
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
                        self._message(node, self._content(template, arrays, config, {}), P.TRAIN, {"*": "forget"})
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

    def _parse(self, reply: Message) -> tuple[_Parsed | None, str | None]:
        """Validate one reply against what its node was asked; returns the parsed roles or the problem."""
        node = reply.metadata.src_node_id
        asked = self._asked.get(node)
        if asked is None:
            return None, "a reply to an instruction it was not sent this round"
        if reply.has_error():
            return None, f"failed: {_first_line(reply.error.reason or '')}"
        content = reply.content
        if self._global is None:
            return None, "no round in progress"
        out = _Parsed(node)
        if "*" in asked:  # a plain FedAvg reply: one ArrayRecord, one MetricRecord
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                return None, (
                    f"a train reply needs exactly one ArrayRecord and one MetricRecord, got "
                    f"{sorted(content.array_records)} and {sorted(content.metric_records)}"
                )
            roles = {asked["*"]: (next(iter(content.array_records)), next(iter(content.metric_records)))}
        else:
            metric_of = {a: m for a, m in P.ROLE_KEYS.values()}
            expected = set(asked) | {metric_of[a] for a in asked}
            got = set(content.array_records) | set(content.metric_records)
            if got != expected:
                return (
                    None,
                    f"a {P.TRAIN_UNLEARN} reply needs exactly the records {sorted(expected)}, got {sorted(got)}",
                )
            roles = {role: (akey, metric_of[akey]) for akey, role in asked.items()}
        cid = self.client_id(node)
        for role, (akey, mkey) in roles.items():
            metrics = content.metric_records[mkey]
            n = metrics.get(self.weighted_by_key)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                return None, f"'{self.weighted_by_key}' must be a positive integer, got {n!r}"
            cap = self.declared.get(node)
            if cap is not None and n > cap:
                log(WARNING, "node %s claims %s examples, more than the %s it declared: capped", node, n, cap)
                n = cap
                metrics = MetricRecord({**dict(metrics), self.weighted_by_key: n})
            try:
                record = content.array_records[akey]
                weights = to_weights(record)
                validate_update(weights, self._global, f"node {node}")
                wider = [
                    k
                    for k, w in weights.items()
                    if w.dtype.itemsize > np.asarray(self._global[k]).dtype.itemsize
                    and np.issubdtype(w.dtype, np.floating)
                ]
                if wider:  # never let a reply change the global model's dtype
                    weights = {
                        k: (w.astype(np.asarray(self._global[k]).dtype) if k in wider else w)
                        for k, w in weights.items()
                    }
                    record = to_record(weights)
                if self.max_update_norm is not None:
                    clipped = clip_update(weights, self._global, self.max_update_norm)
                    if clipped is not None:
                        weights, record = clipped, to_record(clipped)
            except InvalidUpdateError as exc:
                return None, str(exc)
            except Exception as exc:  # noqa: BLE001  (undecodable arrays are the client's fault, not the round's)
                return None, f"its arrays cannot be read: {type(exc).__name__}: {exc}"
            update = ClientUpdate(cid, weights, n, dict(metrics))
            if role == "retain":
                out.retain = with_content(reply, RecordDict({akey: record, mkey: metrics}))
                out.retain_update = update
            else:
                out.forget_update = update
        return out, None

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

    def _collect(self, replies: Iterable[Message]) -> list[_Parsed]:
        parsed: list[_Parsed] = []
        self.last_round_problems = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            p, problem = self._parse(reply)
            if p is None:
                self.last_round_problems[node] = problem or "invalid"
                if problem and not problem.startswith("failed"):
                    self._strike(node, problem)
                else:
                    log(WARNING, "round %s: node %s %s", self.current_round, node, problem)
                continue
            self.last_round_problems[node] = "ok"
            parsed.append(p)
        return sorted(parsed, key=lambda p: (self.client_id(p.node), p.node))

    def _common_metrics(self, msgs: list[Message]) -> tuple[list[Message], MetricRecord | None]:
        """Replies whose MetricRecords hold only the keys every reply has, and the weighted means of the others.

        Flower's strategies need one key set across replies; a node answering with the
        helpers' training (``train.retain``) may name its metrics differently from your own
        ``train``. Keys some replies lack are averaged over the replies that have them.
        """
        if len(msgs) < 2:
            return msgs, None
        keysets = [set(next(iter(m.content.metric_records.values())).keys()) for m in msgs]
        common = set.intersection(*keysets)
        if all(k == common for k in keysets):
            return msgs, None
        out: list[Message] = []
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for m in msgs:
            mkey, rec = next(iter(m.content.metric_records.items()))
            n = float(rec[self.weighted_by_key])  # type: ignore[arg-type]
            for k, v in rec.items():
                if k not in common and isinstance(v, (int, float)) and not isinstance(v, bool):
                    sums[k] = sums.get(k, 0.0) + n * float(v)
                    weights[k] = weights.get(k, 0.0) + n
            content = RecordDict(
                {
                    **{k: r for k, r in m.content.array_records.items()},
                    mkey: MetricRecord({k: v for k, v in rec.items() if k in common}),
                }
            )
            out.append(with_content(m, content))
        return out, MetricRecord({k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, then the wrapped strategy's aggregation (ordinary round) or the method's rule."""
        if self._global is None or server_round != self.current_round:
            raise RuntimeError(f"aggregate_train for round {server_round} without configure_train")
        replies = list(replies)
        parsed = self._collect(replies)
        retain_msgs, partial = self._common_metrics(
            [p.retain for p in parsed if p.retain is not None and p.node not in self.departed]
        )
        retain_updates = [
            p.retain_update for p in parsed if p.retain_update is not None and p.node not in self.departed
        ]
        forget_updates = [p.forget_update for p in parsed if p.forget_update is not None]
        rollup = _merge(partial, self._rollup(parsed))
        if not self.is_unlearning_round(server_round):
            if not retain_msgs:
                log(WARNING, "aggregate_train: no valid replies in round %s; global model unchanged", server_round)
                return None, rollup
            if self.method is not None and self._round_start is not None:
                self.method.observe(server_round, self._round_start, retain_updates)
            self.last_update_norm = _mean_update_norm(retain_updates, self._global)
            arrays, metrics = self.strategy.aggregate_train(server_round, retain_msgs)
            return arrays, _merge(metrics, rollup)
        method = self._method
        if method is None:
            raise RuntimeError("unlearning round without a method")
        asked_forget = {n for n, k in self._asked.items() if "forget" in k.values()}
        expected = asked_forget | (set(self.pending) if method.departing_clients_train else set())
        got = {p.node for p in parsed if p.forget_update is not None}
        missing = sorted(expected - got)
        if missing and self.on_missing == "skip":
            self.failed = self.cancel()
            log(
                WARNING,
                "node(s) %s did not reply in unlearning round %s; their requests stay pending",
                missing,
                server_round,
            )
            if not retain_msgs:
                return None, rollup
            arrays, metrics = self.strategy.aggregate_train(server_round, retain_msgs)
            return arrays, _merge(metrics, rollup)
        if missing:
            why = {n: self.last_round_problems.get(n, "no reply") for n in missing}
            raise RuntimeError(
                f"departing node(s) {why} did not reply in unlearning round {server_round}; nothing was unlearned"
            )
        new = method.aggregate(self._global, retain_updates, forget_updates)
        validate_update(new, self._global, f"method {method.name}")  # the method itself must not emit NaN
        new, step = self._bound_departing_step(new, retain_updates, forget_updates)
        if self.calibrate and method.calibratable and method.num_rounds == 1 and forget_updates:
            new, cal = self._calibrate(new, retain_updates, [p.node for p in parsed if p.forget_update is not None])
            step = {**step, "calibration": cal}
        if step.get("calibration", {}).get("kept"):
            # nothing memorised: the pre-request model stands, the wrapped strategy's state untouched
            arrays, metrics = to_record(new), None
        else:
            arrays, metrics = self._compose(server_round, new, retain_msgs, retain_updates, forget_updates)
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
        return arrays, _merge(metrics, rollup)

    def _calibrate(
        self, new: dict[str, np.ndarray], retain: list[ClientUpdate], nodes: list[int]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Ask the forgetting clients how far the unlearning step should go; returns the model and what was decided."""
        batch, grid, start = self._batch, self._grid, self._global
        if batch is None or grid is None or start is None:
            return new, {"used": False, "why": "no request being served"}
        lacking = [
            n for n in nodes if n in self.capabilities and P.CALIBRATE not in self.capabilities[n].get("handlers", [])
        ]
        if lacking:
            log(
                WARNING,
                "node(s) %s cannot calibrate the unlearning step (no %s): the method's full step is used",
                lacking,
                P.CALIBRATE,
            )
            return new, {"used": False, "why": f"nodes {lacking} lack {P.CALIBRATE}"}
        base = fedavg(retain) if retain else start
        direction = {k: np.asarray(new[k], np.float64) - np.asarray(base[k], np.float64) for k in start}
        scenario = batch.deletion.scenario if batch.deletion is not None else ("client" if batch.leave else "samples")
        target = target_for(scenario)

        def ask(scales: Sequence[float], pre_request: bool) -> dict[str, Any]:
            """The forgetting clients' pooled measurements of ``base + c * direction`` for each scale ``c``."""
            cfg = ConfigRecord({"scales": list(scales), P.FORGET_ALL: batch.leave, P.SERVER_ROUND: self.current_round})
            content: dict[str, ArrayRecord | ConfigRecord] = {
                "base": to_record(base),
                "direction": to_record(direction),
                P.CONFIG_RECORD: cfg,
            }
            if pre_request:
                content["pre-request"] = to_record(start)
            msgs = [Message(RecordDict(dict(content)), n, P.CALIBRATE) for n in nodes]
            stats, why = [], []
            for reply in grid.send_and_receive(msgs, timeout=self.identify_timeout):
                if reply.has_error() or "calibration" not in reply.content.metric_records:
                    why.append(
                        f"node {reply.metadata.src_node_id}: "
                        + (_first_line(reply.error.reason or "") if reply.has_error() else "no calibration record")
                    )
                    continue
                stats.append(dict(reply.content["calibration"]))
            if why or len(stats) != len(nodes):
                raise ValueError("; ".join(why) or "some clients did not answer")
            return pooled(stats)  # type: ignore[arg-type]  # malformed lists raise and are caught below

        scales = list(self.calibration_scales)
        m: dict[str, Any] = {}

        def decide() -> Calibration:
            f, h, a = m["forget-loss"], m["heldout-loss"], m["forget-acc"]
            return choose_scale(scales, f, h, a, target, self.class_floor, m.get("heldout-acc"))

        try:
            m = ask(scales, pre_request=True)
            pre = memorisation(m["pre"], target, self.class_floor, self.memorisation_z) if "pre" in m else None
            cal = decide()
            longer = [] if cal.reached or (pre is not None and not pre.memorised) else self._longer_scales(direction)
            better = 1.0 if target == "loss-match" else -1.0  # the sign in which a gap moves toward the target
            if longer and better * cal.gaps[-1] >= better * cal.gaps[0]:
                # the full step falls short without moving away from the target (an ascent step that
                # barely starts): candidates beyond it, up to the departing-step bound
                more = ask(longer, pre_request=False)
                scales += longer
                for key in ("forget-loss", "heldout-loss", "forget-acc", "heldout-acc"):
                    if key in m:
                        m[key] = list(m[key]) + list(more[key])
                cal = decide()
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log(WARNING, "calibration failed (%s): the method's full step is used", exc)
            return new, {"used": False, "why": str(exc)}
        figures = {k: v for k, v in m.items() if k != "pre"}
        test = {} if pre is None else {"pre-request": m["pre"], "memorised": pre.memorised}
        if pre is not None and not pre.memorised:
            log(
                INFO,
                "calibration (%s): the pre-request model does not remember the forget set (%s): it is kept unchanged",
                target,
                f"forget vs held-out mean loss {pre.statistic:.2f} standard errors apart <= {self.memorisation_z}"
                if target == "loss-match"
                else f"forget accuracy {m['pre']['forget-acc']:.3f} <= {self.class_floor}",
            )
            kept = {k: np.asarray(v).copy() for k, v in start.items()}
            return kept, {"used": True, "kept": True, "scale": 0.0, "reached": True, "target": target, **test}
        out = {
            k: (np.asarray(base[k], np.float64) + cal.scale * direction[k]).astype(np.asarray(g).dtype)
            for k, g in start.items()
        }
        log(
            INFO,
            "calibration (%s): scale %.3f of the unlearning step%s",
            cal.target,
            cal.scale,
            "" if cal.reached else f" (the target is not reached even by {scales[-1]:g} x the step)",
        )
        return out, {
            "used": True,
            "kept": False,
            "scale": cal.scale,
            "reached": cal.reached,
            "target": cal.target,
            "scales": scales,
            "gaps": list(cal.gaps),
            **figures,
            **test,
        }

    def _longer_scales(self, direction: Mapping[str, np.ndarray]) -> list[float]:
        """Scales beyond 1 (doubling) up to the departing-step bound, for a step too short to reach the target."""
        norm = float(np.sqrt(sum(float(np.sum(v**2)) for v in direction.values())))
        if self.departing_step_bound is None or not self.last_update_norm or not norm or not np.isfinite(norm):
            return []
        limit = self.departing_step_bound * self.last_update_norm / norm
        out = [2.0**k for k in range(1, 13) if 2.0**k < limit]
        return [*out, limit] if limit > 1 else []

    def _bound_departing_step(
        self, new: dict[str, np.ndarray], retain: list[ClientUpdate], forget: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Scale the departing clients' step down to ``departing_step_bound`` x the remaining clients' update norm."""
        if self._global is None or not forget:
            return new, {}
        base = fedavg(retain) if retain else self._global
        step = {k: np.asarray(new[k], np.float64) - np.asarray(base[k], np.float64) for k in self._global}
        norm = float(np.sqrt(sum(float(np.sum(v**2)) for v in step.values())))
        ref = _mean_update_norm(retain, self._global) if retain else self.last_update_norm
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
        scale = limit / norm
        out = {
            k: (np.asarray(base[k], np.float64) + scale * step[k]).astype(np.asarray(g).dtype)
            for k, g in self._global.items()
        }
        return out, {**info, "departing-step-bounded": 1}

    def _compose(
        self,
        server_round: int,
        new: dict[str, np.ndarray],
        retain_msgs: list[Message],
        retain_updates: list[ClientUpdate],
        forget_updates: list[ClientUpdate],
    ) -> tuple[ArrayRecord, MetricRecord | None]:
        """The unlearning round's model through the wrapped strategy (see the module docstring)."""
        if self._global is None:
            raise RuntimeError("no round in progress")
        first_round = self.unlearning_rounds_run == 0
        if self.reset_server_momentum and first_round and _reset_server_momentum(self.strategy):
            log(INFO, "the server optimizer's momentum was reset for the unlearning round")
        metrics = None
        if _is_plain_mean(self.strategy):
            if retain_msgs:
                _, metrics = self.strategy.aggregate_train(server_round, retain_msgs)
            return to_record(new), metrics
        if self._composition() == "additive":
            if not retain_msgs:
                return to_record(new), None
            robust, metrics = self.strategy.aggregate_train(server_round, retain_msgs)
            if robust is None:
                return to_record(new), metrics
            mean = fedavg(retain_updates)
            rob = to_weights(robust)
            out = {
                k: (
                    np.asarray(rob[k], np.float64) + np.asarray(new[k], np.float64) - np.asarray(mean[k], np.float64)
                ).astype(np.asarray(g).dtype)
                for k, g in self._global.items()
            }
            return to_record(out), metrics
        # mean composition: one more reply, chosen so that the weighted mean of all replies is `new`
        n_rem = sum(u.num_examples for u in retain_updates)
        n_syn = sum(u.num_examples for u in forget_updates) or max(n_rem, 1)
        total = float(n_rem + n_syn)
        syn = {}
        for k, g in self._global.items():
            acc = total * np.asarray(new[k], np.float64)
            for u in retain_updates:
                acc -= u.num_examples * np.asarray(u.weights[k], np.float64)
            syn[k] = (acc / n_syn).astype(np.asarray(g).dtype)
        template = retain_msgs[0] if retain_msgs else None
        akey = next(iter(template.content.array_records)) if template is not None else self.arrayrecord_key
        mkey = next(iter(template.content.metric_records)) if template is not None else "metrics"
        keys = (
            list(next(iter(template.content.metric_records.values())).keys())
            if template is not None
            else [self.weighted_by_key]
        )
        source = forget_updates[0].metrics if forget_updates else {}
        values: dict[str, Any] = {}
        for key in keys:
            v = source.get(key)
            values[key] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
        values[self.weighted_by_key] = int(n_syn)
        origin = template if template is not None else (self._sent.get(self.pending[0]) if self.pending else None)
        if origin is None:
            raise RuntimeError("no message to attach the unlearning reply to")
        synthetic = with_content(origin, RecordDict({akey: to_record(syn), mkey: MetricRecord(values)}))
        arrays, metrics = self.strategy.aggregate_train(server_round, [*retain_msgs, synthetic])
        if arrays is None:
            raise RuntimeError(f"{type(self.strategy).__name__} aggregated nothing in the unlearning round")
        return arrays, metrics

    def _rollup(self, parsed: Sequence[_Parsed]) -> MetricRecord:
        """The round's cost over every role's valid reply: clients, examples, summed steps and seconds."""
        ms = [u.metrics for p in parsed for u in (p.retain_update, p.forget_update) if u is not None]
        return MetricRecord(
            {
                "clients": len(parsed),
                "total-examples": int(sum(int(m.get(self.weighted_by_key, 0)) for m in ms)),
                "total-train-steps": int(sum(int(m.get("train-steps", 0)) for m in ms)),
                "total-train-seconds": float(sum(float(m.get("train-seconds", 0.0)) for m in ms)),
            }
        )

    def _diagnose(self, server_round: int, new: dict[str, np.ndarray], parsed: Sequence[_Parsed]) -> dict[str, Any]:
        """Per-layer exponent, stability weight and share of the unlearning motion ``||dw_l|| / ||dw||``."""
        start = self._unlearn_start
        method = self._method
        if start is None or method is None:
            return {}
        spectra = {s.layer: s for s in analyze(start, getattr(method, "gate", None))}
        share = motion_share({k: np.asarray(new[k], np.float64) - np.asarray(g, np.float64) for k, g in start.items()})
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
            str(self.client_id(p.node)): {k: v for k, v in p.forget_update.metrics.items() if not isinstance(v, list)}
            for p in parsed
            if p.forget_update is not None and p.node in self.pending
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

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The wrapped strategy's aggregate of the active nodes' metrics, plus the federation roll-up.

        When replies carry the per-part measurements of :func:`fed_unlearn.evaluation.measure_client`
        (the helpers' evaluation), their roll-up (:func:`fed_unlearn.evaluation.summarise`:
        ``test-acc``, ``forget-acc``, ...) is added over every replying node, departed ones
        included; keys the wrapped strategy produced are never replaced.
        """
        from ..evaluation import summarise

        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                log(
                    WARNING,
                    "evaluation failed on node %s: %s",
                    r.metadata.src_node_id,
                    _first_line(r.error.reason or ""),
                )
        usable = [
            r
            for r in ok
            if len(r.content.metric_records) == 1
            and isinstance(next(iter(r.content.metric_records.values())).get(self.weighted_by_key), (int, float))
        ]
        active = [r for r in usable if r.metadata.src_node_id not in self.departed]
        metrics: MetricRecord | None = None
        if active:
            same, partial = self._common_metrics(active)
            metrics = _merge(self.strategy.aggregate_evaluate(server_round, same), partial)
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


class UnlearningFedAvg(Unlearning):
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
        reproducible: bool = False,
        **unlearning: Any,
    ) -> None:
        cls = ReproducibleFedAvg if reproducible else FedAvg
        inner = cls(
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


def _mean_update_norm(updates: Sequence[ClientUpdate], start: Mapping[str, np.ndarray]) -> float | None:
    """Mean L2 norm of the updates' pseudo-gradients against ``start`` (``None`` without updates)."""
    if not updates:
        return None
    norms = [
        float(
            np.sqrt(
                sum(
                    float(np.sum((np.asarray(u.weights[k], np.float64) - np.asarray(g, np.float64)) ** 2))
                    for k, g in start.items()
                    if np.issubdtype(np.asarray(g).dtype, np.floating)
                )
            )
        )
        for u in updates
    ]
    return float(np.mean(norms))


def clip_update(
    weights: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], bound: float
) -> dict[str, np.ndarray] | None:
    """``start + (w - start) * min(1, bound / ||w - start||)``, or ``None`` when already within the bound."""
    delta = {
        k: np.asarray(weights[k], np.float64) - np.asarray(g, np.float64)
        for k, g in start.items()
        if np.issubdtype(np.asarray(g).dtype, np.floating)
    }
    norm = float(np.sqrt(sum(float(np.sum(d**2)) for d in delta.values())))
    if norm <= bound:
        return None
    return {
        k: (
            (np.asarray(start[k], np.float64) + delta[k] * (bound / norm)).astype(np.asarray(w).dtype)
            if k in delta
            else w
        )
        for k, w in weights.items()
    }


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


def _first_line(text: str) -> str:
    """The last non-empty line of a client traceback (the exception), or the text itself."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else str(text)
