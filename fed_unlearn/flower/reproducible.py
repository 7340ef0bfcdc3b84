"""FedAvg whose sum does not depend on the order replies arrive in."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from ..aggregation import ClientUpdate, fedavg
from .records import array_records, metric_records, read_weights, to_record, wire_dtypes


class ReproducibleFedAvg(FedAvg):
    """FedAvg whose model average is accumulated in float64, in the order the replies are given.

    Flower's FedAvg sums arrays in arrival order, which varies between runs; with
    ``Unlearning(..., reproducible=True)`` the wrapper hands replies over in client order,
    so with this strategy the same seed gives the same numbers to the last bit. Each array
    keeps the dtype of the first reply's. Takes FedAvg's arguments.
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
            n = next(iter(metric_records(msg.content).values()))[self.weighted_by_key]
            updates.append(ClientUpdate(i, read_weights(next(iter(array_records(msg.content).values()))), n))  # type: ignore[arg-type]
        first = next(iter(array_records(valid[0].content).values()))
        arrays = to_record(fedavg(updates), wire_dtypes(first))
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
