"""The user's ServerApp: their strategy, wrapped for unlearning, under Flower's own Strategy.start().

Test instrumentation (a user would not need it): the grid records every message; a gold
federation (the same rounds without the departing partition) and the federation as it would
have gone without the request are trained too; the models' accuracies are measured
centrally on the simulation's data; everything goes to the ``results`` JSON file.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg

from fed_unlearn.deletion import DeletionRequest
from fed_unlearn.flower import ActiveNodesGrid, Unlearning

from .task import Net, load_data, test

app = ServerApp()


class RecordingGrid(ActiveNodesGrid):
    """The run's grid, recording (message type, node, server round) of everything sent."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid, lambda: ())
        self.log: list[tuple[str, int, int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        for m in msgs:
            cfg = m.content.config_records.get("config")
            self.log.append(
                (m.metadata.message_type, m.metadata.dst_node_id, int(cfg.get("server-round", 0)) if cfg else 0)
            )
        return self.grid.send_and_receive(msgs, timeout=timeout)


def wrapped(name: str, num_nodes: int) -> Any:
    kw = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=num_nodes,
    )
    if name == "fedprox":
        return FedProx(proximal_mu=0.01, **kw)
    if name == "fedadam":
        return FedAdam(eta=0.01, eta_l=0.05, tau=1e-3, **kw)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=0.25, **kw)
    return FedAvg(**kw)


def accuracies(arrays: ArrayRecord, departing: int, num: int, deleted: Any = None) -> dict[str, float]:
    """Central measurement (simulation only): the departing partition's train data, the others' test data."""
    net = Net()
    net.load_state_dict(arrays.to_torch_state_dict())
    train, _ = load_data(departing, num)
    out = {"forget-acc": test(net, train)[1]}
    correct = n = 0
    for pid in range(num):
        if pid == departing:
            continue
        _, loader = load_data(pid, num)
        loss, acc = test(net, loader)
        correct, n = correct + acc * len(loader.dataset), n + len(loader.dataset)
    out["test-acc"] = correct / n
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rounds, d, departing = int(rc["num-server-rounds"]), int(rc["departure-round"]), int(rc["departing"])
    grid = RecordingGrid(grid)
    num = len(list(grid.get_node_ids()))
    torch.manual_seed(0)
    initial = ArrayRecord(Net().state_dict())

    snapshots: dict[str, dict[int, ArrayRecord]] = {"gold": {}, "kept": {}, "run": {}}

    def keep(name: str):
        def fn(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            snapshots[name][rnd] = arrays
            return None

        return fn

    # the gold: the same rounds, from the same model, without the departing partition
    gold_strategy = Unlearning(wrapped(str(rc["strategy"]), num), None)
    gold_strategy.identify(grid, grid.get_node_ids())
    gold_strategy.leave_out(
        *(n for n, ident in gold_strategy.identities.items() if int(ident["partition-id"]) == departing)
    )
    gold_strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=keep("gold"))
    # the federation had nobody asked to be forgotten
    wrapped(str(rc["strategy"]), num).start(
        grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=keep("kept")
    )
    grid.log.clear()

    # the federation: a plain strategy, wrapped; the departure is requested before start()
    strategy = Unlearning(
        wrapped(str(rc["strategy"]), num), str(rc["method"]), memorisation_z=float(rc.get("memorisation-z", 2.0))
    )
    samples = str(rc["scenario"]) == "samples"
    strategy.request_unlearning(
        departing, round=d, leave=not samples, deletion=DeletionRequest("samples", fraction=0.3) if samples else None
    )
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=keep("run"))
    node = next(n for n, ident in strategy.identities.items() if int(ident["partition-id"]) == departing)
    out = {
        "original": accuracies(snapshots["run"][d - 1], departing, num),
        "unlearned": accuracies(snapshots["run"][d], departing, num),
        "gold": accuracies(snapshots["gold"][d - 1], departing, num),
        "recovered": accuracies(result.arrays, departing, num),
        "gold-end": accuracies(snapshots["gold"][rounds], departing, num),
        "kept-end": accuracies(snapshots["kept"][rounds], departing, num),
        "kept-unlearning-round": accuracies(snapshots["kept"][d], departing, num),
        "train-metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate-metrics": {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        "departing-node": node,
        "sent": grid.log,
        "departed": sorted(strategy.departed),
        "retain-only": sorted(strategy.retain_only),
    }
    if rc["results"]:
        with open(str(rc["results"]), "w") as f:
            json.dump(out, f)
