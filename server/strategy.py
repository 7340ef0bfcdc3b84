"""FedAvg with departures: the fed-unlearn strategy.

Ordinary rounds are FedAvg over the clients still in the federation. In the
departure round the configured :class:`~fed_unlearn.unlearning.UnlearningMethod`
decides who trains, what the departing clients are asked to do, and how the replies
combine. The strategy keeps only normal-round state: the global model of the
current round (needed for pseudo-gradients and reply validation), the round
number, and the set of client ids that have left. No per-client update history.

Clients are addressed by their stable client id (the node's ``partition-id``); the
map to Flower node ids is given at construction.
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
from fed_unlearn.spectral import analyze, motion_share
from fed_unlearn.unlearning import UnlearningMethod

from .records import to_record, to_weights


class UnlearningFedAvg(FedAvg):
    """FedAvg whose clients may depart, with their influence removed by ``method``.

    Parameters
    ----------
    clients : Mapping[int, int]
        Client id -> Flower node id of every client in the federation.
    method : UnlearningMethod, optional
        Applied in ``departure_round``; required when ``departing`` is non-empty.
    departing : Sequence[int]
        Client ids that leave in ``departure_round`` (all served in that one round).
    departure_round : int, optional
        Server round in which the unlearning happens.
    excluded : Sequence[int]
        Client ids never trained with (the gold federation's left-out clients).
    """

    def __init__(
        self,
        clients: Mapping[int, int],
        method: UnlearningMethod | None = None,
        departing: Sequence[int] = (),
        departure_round: int | None = None,
        excluded: Sequence[int] = (),
    ) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.node_of = dict(clients)
        self.client_of = {nid: cid for cid, nid in self.node_of.items()}
        unknown = sorted((set(departing) | set(excluded)) - set(self.node_of))
        if unknown:
            raise ValueError(f"unknown client id(s) {unknown}; the federation has clients {sorted(self.node_of)}")
        if departing and (method is None or departure_round is None):
            raise ValueError("departing clients need an unlearning method and a departure round")
        if set(departing) & set(excluded):
            raise ValueError(f"clients {sorted(set(departing) & set(excluded))} are both departing and excluded")
        if not set(self.node_of) - set(departing) - set(excluded):
            raise ValueError("no client would remain in the federation")
        self.method = method
        self.pending = tuple(sorted(departing))
        self.departure_round = departure_round
        self.departed: set[int] = set(excluded)
        self.current_round = 0
        self._global: dict[str, np.ndarray] | None = None
        self._round_start: dict[str, np.ndarray] | None = None
        #: Diagnostics of the last unlearning round (per-layer spectra, motion shares, client metrics).
        self.unlearning_report: dict | None = None

    # -- who is where ---------------------------------------------------------------
    @property
    def active(self) -> list[int]:
        """Client ids still in the federation (departing ones included until served)."""
        return sorted(set(self.node_of) - self.departed)

    @property
    def remaining(self) -> list[int]:
        """Client ids that stay: the active ones minus the pending departures."""
        return sorted(set(self.active) - set(self.pending))

    def is_unlearning_round(self, server_round: int) -> bool:
        """Whether ``server_round`` is the round the pending departures are served in."""
        return bool(self.pending) and server_round == self.departure_round

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> Clients: %s (departed: %s)", sorted(self.node_of), sorted(self.departed))
        if self.pending:
            log(INFO, "\t└──> Departing %s in round %s with %s", list(self.pending), self.departure_round, self.method.name)

    # -- training ---------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the global model to the remaining clients (and the departing ones in the unlearning round)."""
        self._global = self._round_start = to_weights(arrays)
        self.current_round = server_round
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        messages = []
        if self.is_unlearning_round(server_round):
            assert self.method is not None
            # a method may transform the model it sends out (NoT negates layers); replies are
            # pseudo-gradients against what the clients received
            prepared = self.method.prepare_global(self._global)
            if prepared is not self._global:
                validate_updates([ClientUpdate(-1, prepared, 1)], self._global)
                self._global = {k: np.asarray(v) for k, v in prepared.items()}
                arrays = to_record(self._global)
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            if self.method.remaining_clients_train:
                messages += [Message(record, self.node_of[c], MessageType.TRAIN) for c in self.remaining]
            n_rem = len(messages)
            if self.method.departing_clients_train:
                dep_cfg = ConfigRecord({**dict(cfg), **self.method.departing_config(self._global)})
                dep_record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: dep_cfg})
                mtype = MessageType.TRAIN if self.method.departing_task == "train" else f"{MessageType.TRAIN}.{self.method.departing_task}"
                messages += [Message(dep_record, self.node_of[c], mtype) for c in self.pending]
            log(INFO, "configure_train: unlearning round, %s remaining + %s departing clients", n_rem, len(messages) - n_rem)
        else:
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages = [Message(record, self.node_of[c], MessageType.TRAIN) for c in self.active]
            log(INFO, "configure_train: %s clients", len(messages))
        return messages

    def _updates(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        updates = []
        for msg in replies:
            src = msg.metadata.src_node_id
            cid = self.client_of.get(src)
            if cid is None:
                raise InvalidUpdateError(f"reply from unknown node {src}")
            if msg.has_error():
                log(WARNING, "client %s (node %s) failed: %s", cid, src, msg.error.reason)
                continue
            content = msg.content
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                raise InvalidUpdateError(f"client {cid}: a train reply needs exactly one ArrayRecord and one MetricRecord")
            metrics = next(iter(content.metric_records.values()))
            n = metrics.get(self.weighted_by_key)
            weights = to_weights(next(iter(content.array_records.values())))
            updates.append(ClientUpdate(cid, weights, n if isinstance(n, int) else -1))
        return updates

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, then FedAvg (ordinary round) or the method's rule (unlearning round).

        Raises
        ------
        InvalidUpdateError
            If any reply has NaN/inf values, wrong array names or shapes, or no valid
            ``num-examples``; nothing is aggregated and the strategy state is unchanged.
        RuntimeError
            If a departing client did not reply in the unlearning round (the
            departure stays pending).
        """
        if self._global is None or server_round != self.current_round:
            raise RuntimeError(f"aggregate_train for round {server_round} without configure_train")
        replies = list(replies)
        updates = self._updates(replies)
        validate_updates(updates, self._global)
        train_metrics = self._train_metrics(replies)
        if self.is_unlearning_round(server_round):
            assert self.method is not None
            got = {u.client_id for u in updates}
            missing = sorted(set(self.pending) - got) if self.method.departing_clients_train else []
            if missing:
                raise RuntimeError(f"departing client(s) {missing} did not reply in unlearning round {server_round}; nothing was unlearned")
            rem = [u for u in updates if u.client_id not in self.pending]
            dep = [u for u in updates if u.client_id in self.pending]
            new = self.method.aggregate(self._global, rem, dep)
            validate_updates([ClientUpdate(-1, new, 1)], self._global)  # the method itself must not emit NaN
            self.unlearning_report = self._diagnose(server_round, new, replies)
            self.departed |= set(self.pending)
            log(INFO, "aggregate_train: %s unlearned clients %s", self.method.name, list(self.pending))
            self.pending = ()
        else:
            rem = [u for u in updates if u.client_id not in self.departed]
            if not rem:
                log(WARNING, "aggregate_train: no valid replies in round %s; global model unchanged", server_round)
                return None, train_metrics
            new = fedavg(rem)
        return to_record(new), train_metrics

    def _diagnose(self, server_round: int, new: dict[str, np.ndarray], replies: Sequence[Message]) -> dict:
        """Per-layer exponent, stability weight and share of the unlearning motion ``||dw_l|| / ||dw||``."""
        start = self._round_start
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
            if cid in self.pending and not m.has_error():
                clients[str(cid)] = {k: v for k, v in next(iter(m.content.metric_records.values())).items() if not isinstance(v, list)}
        return {"round": server_round, "method": self.method.name, "departing": list(self.pending), "layers": layers,
                "departing-clients": clients}

    @staticmethod
    def _train_metrics(replies: Sequence[Message]) -> MetricRecord:
        """Cost and loss of the round: summed steps/seconds, example-weighted loss."""
        ms = [next(iter(m.content.metric_records.values())) for m in replies if not m.has_error()]
        n = sum(int(m.get("num-examples", 0)) for m in ms)
        return MetricRecord({
            "num-examples": n,
            "clients": len(ms),
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
        return [Message(record, nid, MessageType.EVALUATE) for _, nid in sorted(self.node_of.items())]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Roll client measurements up by role (see :func:`fed_unlearn.evaluation.summarise`)."""
        from fed_unlearn.evaluation import summarise

        from .records import metric_dict

        evals = {}
        for msg in replies:
            if msg.has_error():
                log(WARNING, "evaluation failed on node %s: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            evals[self.client_of[msg.metadata.src_node_id]] = metric_dict(next(iter(msg.content.metric_records.values())))
        if not evals:
            return None
        gone = set(self.departed) | set(self.pending)
        summary = summarise(evals, sorted(gone))
        return MetricRecord({k: float(v) for k, v in summary.items() if np.isfinite(v)})
