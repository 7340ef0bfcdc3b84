"""A plain Flower ServerApp for benchmarks: stock ``FedAvg`` driving this repository's ClientApp, no unlearning.

The yardstick of :mod:`simulations.bench_deploy`: the same ClientApp, model, data and
deployment as the erasure service, with Flower's own round loop (``Strategy.start``) and
strategy. Replies are pulled every 0.1 s as the service pulls them
(:func:`fed_unlearn.flower.grid.prompt`; Flower's deployment Grid pulls every 3 s), so the
comparison is of what the service adds, not of the pull interval. Each round's wall time is
written to ``<results-dir>/stock-rounds.json``.

``floor`` is the floor of a round on the same deployment: rounds of the same two exchanges
(every node, one message each, twice), whose tasks do nothing but answer
``query.identify`` — what a round pays for Flower's messaging (the SuperNode's idle poll,
the task's start, the reply check) before any training or evaluation. Its round times go to
``<results-dir>/floor-rounds.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fed_unlearn.data import load_dataset
from fed_unlearn.flower import to_record
from fed_unlearn.flower.grid import prompt
from fed_unlearn.flower.wire import identify_request
from fed_unlearn.models import build_model, get_weights
from fed_unlearn.protocol import IDENTIFY

app = ServerApp()
floor = ServerApp()


class TimedFedAvg(FedAvg):
    """Stock FedAvg that notes when each round's training starts."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.starts: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's own, timestamped."""
        self.starts[server_round] = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)


def round_seconds(starts: dict[int, float], end: float) -> dict[int, float]:
    """Round r's wall time: from its training's start to the next round's (the last one: to ``end``)."""
    rounds = sorted(starts)
    if not rounds:
        return {}
    bounds = [starts[r] for r in rounds[1:]] + [end]
    return {r: b - starts[r] for r, b in zip(rounds, bounds, strict=True)}


def connected(grid: Grid, wait: float, settle: float = 5.0) -> int:
    """How many nodes are connected, once none has joined for ``settle`` seconds (at most ``wait``)."""
    deadline, count, since = time.monotonic() + wait, 0, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count and time.monotonic() - since >= settle:
            break
        time.sleep(0.5)
    return max(count, 1)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``num-server-rounds`` rounds of FedAvg over every connected node."""
    rc = context.run_config
    nodes = connected(grid, float(rc["node-wait-seconds"]))
    ds = load_dataset(str(rc["dataset"]), str(rc["data-dir"]))
    model = build_model(str(rc["model"]), ds.input_shape, ds.num_classes, seed=int(rc["seed"]))
    strategy = TimedFedAvg(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=nodes, min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
    )  # fmt: skip
    strategy.start(
        grid=prompt(grid),
        initial_arrays=to_record(get_weights(model)),
        num_rounds=int(rc["num-server-rounds"]),
        timeout=float(rc["round-timeout"]),
    )
    out = Path(str(rc["results-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    times = round_seconds(strategy.starts, time.perf_counter())
    (out / "stock-rounds.json").write_text(json.dumps({str(r): s for r, s in times.items()}, indent=2))


@floor.main()
def floor_main(grid: Grid, context: Context) -> None:
    """``num-server-rounds`` rounds of two exchanges whose tasks do nothing (one ``query.identify`` per node)."""
    rc = context.run_config
    wanted = connected(grid, float(rc["node-wait-seconds"]))
    grid = prompt(grid)
    nodes = sorted(grid.get_node_ids())[:wanted]
    starts: dict[int, float] = {}
    for rnd in range(1, int(rc["num-server-rounds"]) + 1):
        starts[rnd] = time.perf_counter()
        for _ in ("train", "evaluate"):  # the places of a round's two exchanges
            msgs = [Message(identify_request(["partition-id"]), n, IDENTIFY) for n in nodes]
            replies = list(grid.send_and_receive(msgs, timeout=float(rc["round-timeout"])))
            if len(replies) != len(nodes) or any(r.has_error() for r in replies):
                raise RuntimeError(f"round {rnd}: {len(replies)} replies from {len(nodes)} nodes, or an error")
    out = Path(str(rc["results-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    times = round_seconds(starts, time.perf_counter())
    (out / "floor-rounds.json").write_text(json.dumps({str(r): s for r, s in times.items()}, indent=2))
