"""The experiment a ServerApp runs: gold federation, federation with a departure, report.

1. Discover the clients (``query.info``): their ids, sizes, the model's input shape.
2. Gold: the original's ``d-1`` FedAvg rounds from the same initial model and seeds,
   without the departing clients (cached on disk by configuration).
3. The federation: rounds ``1..d-1`` with everyone (-> *original* model), round ``d``
   unlearns with the configured method, rounds ``d+1..T`` recover (or stop early in
   ``until-gold`` mode once the retained accuracy is within tolerance of the gold's).
4. Report: every client measures original, unlearned and gold models against gold;
   ``results.json`` and ``accuracy.png`` are written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, is_dataclass
from logging import INFO
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fed_unlearn.config import ExperimentConfig
from fed_unlearn.evaluation import summarise
from fed_unlearn.gold_cache import load_gold, save_gold
from fed_unlearn.metrics import average_gap, weight_distance
from fed_unlearn.models import build_model, get_weights
from fed_unlearn.report import markdown_table, plot_accuracy, write_json
from fed_unlearn.unlearning import UnlearningMethod

from .records import metric_dict, to_record, to_weights
from .strategy import UnlearningFedAvg


@dataclass
class ClientInfo:
    """What a client told the server about itself."""

    client_id: int
    node_id: int
    num_partitions: int
    train_n: int
    heldout_n: int
    input_shape: tuple[int, ...]
    num_classes: int


def discover_clients(grid: Grid, wait_seconds: float, timeout: float) -> dict[int, ClientInfo]:
    """Ask every connected node who it is; wait until all ``num-partitions`` clients answered.

    Raises
    ------
    RuntimeError
        If not every client connected within ``wait_seconds``, or two nodes claim one id.
    """
    deadline = time.monotonic() + wait_seconds
    infos: dict[int, ClientInfo] = {}
    while True:
        asked = {nid for nid in grid.get_node_ids()} - {i.node_id for i in infos.values()}
        if asked:
            msgs = [Message(RecordDict(), nid, f"{MessageType.QUERY}.info") for nid in sorted(asked)]
            for reply in grid.send_and_receive(msgs, timeout=timeout):
                if reply.has_error():
                    raise RuntimeError(f"node {reply.metadata.src_node_id} failed to describe itself: {reply.error.reason}")
                m = reply.content["info"]
                info = ClientInfo(
                    client_id=int(m["partition-id"]), node_id=reply.metadata.src_node_id,
                    num_partitions=int(m["num-partitions"]), train_n=int(m["train-n"]), heldout_n=int(m["heldout-n"]),
                    input_shape=tuple(int(s) for s in m["input-shape"]), num_classes=int(m["num-classes"]),
                )
                if info.client_id in infos:
                    raise RuntimeError(f"nodes {infos[info.client_id].node_id} and {info.node_id} both claim client id {info.client_id}")
                infos[info.client_id] = info
        expected = max((i.num_partitions for i in infos.values()), default=None)
        if expected is not None and len(infos) >= expected:
            return infos
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(infos)} of {expected or '?'} clients connected within {wait_seconds:.0f}s")
        time.sleep(0.5)


@dataclass
class FederationRun:
    """The trace of one federation: per-round summaries and client-compute."""

    history: dict[int, dict[str, float]] = field(default_factory=dict)
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    original: ArrayRecord | None = None
    rounds_run: int = 0
    wall_seconds: float = 0.0

    def compute(self, first_round: int = 1) -> dict[str, float]:
        """Client-compute (optimizer steps, seconds) summed over rounds ``>= first_round``."""
        rows = [m for r, m in self.train.items() if r >= first_round]
        return {"train-steps": float(sum(m.get("train-steps", 0) for m in rows)),
                "train-seconds": float(sum(m.get("train-seconds", 0.0) for m in rows)),
                "rounds": float(len(rows))}


def run_federation(
    grid: Grid,
    strategy: UnlearningFedAvg,
    initial: ArrayRecord,
    num_rounds: int,
    timeout: float,
    label: str,
    snapshot_round: int | None = None,
    stop: Callable[[int, dict[str, float]], bool] | None = None,
) -> FederationRun:
    """Run ``num_rounds`` rounds of ``strategy`` (train, then evaluate every client).

    Parameters
    ----------
    snapshot_round : int, optional
        Keep the global model after this round in ``FederationRun.original``.
    stop : callable, optional
        ``stop(round, summary) -> bool`` after each round's evaluation ends the run early.
    """
    run = FederationRun(arrays=initial)
    t0 = time.perf_counter()
    arrays = initial
    if snapshot_round == 0:
        run.original = initial
    for rnd in range(1, num_rounds + 1):
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid), timeout=timeout)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        if train_metrics is not None:
            run.train[rnd] = metric_dict(train_metrics)
        evals = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid), timeout=timeout)
        summary = strategy.aggregate_evaluate(rnd, evals)
        run.history[rnd] = metric_dict(summary) if summary is not None else {}
        run.rounds_run = rnd
        tag = " (unlearning)" if strategy.departure_round == rnd and label != "gold" else ""
        log(INFO, "[%s] round %d/%d%s: test-acc %.4f  forget-acc %.4f  steps %d", label, rnd, num_rounds, tag,
            run.history[rnd].get("test-acc", float("nan")), run.history[rnd].get("forget-acc", float("nan")),
            int(run.train.get(rnd, {}).get("train-steps", 0)))
        if snapshot_round == rnd:
            run.original = arrays
        if stop is not None and stop(rnd, run.history[rnd]):
            break
    run.arrays = arrays
    run.wall_seconds = time.perf_counter() - t0
    return run


def measure(grid: Grid, node_of: dict[int, int], arrays: ArrayRecord, reference: ArrayRecord | None, timeout: float) -> dict[int, dict[str, float]]:
    """Have every client measure ``arrays`` (vs ``reference``, with the MIA) on its own data."""
    content = {"arrays": arrays, "config": ConfigRecord({"mia": True})}
    if reference is not None:
        content["reference"] = reference
    msgs = [Message(RecordDict(content), nid, MessageType.EVALUATE) for _, nid in sorted(node_of.items())]
    out: dict[int, dict[str, float]] = {}
    client_of = {nid: cid for cid, nid in node_of.items()}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"client {client_of.get(reply.metadata.src_node_id)} failed to evaluate: {reply.error.reason}")
        out[client_of[reply.metadata.src_node_id]] = metric_dict(reply.content["metrics"])
    return out


def relearn_time(grid: Grid, node_of: dict[int, int], arrays: ArrayRecord, targets: dict[int, float],
                 max_steps: int, timeout: float) -> dict[str, float]:
    """Relearn time of ``arrays``: mean SGD steps the departing clients need to reach their targets."""
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"target-accuracy": float(t), "max-steps": max_steps})}),
                    node_of[c], f"{MessageType.QUERY}.relearn") for c, t in sorted(targets.items())]
    steps, reached = [], []
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"relearn probe failed on node {reply.metadata.src_node_id}: {reply.error.reason}")
        m = reply.content["metrics"]
        steps.append(float(m["relearn-steps"]))
        reached.append(int(m["relearn-reached"]))
    return {"relearn-steps": float(np.mean(steps)), "relearn-all-reached": float(min(reached))}


def gold_federation(grid: Grid, cfg: ExperimentConfig, clients: dict[int, ClientInfo], initial: ArrayRecord) -> tuple[ArrayRecord, dict[str, Any]]:
    """The gold federation: load it from the cache or train it and cache it."""
    key = cfg.gold_key(len(clients))
    cached = load_gold(cfg.gold_cache_dir, key)
    if cached is not None:
        weights, meta = cached
        log(INFO, "gold federation loaded from cache %s", Path(cfg.gold_cache_dir) / key)
        return to_record(weights), {**meta, "cached": True}
    log(INFO, "gold federation: %d rounds without clients %s", cfg.gold_rounds, list(cfg.departing))
    strategy = UnlearningFedAvg({c: i.node_id for c, i in clients.items()}, excluded=cfg.departing)
    run = run_federation(grid, strategy, initial, cfg.gold_rounds, cfg.round_timeout, "gold")
    meta = {
        "key": key, "config": cfg.to_dict(), "history": {str(r): h for r, h in run.history.items()},
        "compute": run.compute(), "wall-seconds": run.wall_seconds,
    }
    assert run.arrays is not None
    save_gold(cfg.gold_cache_dir, key, to_weights(run.arrays), meta)
    return run.arrays, {**meta, "cached": False}


def run_experiment(grid: Grid, cfg: ExperimentConfig, method: UnlearningMethod, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run gold, federation with departure, and the report; write results; return them."""
    t_start = time.perf_counter()
    clients = discover_clients(grid, cfg.node_wait_seconds, cfg.round_timeout)
    unknown = sorted(set(cfg.departing) - set(clients))
    if unknown:
        raise ValueError(f"unknown departing client id(s) {unknown}; the federation has clients {sorted(clients)}")
    first = clients[min(clients)]
    model = build_model(cfg.model, first.input_shape, first.num_classes, seed=cfg.seed)
    initial = to_record(get_weights(model))
    node_of = {c: i.node_id for c, i in clients.items()}
    log(INFO, "clients %s, departing %s in round %d of %d, method %s", sorted(clients), list(cfg.departing),
        cfg.departure_round, cfg.num_server_rounds, method.name)

    gold_arrays, gold_meta = gold_federation(grid, cfg, clients, initial)
    gold_history = {int(r): h for r, h in gold_meta["history"].items()}
    gold_final = gold_history[max(gold_history)]
    target = gold_final.get("test-acc", float("nan")) - cfg.recovery_tolerance

    def stop(rnd: int, summary: dict[str, float]) -> bool:
        return cfg.recovery == "until-gold" and rnd > cfg.departure_round and summary.get("test-acc", -1.0) >= target

    strategy = UnlearningFedAvg(node_of, method=method, departing=cfg.departing, departure_round=cfg.departure_round)
    run = run_federation(grid, strategy, initial, cfg.num_server_rounds, cfg.round_timeout, method.name,
                         snapshot_round=cfg.departure_round - 1, stop=stop)
    assert run.arrays is not None and run.original is not None
    reached = [r for r in sorted(run.history) if r > cfg.departure_round and run.history[r].get("test-acc", -1.0) >= target]

    models = {"original": run.original, "unlearned": run.arrays, "gold": gold_arrays}
    per_client = {name: measure(grid, node_of, arrays, gold_arrays, cfg.round_timeout) for name, arrays in models.items()}
    report = {name: summarise(evals, cfg.departing) for name, evals in per_client.items()}
    if cfg.relearn_max_steps > 0:
        # target of each departing client: the original model's accuracy on its forget set
        targets = {c: per_client["original"][c]["train-correct"] / per_client["original"][c]["train-n"] for c in cfg.departing}
        for name, arrays in models.items():
            report[name].update(relearn_time(grid, node_of, arrays, targets, cfg.relearn_max_steps, cfg.round_timeout))
        gold_steps = report["gold"]["relearn-steps"]
        for name in models:
            report[name]["relearn-vs-gold"] = report[name]["relearn-steps"] / gold_steps if gold_steps else float("nan")
    weights = {name: to_weights(arrays) for name, arrays in models.items()}
    for name, metrics in report.items():
        metrics["average-gap"] = average_gap(metrics, report["gold"])
        metrics["l2-to-gold"] = weight_distance(weights[name], weights["gold"])
        metrics["l2-to-original"] = weight_distance(weights[name], weights["original"])
    table = markdown_table(report)
    log(INFO, "\n%s", table)

    unlearn_cost = run.compute(first_round=cfg.departure_round)
    gold_cost = gold_meta["compute"]
    results = {
        "config": cfg.to_dict(),
        "run-config": dict(run_config),
        "method": {"name": method.name, "settings": asdict(method.config) if is_dataclass(getattr(method, "config", None)) else {}},
        "clients": {str(c): {"train-n": i.train_n, "heldout-n": i.heldout_n} for c, i in sorted(clients.items())},
        "report": report,
        "recovery": {
            "mode": cfg.recovery, "rounds-run": run.rounds_run - cfg.departure_round,
            "rounds-to-gold": (reached[0] - cfg.departure_round) if reached else None,
            "gold-test-acc": gold_final.get("test-acc"), "tolerance": cfg.recovery_tolerance,
        },
        "unlearning": strategy.unlearning_report,
        "history": {str(r): h for r, h in run.history.items()},
        "gold-history": {str(r): h for r, h in gold_history.items()},
        "train-history": {str(r): h for r, h in run.train.items()},
        "client-compute": {
            "unlearning+recovery": unlearn_cost,
            "gold": gold_cost,
            "fraction-of-gold-steps": unlearn_cost["train-steps"] / gold_cost["train-steps"] if gold_cost["train-steps"] else None,
        },
        "timings": {"federation-wall-seconds": run.wall_seconds, "gold-wall-seconds": gold_meta.get("wall-seconds"),
                    "gold-cached": gold_meta["cached"], "total-seconds": time.perf_counter() - t_start},
        "gold-key": gold_meta.get("key", cfg.gold_key(len(clients))),
        "table-markdown": table,
    }
    out_dir = Path(cfg.results_dir) / experiment_name(cfg, method)
    write_json(out_dir / "results.json", results)
    plot_accuracy(out_dir / "accuracy.png", run.history, gold_history, cfg.departure_round,
                  title=f"{method.name} on {cfg.dataset}: client(s) {list(cfg.departing)} leave in round {cfg.departure_round}")
    (out_dir / "table.md").write_text(table + "\n")
    log(INFO, "results written to %s", out_dir.resolve())
    return results


def experiment_name(cfg: ExperimentConfig, method: UnlearningMethod) -> str:
    """Folder name of an experiment's results."""
    dep = "-".join(map(str, cfg.departing))
    return f"{cfg.dataset}_{cfg.model}_{method.name}_dep{dep}_r{cfg.departure_round}of{cfg.num_server_rounds}_seed{cfg.seed}"
