"""The unlearning wrapper's request book: who asks to be forgotten, found on the grid, started in their round.

Requests name clients by a node-config key (``partition-id``, ``site``, ...) or by node id.
Names are resolved with one small query (``query.identify``, :mod:`fed_unlearn.protocol`)
sent only to nodes not identified yet; node ids are never guessed from their order. A
request whose nodes cannot be named, or whose method needs client code the nodes lack,
is refused with one line naming the helper that adds it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from .. import protocol as P
from ..deletion import DeletionRequest
from ..unlearning import UnlearningMethod
from .wire import forget_request, handlers_of, identify_request, read_forget_reply, read_identify_reply

#: Which helper registers each handler of the protocol (named in refusals).
HELPER_OF = {P.IDENTIFY: "fed_unlearn.flower.add_identity(app)"}
DEFAULT_HELPER = "fed_unlearn.flower.add_unlearning(app, ...)"
_NO_HANDLER = re.compile(r"No (\w+) function registered with name '(\w+)'")


class SetupError(ValueError):
    """The federation cannot serve a request as set up (a missing client handler, a round after the last)."""


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

    @property
    def scenario(self) -> str:
        """What is deleted: ``client`` (whole clients), ``samples`` or ``class``."""
        if self.deletion is not None:
            return self.deletion.scenario
        return "client" if self.leave else "samples"


def first_line(text: str) -> str:
    """The last non-empty line of a client traceback (the exception itself), or the text."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else str(text)


def client_failure(reason: str) -> str:
    """A client's error reply in one line; a missing handler is named with the helper that adds it."""
    line = first_line(reason)
    m = _NO_HANDLER.search(line)
    if m:
        category, action = m.groups()
        mtype = category if action == "default" else f"{category}.{action}"
        return f"its ClientApp has no '{mtype}' handler (add it with {HELPER_OF.get(mtype, DEFAULT_HELPER)})"
    return line


class RequestBook:
    """The request-handling part of :class:`~fed_unlearn.flower.Unlearning` (state lives on the strategy)."""

    # state the strategy initialises (declared for the type checker)
    method: UnlearningMethod | None
    client_key: str
    requests_fn: Any
    on_missing: str
    query_timeout: float
    identities: dict[int, dict[str, Any]]
    capabilities: dict[int, dict[str, Any]]
    declared: dict[int, float]
    departed: set[int]
    retain_only: set[int]
    excluded: set[int]
    strikes: Counter[int]
    queue: list[UnlearningRequest]
    pending: tuple[int, ...]
    failed: tuple[int, ...]
    receipts: dict[int, dict[str, Any]]
    departure_round: int | None
    unlearning_rounds_run: int
    unlearning_report: dict[str, Any] | None
    last_update_norm: float | None
    reference: dict[str, int]
    _batch: UnlearningRequest | None
    _method: UnlearningMethod | None
    _asked: dict[int, dict[str, str]]

    if TYPE_CHECKING:  # provided by the strategy this mixin is part of

        def check_method(self, method: UnlearningMethod) -> None:
            """Refuse a method the wrapped strategy cannot host (see the strategy)."""

        def _array_key(self) -> str: ...

    # -- the public request API ------------------------------------------------------------
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
            Without clients, with a round before 1, or with a method the wrapped strategy cannot host.
        """
        if not clients:
            raise ValueError("request_unlearning needs at least one client")
        if round is not None and (isinstance(round, bool) or not isinstance(round, int) or round < 1):
            raise ValueError(f"the request's round must be a server round >= 1, got {round!r}")
        if method is not None:
            self.check_method(method)
        elif self.method is None:
            raise ValueError("this strategy has no unlearning method: pass method= to the request or the strategy")
        use_key = self.client_key if key is ... else key
        if not leave and deletion is not None and deletion.clients_leave:
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

    def leave_out(self, *node_ids: int) -> None:
        """Leave these nodes out of training from now on, as departed ones (a gold federation's left-out clients).

        Not the same as :attr:`excluded`, the nodes struck out for invalid replies.
        """
        self.departed |= set(node_ids)

    def exclude(self, *node_ids: int) -> None:
        """The former name of :meth:`leave_out` (kept for existing apps)."""
        self.leave_out(*node_ids)

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

    def declare_examples(self, node_id: int, num_examples: float) -> None:
        """The most examples ``node_id`` may claim in a reply (larger claims are capped to it)."""
        if not (np.isfinite(num_examples) and num_examples > 0):
            raise ValueError(f"node {node_id}: declared examples must be a positive number, got {num_examples}")
        self.declared[node_id] = num_examples

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

        With ``reproducible=True`` replies are handed over in this order, so runs do not
        depend on the order replies arrive in.
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
        msgs = [Message(identify_request(keys), n, P.IDENTIFY) for n in todo]
        answered = set()
        timeout = self.query_timeout if timeout is None else timeout
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                problems[node] = f"does not answer {P.IDENTIFY}: {client_failure(reply.error.reason or '')}"
                continue
            try:
                ident, caps = read_identify_reply(reply.content)
            except KeyError as exc:
                problems[node] = str(exc.args[0])
                continue
            self.identities[node] = {**self.identities.get(node, {}), **ident}
            # no capabilities record: a hand-written identify handler, no fed-unlearn helpers
            self.capabilities[node] = caps
        for node in set(todo) - answered:
            problems[node] = f"did not answer {P.IDENTIFY} within {timeout:.0f} s"
        return problems

    def check_identification(self, grid: Grid) -> None:
        """Before any training: every node must be able to say who it is if a queued request names clients by key.

        Raises
        ------
        SetupError
            In one line naming the nodes and ``add_identity(app)`` when they have no
            ``query.identify`` handler.
        """
        keys = sorted({r.key for r in self.queue if r.key is not None})
        if not keys:
            return
        problems = self.identify(grid, list(grid.get_node_ids()), keys)
        missing = sorted(n for n, p in problems.items() if f"no '{P.IDENTIFY}' handler" in p)
        if missing:
            raise SetupError(
                f"unlearning requests name clients by {', '.join(repr(k) for k in keys)}, but node(s) {missing} "
                f"cannot say theirs: their ClientApp has no '{P.IDENTIFY}' handler. Add "
                f"fed_unlearn.flower.add_identity(app) to the ClientApp, or name the clients by node id (key=None)"
            )

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
            have = handlers_of(self.capabilities.get(node, {}))
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
        spec = forget_request(deletion)
        msgs = [Message(RecordDict({self._array_key(): arrays, P.CONFIG_RECORD: spec}), n, P.FORGET) for n in nodes]
        problems, answered = [], set()
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                problems.append(
                    f"node {node} cannot process the deletion request ({P.FORGET}): "
                    f"{client_failure(reply.error.reason or '')}"
                )
                continue
            try:
                self.receipts[node] = read_forget_reply(reply.content)
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
            nothing = [n for n in nodes if self.receipts.get(n, {}).get(P.FORGET_N, 1) == 0]
            if nothing:
                log(INFO, "node(s) %s have nothing to forget under this request", nothing)
                nodes = [n for n in nodes if n not in nothing]
                if not nodes and not problems:
                    problems.append("the deletion request selects no sample on any node")
        if problems and self.on_missing == "raise":
            raise SetupError("cannot serve the unlearning request: " + "; ".join(problems))
        for r in batch:
            self.queue.remove(r)
        nodes = sorted(set(nodes) - set(gone))
        if problems:
            log(WARNING, "unlearning request(s) not served in round %s: %s", server_round, "; ".join(problems))
            self.failed = tuple(nodes)
            return
        if first.leave and not set(grid.get_node_ids()) - self.departed - self.excluded - set(nodes):
            raise SetupError("no client would remain in the federation")
        method = first.method or self.method
        if method is None:
            raise SetupError("no unlearning method to serve the request with")
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
