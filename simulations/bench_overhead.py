"""Benchmark: the fed-unlearn strategy's cost in ordinary rounds vs Flower's stock FedAvg.

    python -m simulations.bench_overhead                 # 10 clients, 3 rounds, 5 repeats each, alternating

Three strategies: Flower's stock ``FedAvg``; ``Unlearning(FedAvg(...))``, the wrapper around
that same strategy (what a Flower app adding unlearning runs: the wrapper's own cost); and
``Unlearning(ReproducibleFedAvg(...))``, the project's apps' choice (the average accumulated
in float64 in client order, bit-reproducible). All run the same loop (``Strategy.start`` of
flwr), the same real ClientApp (train + evaluate every round) on the same in-process Grid
(no Ray: the engine's own noise would drown a few percent), the same model, clients and data. Reported per strategy, as
medians over repeats: rounds/s, client-updates/s, and the **server-side** seconds per round
(wall time minus the time spent inside ``send_and_receive``, i.e. the strategy's own work:
configure, validate, aggregate, summarise). The ratio of the server-side times is the
overhead of what fed-unlearn adds to a normal round (validation of every update, the role
bookkeeping, the evaluation roll-up); the total-time ratio is what a user sees. The clients'
time per round (inside ``send_and_receive``) is printed beside it: the same work for every
strategy, so its change is the machine's noise, and the server's extra work as a share of
the round is the wrapper's part of the total.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from fed_unlearn.flower import InProcessGrid

from .inprocess import fused_run_config
from .run_experiment import PROJECT_ROOT


class TimedGrid(InProcessGrid):
    """An in-process Grid that adds up the time spent delivering messages (the clients' share)."""

    client_seconds = 0.0

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:  # noqa: D102
        t0 = time.perf_counter()
        out = list(super().send_and_receive(messages, timeout=timeout))
        self.client_seconds += time.perf_counter() - t0
        failed = [m.error.reason or "" for m in out if m.has_error()]
        if failed:  # a benchmark of failing rounds measures nothing
            raise RuntimeError(f"{len(failed)} client(s) failed: {failed[0][:500]}")
        return out


STOCK, WRAPPED, REPRODUCIBLE = "flwr-fedavg", "fed-unlearn", "fed-unlearn-repro"
#: What is timed: stock FedAvg, the wrapper around it, the wrapper around ReproducibleFedAvg.
KINDS = (STOCK, WRAPPED, REPRODUCIBLE)


def run_once(kind: str, clients: int, rounds: int, overrides: str) -> dict[str, float]:
    """``rounds`` ordinary rounds of ``kind`` (one of :data:`KINDS`); timings."""
    from clients.client_app import app as client_app
    from fed_unlearn.data import load_dataset
    from fed_unlearn.flower import ReproducibleFedAvg, Unlearning, to_record
    from fed_unlearn.models import build_model, get_weights

    rc = fused_run_config(str(PROJECT_ROOT), overrides)
    grid = TimedGrid(client_app, clients, rc)
    node_ids = list(grid.contexts)
    ds = load_dataset(str(rc["dataset"]), str(rc["data-dir"]))
    model = build_model(str(rc["model"]), ds.input_shape, ds.num_classes, seed=int(rc["seed"]))
    initial = to_record(get_weights(model))
    args: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": clients,
        "min_evaluate_nodes": clients,
        "min_available_nodes": clients,
    }
    strategy: Strategy = ReproducibleFedAvg(**args) if kind == REPRODUCIBLE else FedAvg(**args)
    if kind != STOCK:
        wrapped = Unlearning(strategy)
        for i, n in enumerate(node_ids):
            wrapped.set_identity(n, **{"partition-id": i})
        strategy = wrapped
    t0 = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        timeout=600.0,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    wall = time.perf_counter() - t0
    return {
        "rounds/s": rounds / wall,
        "updates/s": rounds * clients / wall,
        "server-s/round": (wall - grid.client_seconds) / rounds,
        "wall-s/round": wall / rounds,
        "client-s/round": grid.client_seconds / rounds,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--run-config", default="local-epochs=1", help="overrides of the app's run config")
    args = ap.parse_args(argv)
    import torch

    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, client threads 1; {args.clients} clients, "
        f"{args.rounds} rounds x {args.repeats} repeats (alternating), run config: {args.run_config!r}"
    )
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for kind in KINDS:  # warm-up: imports, dataset cache, each strategy's first call
        run_once(kind, args.clients, 1, args.run_config)
    for i in range(args.repeats):
        for kind in KINDS if i % 2 == 0 else KINDS[::-1]:
            runs[kind].append(run_once(kind, args.clients, args.rounds, args.run_config))
    med = {k: {m: statistics.median(r[m] for r in runs[k]) for m in runs[k][0]} for k in KINDS}
    print(
        f"{'strategy':18s} {'rounds/s':>9s} {'updates/s':>10s} {'wall s/round':>13s} {'client s/round':>15s} "
        f"{'server s/round':>15s}"
    )
    for k in KINDS:
        m = med[k]
        print(
            f"{k:18s} {m['rounds/s']:9.3f} {m['updates/s']:10.2f} {m['wall-s/round']:13.3f} "
            f"{m['client-s/round']:15.3f} {m['server-s/round']:15.4f}"
        )
    base = med[STOCK]
    for k, what in ((WRAPPED, "Unlearning(FedAvg)"), (REPRODUCIBLE, "Unlearning(ReproducibleFedAvg)")):
        total = med[k]["wall-s/round"] / base["wall-s/round"] - 1
        server = med[k]["server-s/round"] - base["server-s/round"]
        clients = med[k]["client-s/round"] / base["client-s/round"] - 1
        share = server / base["wall-s/round"]
        print(
            f"{what} vs FedAvg per ordinary round: total {total:+.1%} (target <= 3%; the clients' time "
            f"{clients:+.1%}, the server's extra work {share:+.1%} of the round), server-side "
            f"{server * 1000:+.1f} ms = {med[k]['server-s/round'] / base['server-s/round']:.2f}x the stock "
            "strategy's own work (target <= 1.3x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
