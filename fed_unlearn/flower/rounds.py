"""The project's round loop: train, then evaluate, round after round, with hooks and an early stop.

Flower's ``Strategy.start()`` runs a fixed number of rounds; the experiment (which stops
recovery early, and pauses between the original rounds and the unlearning for the
deletion request and the gold federation) and the erasure service (which polls sites
and commits a checkpoint every round) need hooks around each round. This is the one loop
both use; each round is the same train-then-evaluate sequence as ``Strategy.start()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .records import metric_dict


class NoValidRepliesError(RuntimeError):
    """A training round in which no client sent a usable reply."""


@dataclass
class FederationRun:
    """The trace of one federation: per-round summaries and client-compute."""

    history: dict[int, dict[str, float]] = field(default_factory=dict)
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    rounds_run: int = 0
    wall_seconds: float = 0.0

    def compute(self, first_round: int = 1) -> dict[str, float]:
        """Client-compute (optimizer steps, seconds) summed over rounds ``>= first_round``."""
        rows = [m for r, m in self.train.items() if r >= first_round]
        return {
            "train-steps": float(sum(m.get("total-train-steps", 0) for m in rows)),
            "train-seconds": float(sum(m.get("total-train-seconds", 0.0) for m in rows)),
            "rounds": float(len(rows)),
        }


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    run: FederationRun,
    rounds: range,
    timeout: float,
    label: str,
    stop: Callable[[int, dict[str, float]], bool] | None = None,
    train_config: Callable[[int], dict[str, Any]] | None = None,
    before_round: Callable[[int, ArrayRecord], None] | None = None,
    after_round: Callable[[int, ArrayRecord, dict[str, float]], None] | None = None,
    fail_on_empty: bool = True,
) -> FederationRun:
    """Run ``rounds`` of ``strategy`` (train, then evaluate), continuing ``run``.

    ``run.arrays`` is the model the first round starts from and, on return, the model
    after the last round run. ``train_config(round)`` adds keys to the round's training
    config; ``before_round(round, arrays)`` and ``after_round(round, arrays, summary)``
    run around each round; ``stop(round, summary) -> bool`` after each round's
    evaluation ends the run early.

    Raises
    ------
    NoValidRepliesError
        If ``fail_on_empty`` and a training round produced no model: every client failed
        or sent an invalid reply (the message lists why, client by client).
    """
    t0 = time.perf_counter()
    if run.arrays is None:
        raise ValueError("run.arrays must hold the model the first round starts from")
    arrays = run.arrays
    for rnd in range(rounds.start, rounds.stop, rounds.step):
        t_round = time.perf_counter()
        if before_round is not None:
            before_round(rnd, arrays)
        t_train = time.perf_counter()
        config = ConfigRecord(dict(train_config(rnd)) if train_config is not None else {})
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, config, grid), timeout=timeout)
        t_aggregate = time.perf_counter()
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        t_evaluate = time.perf_counter()
        if new_arrays is not None:
            arrays = new_arrays
        elif fail_on_empty:
            problems = getattr(strategy, "last_round_problems", {})
            detail = "; ".join(f"node {n}: {p}" for n, p in sorted(problems.items())) or "no replies"
            raise NoValidRepliesError(f"[{label}] round {rnd}: no client sent a usable training reply ({detail})")
        if train_metrics is not None:
            run.train[rnd] = metric_dict(train_metrics)
        evals = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid), timeout=timeout)
        summary = strategy.aggregate_evaluate(rnd, evals)
        run.history[rnd] = metric_dict(summary) if summary is not None else {}
        t_end = time.perf_counter()
        # where a round's wall time goes (the deployment benchmark reads these)
        run.history[rnd].update(
            {
                "round-seconds": t_end - t_round,
                "before-round-seconds": t_train - t_round,
                "train-wall-seconds": t_evaluate - t_train,
                # of which the aggregation: with an unlearning step, its calibration's exchanges
                "aggregate-train-seconds": t_evaluate - t_aggregate,
                "evaluate-wall-seconds": t_end - t_evaluate,
            }
        )
        run.rounds_run = rnd
        log(
            INFO,
            "[%s] round %d: test-acc %.4f  forget-acc %.4f  steps %d",
            label,
            rnd,
            run.history[rnd].get("test-acc", float("nan")),
            run.history[rnd].get("forget-acc", float("nan")),
            int(run.train.get(rnd, {}).get("total-train-steps", 0)),
        )
        if after_round is not None:
            after_round(rnd, arrays, run.history[rnd])
        if stop is not None and stop(rnd, run.history[rnd]):
            break
    run.arrays = arrays
    run.wall_seconds += time.perf_counter() - t0
    return run
