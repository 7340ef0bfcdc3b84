"""The message-building part of the strategy: what each node is sent in an unlearning round.

The wrapped strategy builds its own messages (its sampling, its config); the unlearning round
starts from them. The remaining clients get the wrapped strategy's training message (or
``train.retain`` when they deleted samples), the departing ones ``train.unlearn`` with the
roles and settings the method asks for (:mod:`fed_unlearn.protocol`), and every node's
expected reply records are noted for the reply check. The utility bound's evaluation
messages are the wrapped strategy's own, carrying a candidate model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import protocol as P
from ..aggregation import validate_update
from ..calibration import target_for
from ..unlearning import UnlearningMethod
from .grid import ActiveNodesGrid
from .requests import UnlearningRequest


class MessageBuilder:
    """The message-building part of :class:`~fed_unlearn.flower.Unlearning` (state lives on the strategy)."""

    strategy: Strategy
    class_floor: float
    current_round: int
    pending: tuple[int, ...]
    retain_only: set[int]
    unlearning_rounds_run: int
    _batch: UnlearningRequest | None
    _method: UnlearningMethod | None
    _global: dict[str, np.ndarray] | None
    _unlearn_start: dict[str, np.ndarray] | None
    _asked: dict[int, dict[str, str]]
    _sent: dict[int, Message]
    _own_type: str

    if TYPE_CHECKING:  # provided by the strategy this mixin is part of

        def client_id(self, node_id: int) -> int: ...

        def _keys(self) -> tuple[str, str, str]: ...

        def _record(self, weights: Mapping[str, np.ndarray]) -> ArrayRecord: ...

        def _hidden(self) -> set[int]: ...

        def _adjust_minimums(self, also_hidden: int = 0) -> None: ...

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
            forget_extra = {
                **({P.FORGET_ALL: True} if batch.leave else {}),
                P.TARGET: target_for(batch.scenario),
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

    def _evaluate_template(self, grid: Grid, arrays: ArrayRecord) -> list[Message]:
        """The wrapped strategy's evaluation messages to the remaining clients (the utility bound's)."""
        hidden = self._hidden() | set(self.pending)
        active = ActiveNodesGrid(grid, lambda: hidden)
        if not list(active.get_node_ids()):
            return []  # every node is forgetting (a class): nobody remains to evaluate, and sampling would wait forever
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
