"""FedAvg with deletion requests: the fed-unlearn strategy.

Ordinary rounds are FedAvg over the clients still in the federation. In the
unlearning round (from ``departure_round``, one round for every history-free method)
the configured :class:`~fed_unlearn.unlearning.UnlearningMethod` decides who trains,
what the clients holding the data to forget are asked to do, and how the replies
combine. The strategy keeps only normal-round state: the global model of the current
round (needed for pseudo-gradients and reply validation), the round number, who has
left and who trains on retained data only. No per-client update history (FedEraser,
a baseline, keeps its own inside its method object and reports its size).

Deletion requests (see :mod:`fed_unlearn.deletion`): whole clients leave (``leave=True``:
they have only the forget role and stop training afterwards), or clients delete
samples or a class and stay (``leave=False``: both roles in the unlearning round, then
training on their retained data). Clients are addressed by their stable client id
(the node's ``partition-id``); the map to Flower node ids is given at construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed_unlearn.aggregation import ClientUpdate, InvalidUpdateError, fedavg, validate_updates
from fed_unlearn.protocol import ROLE_KEYS
from fed_unlearn.spectral import analyze, motion_share
from fed_unlearn.unlearning import UnlearningMethod

from .records import metric_dict, to_record, to_weights


class UnlearningFedAvg(FedAvg):
    """FedAvg whose clients may ask to be forgotten, with their data's influence removed by ``method``.

    Parameters
    ----------
    clients : Mapping[int, int]
        Client id -> Flower node id of every client in the federation.
    method : UnlearningMethod, optional
        Applied from ``departure_round``; required when ``departing`` is non-empty.
    departing : Sequence[int]
        Client ids whose deletion requests are served from ``departure_round`` (all in
        the same round): the departing clients, or the clients deleting samples / a class.
    departure_round : int, optional
        Server round in which the unlearning starts.
    excluded : Sequence[int]
        Client ids never trained with (the gold federation's left-out clients).
    leave : bool
        Whether the ``departing`` clients leave after the unlearning (whole-client
        deletion) or stay and train on their retained data (sample / class deletion).
    retain_only : Sequence[int]
        Client ids that train on their retained data from the start (the gold federation
        of a sample or class deletion).
    joint_request : bool
        The ``departing`` clients serve one request spread over them (a class removed from
        every client); passed on to the method.
    evaluate_departed : bool
        Whether per-round evaluation also asks the clients that left (experiments measure
        forgetting on their data; a deployed service only evaluates the sites that stay).
    on_missing : {"raise", "skip"}
        When a client asked for the forget role does not reply: ``raise`` (nothing is
        aggregated, the request stays pending) or ``skip`` (a deployed service: the
        request is dropped from this round, left in :attr:`failed`, and the round is
        ordinary FedAvg over the remaining clients' retain-role replies).
    """

    def __init__(
        self,
        clients: Mapping[int, int],
        method: UnlearningMethod | None = None,
        departing: Sequence[int] = (),
        departure_round: int | None = None,
        excluded: Sequence[int] = (),
        leave: bool = True,
        retain_only: Sequence[int] = (),
        joint_request: bool = False,
        evaluate_departed: bool = True,
        on_missing: str = "raise",
    ) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.node_of = dict(clients)
        self.client_of = {nid: cid for cid, nid in self.node_of.items()}
        unknown = sorted((set(departing) | set(excluded) | set(retain_only)) - set(self.node_of))
        if unknown:
            raise ValueError(f"unknown client id(s) {unknown}; the federation has clients {sorted(self.node_of)}")
        if departing and (method is None or departure_round is None):
            raise ValueError("departing clients need an unlearning method and a departure round")
        if set(departing) & set(excluded):
            raise ValueError(f"clients {sorted(set(departing) & set(excluded))} are both departing and excluded")
        if not set(self.node_of) - (set(departing) if leave else set()) - set(excluded):
            raise ValueError("no client would remain in the federation")
        self.method = method
        if method is not None:
            method.joint_request = joint_request
        self.evaluate_departed = evaluate_departed
        if on_missing not in ("raise", "skip"):
            raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
        self.on_missing = on_missing
        #: Requests whose last unlearning attempt failed because a client did not reply.
        self.failed: tuple[int, ...] = ()
        self.pending = tuple(sorted(departing))
        self.departure_round = departure_round
        self.leave = leave
        self.departed: set[int] = set(excluded)
        self.retain_only: set[int] = set(retain_only)
        self.current_round = 0
        self.unlearning_rounds_run = 0
        self._global: dict[str, np.ndarray] | None = None
        self._round_start: dict[str, np.ndarray] | None = None
        self._unlearn_start: dict[str, np.ndarray] | None = None
        #: node id -> {reply record key: role} of the current round's instructions
        self._asked: dict[int, dict[str, str]] = {}
        self._extra: dict[str, object] = {}
        #: Diagnostics of the last unlearning round (per-layer spectra, motion shares, client metrics).
        self.unlearning_report: dict | None = None

    # -- who is where ---------------------------------------------------------------
    @property
    def active(self) -> list[int]:
        """Client ids still in the federation (departing ones included until served)."""
        return sorted(set(self.node_of) - self.departed)

    @property
    def remaining(self) -> list[int]:
        """Client ids with a retain role: the active ones minus the pending departures that leave."""
        return sorted(set(self.active) - (set(self.pending) if self.leave else set()))

    def is_unlearning_round(self, server_round: int) -> bool:
        """Whether ``server_round`` serves the pending requests (the method may take several rounds)."""
        return bool(self.pending) and self.departure_round is not None and server_round >= self.departure_round

    @property
    def unlearning_done(self) -> bool:
        """Whether every request has been served (recovery may be judged from now on)."""
        return not self.pending

    def data_part(self, client_id: int) -> str:
        """What a client's retain role trains on: ``retain`` once it deletes data, else ``all``."""
        deleting = client_id in self.retain_only or (not self.leave and client_id in self.pending
                                                     and self.is_unlearning_round(self.current_round))
        return "retain" if deleting else "all"

    def submit(self, clients: Sequence[int], server_round: int, method: UnlearningMethod, leave: bool = True,
               extra_config: Mapping[str, object] | None = None) -> None:
        """Serve new requests of ``clients`` from ``server_round`` with ``method`` (a deployed service).

        ``extra_config`` goes with every instruction of the unlearning round(s).

        Raises
        ------
        ValueError
            If a request is already being served, or a client is unknown or has left.
        """
        if self.pending:
            raise ValueError(f"the requests of {list(self.pending)} are still being served")
        bad = sorted(set(clients) - set(self.active))
        if bad or not clients:
            raise ValueError(f"cannot serve requests of client(s) {bad or list(clients)}: unknown or already gone")
        if leave and not set(self.active) - set(clients):
            raise ValueError("no client would remain in the federation")
        self.method, self.leave, self.departure_round = method, leave, server_round
        self.pending = tuple(sorted(clients))
        self.unlearning_rounds_run = 0
        self.unlearning_report = None
        self._extra = dict(extra_config or {})

    def cancel(self) -> tuple[int, ...]:
        """Drop the requests being served (their attempt failed); returns them. Membership is unchanged."""
        dropped, self.pending = self.pending, ()
        self.unlearning_rounds_run = 0
        return dropped

    def membership(self) -> dict[str, list[int]]:
        """Who has left and who trains on retained data only (checkpointed with the model)."""
        return {"departed": sorted(self.departed), "retain-only": sorted(self.retain_only)}

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> Clients: %s (departed: %s)", sorted(self.node_of), sorted(self.departed))
        if self.pending:
            log(INFO, "\t└──> Requests of %s in round %s with %s", list(self.pending), self.departure_round, self.method.name)

    # -- training ---------------------------------------------------------------------
    def _message(self, cid: int, arrays: ArrayRecord, cfg: ConfigRecord, mtype: str, keys: dict[str, str]) -> Message:
        self._asked[self.node_of[cid]] = keys
        return Message(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg}), self.node_of[cid], mtype)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Instruct the clients of the round: ordinary training, or the method's unlearning round."""
        self._global = self._round_start = to_weights(arrays)
        self.current_round = server_round
        self._asked = {}
        self.failed = ()
        base = {**dict(config), "server-round": server_round}
        retain_keys = {ROLE_KEYS["retain"][0]: "retain"}
        if not self.is_unlearning_round(server_round):
            messages = [self._message(c, arrays, ConfigRecord({**base, "data-part": self.data_part(c)}), MessageType.TRAIN, retain_keys)
                        for c in self.active]
            log(INFO, "configure_train: %s clients", len(messages))
            return messages
        method = self.method
        assert method is not None
        if self.unlearning_rounds_run == 0:
            self._unlearn_start = self._global
            method.begin(self.pending, self.leave)
        # a method may transform the model it sends out (NoT negates layers, FedEraser and
        # retrain rebuild from the initial model); replies are pseudo-gradients against it
        prepared = method.prepare_global(self._global)
        if prepared is not self._global:
            validate_updates([ClientUpdate(-1, prepared, 1)], self._global)
            self._global = {k: np.asarray(v) for k, v in prepared.items()}
            arrays = to_record(self._global)
        retain_cfg = {**base, **method.remaining_config()}
        forget_cfg = {**base, **self._extra, **(method.departing_config(self._global) if method.departing_clients_train else {})}
        task = method.departing_task
        mtype = MessageType.TRAIN if task == "train" else f"{MessageType.TRAIN}.{task}"
        messages = []
        for c in self.active:
            retain = method.remaining_clients_train and c in self.remaining
            forget = method.departing_clients_train and c in self.pending
            if forget and self.leave and task == "train":
                # a departing client's PUF round is an ordinary training round on all its data
                messages.append(self._message(c, arrays, ConfigRecord({**forget_cfg, "data-part": "all"}), MessageType.TRAIN,
                                              {ROLE_KEYS["retain"][0]: "forget"}))
            elif forget:
                roles = "retain,forget" if retain else "forget"
                keys = {ROLE_KEYS["forget"][0]: "forget", **({ROLE_KEYS["retain"][0]: "retain"} if retain else {})}
                cfg = ConfigRecord({**forget_cfg, **({k: v for k, v in retain_cfg.items() if k not in forget_cfg} if retain else {}),
                                    "roles": roles, "data-part": self.data_part(c)})
                messages.append(self._message(c, arrays, cfg, mtype, keys))
            elif retain:
                messages.append(self._message(c, arrays, ConfigRecord({**retain_cfg, "data-part": self.data_part(c)}), MessageType.TRAIN,
                                              retain_keys))
        n_forget = sum("forget" in k.values() for k in self._asked.values())
        log(INFO, "configure_train: unlearning round %d/%d, %s clients (%s with a forget role)",
            self.unlearning_rounds_run + 1, method.num_rounds, len(messages), n_forget)
        return messages

    def _updates(self, replies: Iterable[Message]) -> tuple[list[ClientUpdate], list[ClientUpdate]]:
        """Retain-role and forget-role updates of the replies, checked against what was asked."""
        retain, forget = [], []
        for msg in replies:
            src = msg.metadata.src_node_id
            cid = self.client_of.get(src)
            if cid is None:
                raise InvalidUpdateError(f"reply from unknown node {src}")
            if msg.has_error():
                log(WARNING, "client %s (node %s) failed: %s", cid, src, msg.error.reason)
                continue
            asked = self._asked.get(src)
            if asked is None:
                raise InvalidUpdateError(f"client {cid}: reply to an instruction it was not sent this round")
            content = msg.content
            metric_key = {a: m for a, m in ROLE_KEYS.values()}
            expected = set(asked) | {metric_key[a] for a in asked}
            got = set(content.array_records) | set(content.metric_records)
            if got != expected or content.config_records:
                raise InvalidUpdateError(f"client {cid}: a train reply needs exactly the records {sorted(expected)}, got {sorted(got)}")
            for akey, role in asked.items():
                metrics = content.metric_records[metric_key[akey]]
                n = metrics.get(self.weighted_by_key)
                update = ClientUpdate(cid, to_weights(content.array_records[akey]), n if isinstance(n, int) else -1, dict(metrics))
                (retain if role == "retain" else forget).append(update)
        return retain, forget

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, then FedAvg (ordinary round) or the method's rule (unlearning round).

        Raises
        ------
        InvalidUpdateError
            If any reply has NaN/inf values, wrong array names or shapes, records it was
            not asked for, or no valid ``num-examples``; nothing is aggregated and the
            strategy state is unchanged.
        RuntimeError
            If a departing client did not reply in the unlearning round (the request
            stays pending).
        """
        if self._global is None or server_round != self.current_round:
            raise RuntimeError(f"aggregate_train for round {server_round} without configure_train")
        replies = list(replies)
        rem, dep = self._updates(replies)
        validate_updates(rem + dep, self._global)
        train_metrics = self._train_metrics(replies)
        if not self.is_unlearning_round(server_round):
            rem = [u for u in rem if u.client_id not in self.departed]
            if not rem:
                log(WARNING, "aggregate_train: no valid replies in round %s; global model unchanged", server_round)
                return None, train_metrics
            new = fedavg(rem)
            if self.method is not None:
                self.method.observe(server_round, self._round_start, rem)
            return to_record(new), train_metrics
        method = self.method
        assert method is not None
        asked_forget = {self.client_of[n] for n, k in self._asked.items() if "forget" in k.values()}
        missing = sorted(asked_forget - {u.client_id for u in dep})
        if missing and self.on_missing == "skip":
            self.failed = self.cancel()
            log(WARNING, "client(s) %s did not reply in unlearning round %s; their requests stay pending", missing, server_round)
            rem = [u for u in rem if u.client_id not in self.departed]
            return (to_record(fedavg(rem)) if rem else None), train_metrics
        if missing:
            raise RuntimeError(f"departing client(s) {missing} did not reply in unlearning round {server_round}; nothing was unlearned")
        new = method.aggregate(self._global, rem, dep)
        validate_updates([ClientUpdate(-1, new, 1)], self._global)  # the method itself must not emit NaN
        self.unlearning_rounds_run += 1
        if self.unlearning_rounds_run >= method.num_rounds:
            self.unlearning_report = self._diagnose(server_round, new, replies)
            if self.leave:
                self.departed |= set(self.pending)
            else:
                self.retain_only |= set(self.pending)
            log(INFO, "aggregate_train: %s served the requests of clients %s", method.name, list(self.pending))
            self.pending = ()
        return to_record(new), train_metrics

    def _diagnose(self, server_round: int, new: dict[str, np.ndarray], replies: Sequence[Message]) -> dict:
        """Per-layer exponent, stability weight and share of the unlearning motion ``||dw_l|| / ||dw||``."""
        start = self._unlearn_start
        assert start is not None and self.method is not None
        spectra = {s.layer: s for s in analyze(start, getattr(self.method, "gate", None))}
        share = motion_share({k: np.asarray(new[k], np.float64) - np.asarray(g, np.float64) for k, g in start.items()})
        layers = []
        for layer, frac in share.items():
            s = spectra.get(layer)
            layers.append({"layer": layer, "motion-share": frac, **({
                "shape": list(s.shape), "alpha": s.alpha, "xmin": s.xmin, "ks-distance": s.ks_distance, "nu": s.nu,
            } if s else {})})
        clients = {}
        for m in replies:
            cid = self.client_of.get(m.metadata.src_node_id)
            asked = self._asked.get(m.metadata.src_node_id, {})
            forget_key = next((a for a, role in asked.items() if role == "forget"), None)
            if cid in self.pending and forget_key is not None and not m.has_error():
                mkey = {a: mk for a, mk in ROLE_KEYS.values()}[forget_key]
                clients[str(cid)] = {k: v for k, v in m.content.metric_records[mkey].items() if not isinstance(v, list)}
        return {"round": server_round, "rounds": self.unlearning_rounds_run, "method": self.method.name,
                "departing": list(self.pending), "layers": layers, "departing-clients": clients,
                "history-bytes": self.method.history_bytes()}

    @staticmethod
    def _train_metrics(replies: Sequence[Message]) -> MetricRecord:
        """Cost and loss of the round over every role's reply: summed steps/seconds, example-weighted loss."""
        ms = [m for r in replies if not r.has_error() for m in r.content.metric_records.values()]
        n = sum(int(m.get("num-examples", 0)) for m in ms)
        return MetricRecord({
            "num-examples": n,
            "clients": sum(1 for r in replies if not r.has_error()),
            "train-steps": int(sum(int(m.get("train-steps", 0)) for m in ms)),
            "train-seconds": float(sum(float(m.get("train-seconds", 0.0)) for m in ms)),
            "train-loss": float(sum(float(m.get("train-loss", 0.0)) * int(m.get("num-examples", 0)) for m in ms) / max(n, 1)),
        })

    # -- evaluation -------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Ask every client, departed ones included, to measure the model on its own data.

        Departed clients are asked too because the experiment measures forgetting on
        their data; in a deployment where a site is gone its reply is simply missing.
        """
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
        asked = sorted(self.node_of) if self.evaluate_departed else self.active
        return [Message(record, self.node_of[c], MessageType.EVALUATE) for c in asked]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Roll client measurements up over the federation (see :func:`fed_unlearn.evaluation.summarise`)."""
        from fed_unlearn.evaluation import summarise

        evals = {}
        for msg in replies:
            if msg.has_error():
                log(WARNING, "evaluation failed on node %s: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            evals[self.client_of[msg.metadata.src_node_id]] = metric_dict(next(iter(msg.content.metric_records.values())))
        if not evals:
            return None
        summary = summarise(evals)
        return MetricRecord({k: float(v) for k, v in summary.items() if np.isfinite(v)})
