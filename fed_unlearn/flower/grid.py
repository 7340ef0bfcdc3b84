"""Grids: an in-process Flower ``Grid`` for tests, and the view of a grid without departed nodes.

:class:`InProcessGrid` calls a real ClientApp directly, no SuperLink, no Ray: the same
ServerApp code path and the same ClientApp functions as ``flwr run``, in one process and
in seconds. Test your own app with it. Each node has its own ``Context`` (its node config
and persistent state), and every message's content is deep-copied on the way in and out,
as serialisation would (strategies send one ``RecordDict`` object to many nodes).

:class:`ActiveNodesGrid` is what the unlearning strategy hands the strategy it wraps: the
same grid, with the nodes that have left hidden from sampling.
"""

from __future__ import annotations

import copy
import itertools
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

_CLIENT_EXCEPTION = 1  # error code of a failed ClientApp call


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ``ClientApp`` calls in this process.

    Parameters
    ----------
    client_app : ClientApp or None
        The ClientApp every node runs (``None``: the nodes are only listed; every message fails).
    num_nodes : int
        Number of nodes; node ``i`` gets ``partition-id = i`` and ``num-partitions = num_nodes``.
    run_config : Mapping
        The run config every node sees (flattened keys, as Flower passes it).
    node_ids : iterable of int, optional
        Flower node ids to use (default: distinct large integers, not equal to the partition ids,
        so code that confuses the two fails).
    node_configs : sequence of mappings, optional
        Extra node config per node (a deployed site's ``site``, ``erasure-inbox``, ``data-file``).

    A node id in :attr:`offline` is not listed by :meth:`get_node_ids` and messages to it
    get no reply, as for a SuperNode that is down.
    """

    def __init__(
        self,
        client_app: ClientApp | None,
        num_nodes: int,
        run_config: Mapping[str, Any],
        node_ids: Iterable[int] | None = None,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        self.client_app = client_app
        ids = list(node_ids) if node_ids is not None else [7_000_001 + 37 * i for i in range(num_nodes)]
        if len(ids) != num_nodes or len(set(ids)) != num_nodes:
            raise ValueError("need one distinct node id per node")
        extra = list(node_configs) if node_configs is not None else [{}] * num_nodes
        if len(extra) != num_nodes:
            raise ValueError("need one node config per node")
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes, **extra[i]},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nid in enumerate(ids)
        }
        self.offline: set[int] = set()
        self._counter = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)
        # Messages read the sender's identity from this process-wide record, which a
        # real ServerApp process gets from its SuperLink.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.sent: list[str] = []  # message types sent, in order (for tests)

    def set_run(self, run: Run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return [n for n in self.contexts if n not in self.offline]

    def _deliver(self, msg: Message) -> Message:
        msg.metadata.__dict__["_message_id"] = f"m{next(self._counter)}"  # what a SuperLink assigns
        context = self.contexts.get(msg.metadata.dst_node_id)
        self.sent.append(msg.metadata.message_type)
        if context is None:
            return Message(Error(_CLIENT_EXCEPTION, f"no node {msg.metadata.dst_node_id}"), reply_to=msg)
        if self.client_app is None:  # a grid that only lists its nodes (a benchmark makes the replies itself)
            return Message(Error(_CLIENT_EXCEPTION, "this grid has no ClientApp"), reply_to=msg)
        try:
            copied = Message(metadata=copy.deepcopy(msg.metadata), content=copy.deepcopy(msg.content))  # type: ignore[call-overload]
            reply = self.client_app(copied, context)
        except Exception:  # a failing ClientApp becomes an error reply, as on a SuperNode
            return Message(Error(_CLIENT_EXCEPTION, traceback.format_exc(limit=3)), reply_to=msg)
        if reply.has_content():
            return Message(copy.deepcopy(reply.content), reply_to=msg)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id in self.offline:
                msg.metadata.__dict__["_message_id"] = f"m{next(self._counter)}"
                ids.append(msg.metadata.message_id)  # never answered
                continue
            reply = self._deliver(msg)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:  # noqa: D102
        return self.pull_messages(self.push_messages(messages))


class ActiveNodesGrid(Grid):
    """A view of ``grid`` whose :meth:`get_node_ids` leaves out the nodes ``hidden()`` names.

    Everything else is the underlying grid's: messages, runs, timeouts. A strategy given
    this view samples only among the nodes still in the federation.
    """

    def __init__(self, grid: Grid, hidden: Callable[[], Iterable[int]]) -> None:
        self.grid = grid
        self._hidden = hidden

    def set_run(self, run: Run) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:  # noqa: D102
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        hidden = set(self._hidden())
        return [n for n in self.grid.get_node_ids() if n not in hidden]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:  # noqa: D102
        return self.grid.send_and_receive(messages, timeout=timeout)


class RidingGrid(ActiveNodesGrid):
    """A view of ``grid`` that pushes queued messages right behind the next exchange that sends a given type.

    A deployed SuperNode replies to its message of an exchange, then pulls its next one. A
    message pushed right behind the exchange's runs on each node as soon as it has replied,
    while the server still waits for the slowest node and aggregates — not ahead of the
    exchange (where it delays the node's reply) nor after it (when the node may already be in
    its idle sleep). Only where each node takes one message at a time
    (:func:`one_message_at_a_time`).
    """

    def __init__(self, grid: Grid, hidden: Callable[[], Iterable[int]], interval: float = 0.1) -> None:
        super().__init__(grid, hidden)
        self.interval = float(interval)
        self._riders: list[tuple[str, list[Message], Callable[[list[str]], None], str]] = []

    def ride_behind(
        self, message_type: str, messages: Sequence[Message], pushed: Callable[[list[str]], None], tag: str = ""
    ) -> None:
        """Push ``messages`` right behind the next exchange with a ``message_type`` message; ``pushed(ids)`` then.

        ``tag`` names the rider for :meth:`cancel_riders` (several parts of a ServerApp may queue riders).
        """
        self._riders.append((message_type, list(messages), pushed, tag))

    def cancel_riders(self, tag: str = "") -> list[Message]:
        """The messages still waiting for their exchange (of the riders tagged ``tag``), taken off the queue."""
        out = [m for _, msgs, _, t in self._riders if t == tag for m in msgs]
        self._riders = [r for r in self._riders if r[3] != tag]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The exchange of ``messages``; the riders waiting for one of their types pushed right behind it."""
        msgs = list(messages)
        types = {m.metadata.message_type for m in msgs}
        now = [r for r in self._riders if r[0] in types]
        if not now:
            return self.grid.send_and_receive(msgs, timeout=timeout)
        self._riders = [r for r in self._riders if r[0] not in types]
        ids = list(self.grid.push_messages(msgs))
        for _, extra, pushed, _ in now:
            pushed(list(self.grid.push_messages(extra)))
        return collect(self.grid, ids, timeout, self.interval)


class PromptGrid(ActiveNodesGrid):
    """A view of ``grid`` whose :meth:`send_and_receive` looks for replies every ``interval`` seconds.

    Flower's deployment Grid pushes the messages, then pulls the replies every 3 s: every
    message exchange of a ServerApp takes a multiple of 3 s however fast the clients answer,
    and an unlearning or service round is several exchanges. This one pushes and pulls through
    the same public ``push_messages`` / ``pull_messages`` calls, only more often (a pull is one
    small request to the SuperLink). :func:`prompt` wraps the Grid a ServerApp receives when it
    is the deployment one (the simulation's already pulls every 0.1 s)::

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            grid = prompt(grid)
            ...
    """

    def __init__(self, grid: Grid, interval: float = 0.1) -> None:
        super().__init__(grid, lambda: ())
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.interval = float(interval)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; pull replies every ``interval`` s until all are in or ``timeout`` s have passed."""
        return collect(self.grid, self.grid.push_messages(messages), timeout, self.interval)


def collect(grid: Grid, message_ids: Iterable[str], timeout: float | None, interval: float = 0.1) -> list[Message]:
    """The replies to messages pushed earlier: pulled every ``interval`` s until all are in or ``timeout`` s pass.

    With :meth:`Grid.push_messages`, a query can ride ahead of an exchange: pushed first, its
    replies read after the exchange, by which time a SuperNode has taken both messages back to
    back (no idle poll between them).
    """
    pending = set(message_ids)
    if isinstance(_innermost(grid), InProcessGrid):
        return list(grid.pull_messages(pending))  # it answers as messages are pushed: what is not in never comes
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(interval)
    return replies


def one_message_at_a_time(grid: Grid) -> bool:
    """Whether each node of ``grid`` takes its messages one after the other (so one may ride ahead of another).

    A deployed SuperNode pulls its next message only after replying to the last, and the
    :class:`InProcessGrid` answers each message as it is pushed. Flower's simulation runs a
    node's messages on whichever worker is free, two at once if two are queued, and keeps the
    node state of whichever finishes last: a query pushed ahead of a round could undo what
    the round's training kept in the node's state. Grids seen through :class:`ActiveNodesGrid`
    views are looked at underneath.
    """
    grid = _innermost(grid)
    return isinstance(grid, InProcessGrid) or "HttpGrid" in {c.__name__ for c in type(grid).__mro__}


def _innermost(grid: Grid) -> Grid:
    """The grid underneath :class:`ActiveNodesGrid` views."""
    while isinstance(grid, ActiveNodesGrid):
        grid = grid.grid
    return grid


def prompt(grid: Grid, interval: float = 0.1) -> Grid:
    """``grid`` wrapped in :class:`PromptGrid` if it is Flower's deployment Grid (3 s pulls), else ``grid``."""
    if "HttpGrid" not in {c.__name__ for c in type(grid).__mro__}:
        return grid  # not a deployment Grid: spares importing Flower's SuperLink modules (~1 s)
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # another Flower version: leave it as it is
        return grid
    return PromptGrid(grid, interval) if isinstance(grid, HttpGrid) else grid
