"""Benchmark: peak resident memory of the server with 10, 50, 100 clients, vs departures handled.

    python -m simulations.bench_memory

Each configuration runs in a fresh Python process that drives the real strategy
(:class:`fed_unlearn.flower.Unlearning` around FedAvg, configure -> replies -> aggregate, with the
reply validation and the method's rule) with **synthetic** client replies of the real
model's size (MLP 784-200-100-10, 0.71 MB as float32): no client training, so the peak RSS
(``ru_maxrss``) is the server's own. Reported: the process's peak RSS, and its growth over
the RSS after start-up (imports and the model).

* PUF: ``K`` clients, 20 rounds, ``D`` = 0, 1, 5 or 9 clients leaving one after another
  (every other round). A history-free method must be flat in ``D``.
* FedEraser (the baseline that stores every client's update at every round): ``K`` clients,
  ``R`` ordinary rounds before one departure; its stored history is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any

import numpy as np


def child(clients: int, rounds: int, departures: int, method_name: str) -> dict[str, Any]:
    """Run one configuration in this process; return its memory figures."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fed_unlearn.flower import InProcessGrid, ReproducibleFedAvg, Unlearning, to_record, to_weights
    from fed_unlearn.models import build_model, get_weights
    from fed_unlearn.protocol import ROLE_KEYS
    from fed_unlearn.unlearning import make_method

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    base = {k: v.astype(np.float32) for k, v in get_weights(build_model("mlp", (1, 28, 28), 10, seed=0)).items()}
    node_of = {c: 10_000 + c for c in range(clients)}
    grid = InProcessGrid(None, clients, {}, node_ids=list(node_of.values()))  # lists the nodes; replies are made here
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method = make_method(method_name)
    strategy = Unlearning(ReproducibleFedAvg(min_available_nodes=1, min_train_nodes=1), method)
    for c, n in node_of.items():
        strategy.set_identity(n, **{"partition-id": c})
    if method_name == "federaser":  # FedEraser: one departure after `rounds` ordinary rounds
        strategy.request_unlearning(0, round=rounds + 1)
        schedule: dict[int, int] = {}
        total = rounds + method.rounds_needed(rounds)
    else:
        schedule = {2 * (i + 1): i for i in range(departures)}  # client i leaves in round 2(i+1)
        total = rounds
    arrays = to_record(base)
    rng = np.random.default_rng(0)
    for rnd in range(1, total + 1):
        if rnd in schedule:
            strategy.request_unlearning(schedule[rnd], round=rnd, method=make_method(method_name))
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        start = to_weights(msgs[0].content.array_records["arrays"]) if msgs else base
        replies = []
        for m in msgs:
            content: dict[str, Any] = {}
            for akey, _ in strategy._asked[m.metadata.dst_node_id].items():
                akey = ROLE_KEYS["retain"][0] if akey == "*" else akey
                mkey = {a: mk for a, mk in ROLE_KEYS.values()}[akey]
                w = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in start.items()}
                content[akey] = to_record(w)
                content[mkey] = MetricRecord({"num-examples": 100, "train-steps": 1})
            replies.append(Message(RecordDict(content), reply_to=m))
        new, _ = strategy.aggregate_train(rnd, replies)
        arrays = new if new is not None else arrays
        del replies, msgs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "clients": clients,
        "rounds": total,
        "departures": len(strategy.departed),
        "method": method_name,
        "peak-rss-mb": peak / 1024,
        "growth-mb": (peak - rss0) / 1024,
        "history-mb": method.history_bytes() / 1e6,
    }


def measure(clients: int, rounds: int, departures: int, method: str) -> dict[str, Any]:
    """Run :func:`child` in a fresh process (a clean peak RSS)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.bench_memory",
            "--child",
            str(clients),
            str(rounds),
            str(departures),
            method,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=4, metavar=("K", "R", "D", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 50, 100])
    args = ap.parse_args(argv)
    if args.child:
        k, r, d, m = args.child
        print(json.dumps(child(int(k), int(r), int(d), m)))
        return 0
    print(f"machine: {os.cpu_count()} cores; model MLP 784-200-100-10 (0.71 MB float32); synthetic replies")
    print("\nPUF, 20 rounds: peak RSS of the server process (MB) by departures handled")
    deps = (0, 1, 5, 9)
    print(f"{'clients':>8s} " + " ".join(f"{f'D={d}':>10s}" for d in deps) + "   spread")
    for k in args.clients:
        row = [measure(k, 20, d, "puf")["peak-rss-mb"] for d in deps]
        print(f"{k:8d} " + " ".join(f"{v:10.1f}" for v in row) + f"   {max(row) - min(row):6.1f}")
    print("\nFedEraser, one departure after R rounds: peak RSS (MB) / stored history (MB)")
    rounds = (5, 10, 20)
    print(f"{'clients':>8s} " + " ".join(f"{f'R={r}':>16s}" for r in rounds))
    for k in args.clients:
        cells = []
        for r in rounds:
            res = measure(k, r, 1, "federaser")
            cells.append(f"{res['peak-rss-mb']:7.0f} /{res['history-mb']:7.0f}")
        print(f"{k:8d} " + " ".join(f"{c:>16s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
