"""The experiment a ServerApp runs: original rounds, deletion request, gold, unlearning, report.

1. Discover the clients (``query.identify`` + ``query.info``): their ids, sizes, and
   whether they speak the client protocol and load the task's model; anything missing
   stops the run here with one message naming it.
2. Rounds ``1..d-1`` with everyone on all its data: the *original* model.
3. The deletion request (``query.forget``) with the original model: each client named in
   it selects its samples to forget (all of them for a departing client, a fraction chosen
   by a selection rule, or one class) and keeps the mask; the server gets counts and digests.
4. Gold: the original's ``d-1`` FedAvg rounds from the same initial model and seeds,
   without exactly the deleted data (cached on disk, keyed by configuration and digests).
5. Round ``d`` (several for the multi-round baselines) unlearns with the configured
   method; recovery rounds follow up to ``T`` (or stop early in ``until-gold`` mode once
   the retained accuracy is within tolerance of the gold's).
6. Report: every client measures original, unlearned and gold models against gold;
   ``results.json``, ``accuracy.png`` and ``table.md`` are written.

The strategy is :class:`fed_unlearn.flower.Unlearning` around a FedAvg, the same one a
Flower user adds to their own app.
"""

from __future__ import annotations

import time
from dataclasses import asdict, is_dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common import log
from flwr.serverapp import Grid

from fed_unlearn import protocol as P
from fed_unlearn.attacks import ATTACKS, leakage_summary, roc_on_grid
from fed_unlearn.config import ExperimentConfig
from fed_unlearn.evaluation import summarise
from fed_unlearn.flower import (
    run_rounds,
    to_record,
    to_weights,
)
from fed_unlearn.gold_cache import code_fingerprint
from fed_unlearn.metrics import average_gap, weight_distance
from fed_unlearn.models import get_weights
from fed_unlearn.report import (
    further_than_original,
    markdown_table,
    plot_accuracy,
    plot_roc,
    verdict_line,
    write_json,
)
from fed_unlearn.task import load_task
from fed_unlearn.unlearning import UnlearningMethod

from .federations import (
    gold_federation,
    initial_model,
    new_strategy,
    original_federation,
    reference_federations,
    train_config,
    twin_initial,
)
from .queries import (
    EXPERIMENT_HANDLERS,
    discover_clients,
    measure,
    relearn_time,
    request_deletion,
    strong_audit_scores,
)

#: Strong-audit figures that go into each model's row of the report (the rest: ``results["leakage"]``).
LEAKAGE_REPORT_KEYS = ("rmia-auc", "rmia-tpr@1%", "lira-auc", "lira-tpr@1%", "rmia-vs-gold-auc")


class RecoveryRule:
    """When recovery stops (:class:`~fed_unlearn.config.ExperimentConfig` ``recovery``); ``reason`` says why.

    ``validation``: the remaining clients' held-out accuracy is back within the tolerance of
    the pre-request model's (``validation_target``), or has not improved by more than 0.001
    for ``patience`` rounds. ``until-gold``: at ``gold_target`` (an oracle). ``fixed``: never.
    """

    def __init__(self, mode: str, validation_target: float, gold_target: float, patience: int) -> None:
        self.mode, self.validation_target, self.gold_target, self.patience = (
            mode,
            validation_target,
            gold_target,
            patience,
        )
        self.best, self.stale = float("-inf"), 0
        self.reason = "the last round (num-server-rounds)"

    def __call__(self, acc: float) -> bool:
        """Whether to stop after a recovery round with test accuracy ``acc``."""
        if self.mode == "until-gold" and acc >= self.gold_target:
            self.reason = "the gold's test accuracy (oracle)"
            return True
        if self.mode != "validation" or not np.isfinite(acc):
            return False
        if acc >= self.validation_target:
            self.reason = "back within the tolerance of the pre-request test accuracy"
            return True
        self.stale = 0 if acc > self.best + 1e-3 else self.stale + 1
        self.best = max(self.best, acc)
        if self.stale >= self.patience:
            self.reason = f"no improvement for {self.patience} rounds"
            return True
        return False


class Laps:
    """Wall seconds of the experiment's phases, in the order they ran (``timings.phases`` of results.json)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        """Close ``phase``: the time since the previous lap is its."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def _settings(method: UnlearningMethod) -> dict[str, Any]:
    """A method's settings as a plain dict (its config dataclass)."""
    config = method.config
    return asdict(config) if is_dataclass(config) and not isinstance(config, type) else {}


def run_experiment(
    grid: Grid, cfg: ExperimentConfig, method: UnlearningMethod, run_config: dict[str, Any]
) -> dict[str, Any]:
    """Run the original rounds, the deletion request, gold, unlearning + recovery and the report."""
    t_start = time.perf_counter()
    lap = Laps()
    task = load_task(cfg.data.task)
    if cfg.request.deletion.scenario not in method.scenarios:
        raise ValueError(
            f"{method.name} serves the {', '.join(method.scenarios)} scenario(s), not "
            f"unlearn.scenario = '{cfg.request.deletion.scenario}'"
        )
    check = None if task.builtin else to_record(get_weights(task.model(run_config)))
    handlers = EXPERIMENT_HANDLERS + ((P.TRAIN_REFERENCE,) if cfg.audit.references else ())
    clients = discover_clients(
        grid, cfg.federation.node_wait_seconds, cfg.federation.round_timeout, check=check, handlers=handlers
    )
    lap("discovery")
    unknown = sorted(set(cfg.request.departing) - set(clients))
    if unknown:
        raise ValueError(f"unknown departing client id(s) {unknown}; the federation has clients {sorted(clients)}")
    first = clients[min(clients)]
    d = cfg.request.deletion
    if d.by_class and d.forget_class >= first.num_classes:
        raise ValueError(f"unlearn.class {d.forget_class} does not exist: the task has {first.num_classes} classes")
    needed, last = method.rounds_needed(cfg.gold_rounds), cfg.federation.num_server_rounds
    if cfg.request.round + needed - 1 > last:
        raise ValueError(
            f"{method.name} needs {needed} unlearning round(s) from round {cfg.request.round}: "
            f"num-server-rounds must be at least {cfg.request.round + needed - 1}, got {last}"
        )
    initial = check if check is not None else initial_model(task, run_config, first)
    architecture = task.fingerprint(task.model(run_config)) if not task.builtin else ""
    node_of = {c: i.node_id for c, i in clients.items()}
    involved = cfg.involved(clients)
    log(
        INFO,
        "clients %s; deletion %s of clients %s in round %d of %d; method %s",
        sorted(clients),
        cfg.request.deletion.to_dict(),
        list(involved),
        cfg.request.round,
        cfg.federation.num_server_rounds,
        method.name,
    )

    strategy = new_strategy(
        method,
        len(clients),
        evaluate_departed=True,
        calibrate=cfg.request.calibrate,
        memorisation_z=cfg.request.memorisation_z,
        support_floor=cfg.request.support_floor,
        utility_tolerance=cfg.request.utility_tolerance,
    )
    for c, i in clients.items():
        strategy.set_identity(i.node_id, **{"partition-id": c})
    for i in clients.values():  # a reply may not weigh more than the data the client described
        strategy.declare_examples(i.node_id, i.train_n)
    if not cfg.request.deletion.needs_model:
        # the forget set does not depend on the model: clients know it from the start, so every
        # round's evaluation can report forget accuracy
        request_deletion(grid, node_of, involved, initial, cfg, cfg.federation.round_timeout)
    # rounds 1..d-1 with everyone on all its data: the original model
    run, original_cached = original_federation(grid, cfg, strategy, method, len(clients), initial, architecture)
    original = run.arrays
    if original is None:
        raise RuntimeError("the original federation produced no model")
    lap("original")
    # the deletion request, made with the original model; then the gold without exactly those samples
    request = request_deletion(grid, node_of, involved, original, cfg, cfg.federation.round_timeout)
    forgetting = sorted(c for c in involved if request[c]["forget-n"] > 0)
    strategy.request_unlearning(
        *(node_of[c] for c in forgetting),
        key=None,
        round=cfg.request.round,
        leave=cfg.request.deletion.clients_leave,
        deletion=cfg.request.deletion,
        joint=cfg.request.deletion.joint,
        send_request=False,
    )
    lap("deletion request")
    gold_arrays, gold_meta = gold_federation(grid, cfg, clients, initial, request, architecture)
    lap("gold")
    gold_history = {int(r): h for r, h in gold_meta["history"].items()}
    gold_final = gold_history[max(gold_history)]
    twins: dict[str, ArrayRecord] = {}
    if cfg.audit.gold_twin:
        twin_start = twin_initial(task, run_config, first)
        twins["gold-twin"], _ = gold_federation(grid, cfg, clients, twin_start, request, architecture, twin=True)
        lap("gold twin")
    target = gold_final.get("test-acc", float("nan")) - cfg.request.recovery_tolerance
    before = run.history.get(cfg.request.round - 1, {}).get("test-acc", float("nan"))
    finished: list[int] = []
    rule = RecoveryRule(
        cfg.request.recovery, before - cfg.request.recovery_tolerance, target, cfg.request.recovery_patience
    )

    def stop(rnd: int, summary: dict[str, float]) -> bool:
        if strategy.unlearning_done and not finished:
            finished.append(rnd)
        return bool(finished) and rule(summary.get("test-acc", float("nan")))

    t_unlearn = time.perf_counter()
    run = run_rounds(
        grid,
        strategy,
        run,
        range(cfg.request.round, cfg.federation.num_server_rounds + 1),
        cfg.federation.round_timeout,
        method.name,
        stop=stop,
        train_config=train_config(cfg),
    )
    unlearn_wall = time.perf_counter() - t_unlearn
    lap("unlearning + recovery")
    if not strategy.unlearning_done or not finished or run.arrays is None:
        raise RuntimeError(f"{method.name} did not finish unlearning by round {cfg.federation.num_server_rounds}")
    end_unlearning = finished[0]
    reached = [r for r in sorted(run.history) if r >= end_unlearning and run.history[r].get("test-acc", -1.0) >= target]

    models = {"original": original, "unlearned": run.arrays, "gold": gold_arrays}
    # the twin is measured against the gold like the models, but neither probed for relearning nor audited
    measured = {**models, **twins}
    per_client = {
        name: measure(grid, node_of, arrays, gold_arrays, cfg.federation.round_timeout)
        for name, arrays in measured.items()
    }
    report = {name: summarise(evals) for name, evals in per_client.items()}
    lap("measurements")
    if cfg.output.relearn_max_steps > 0:
        # target of each client: the original model's accuracy on its forget set
        targets = {
            c: per_client["original"][c]["forget-correct"] / per_client["original"][c]["forget-n"] for c in forgetting
        }
        for name, arrays in models.items():
            report[name].update(
                relearn_time(grid, node_of, arrays, targets, cfg.output.relearn_max_steps, cfg.federation.round_timeout)
            )
        gold_steps = report["gold"]["relearn-steps"]
        for name in models:
            report[name]["relearn-vs-gold"] = report[name]["relearn-steps"] / gold_steps if gold_steps else float("nan")
        lap("relearn time")
    leakage: dict[str, Any] = {}
    if cfg.audit.references:
        references, ref_cost = reference_federations(grid, cfg, clients, initial, architecture)
        scores = {
            name: strong_audit_scores(grid, node_of, arrays, references, cfg.data.seed, cfg.federation.round_timeout)
            for name, arrays in models.items()
        }
        figures = leakage_summary(scores, target="gold")
        for name, row in figures.items():
            report[name].update({k: v for k, v in row.items() if k in LEAKAGE_REPORT_KEYS})
        leakage = {"figures": figures, "roc": {a: roc_on_grid(scores, a) for a in ATTACKS}, "references": ref_cost}
        lap("strong audit")
    weights = {name: to_weights(arrays) for name, arrays in measured.items()}
    for name, metrics in report.items():
        metrics["average-gap"] = average_gap(metrics, report["gold"])
        metrics["l2-to-gold"] = weight_distance(weights[name], weights["gold"])
        metrics["l2-to-original"] = weight_distance(weights[name], weights["original"])
    table = markdown_table(report, ("original", "unlearned", "gold", *twins))
    log(INFO, "\n%s", table)
    further = further_than_original(report)
    if further:
        log(WARNING, "%s ended further from the gold than the original on: %s", method.name, ", ".join(further))

    timings: dict[str, Any] = {
        "federation-wall-seconds": run.wall_seconds,
        "gold-wall-seconds": gold_meta.get("wall-seconds"),
        "unlearning+recovery-wall-seconds": unlearn_wall,
        "gold-cached": gold_meta["cached"],
        "original-cached": original_cached,
    }
    unlearn_cost = run.compute(first_round=cfg.request.round)
    gold_cost = gold_meta["compute"]
    results = {
        "config": cfg.to_dict(),
        "run-config": dict(run_config),
        "method": {
            "name": method.name,
            "settings": asdict(method.config)
            if is_dataclass(method.config) and not isinstance(method.config, type)
            else {},
        },
        "clients": {str(c): {"train-n": i.train_n, "heldout-n": i.heldout_n} for c, i in sorted(clients.items())},
        "deletion": {**cfg.request.deletion.to_dict(), "clients": {str(c): r for c, r in sorted(request.items())}},
        "report": report,
        "verdict": {"further-from-gold-than-original": further, "text": verdict_line(further)},
        "recovery": {
            "mode": cfg.request.recovery,
            "stop": rule.reason,
            "pre-request-test-acc": before,
            "unlearning-rounds": strategy.unlearning_rounds_run,
            "rounds-run": run.rounds_run - end_unlearning,
            "rounds-to-gold": (reached[0] - end_unlearning) if reached else None,
            "gold-test-acc": gold_final.get("test-acc"),
            "tolerance": cfg.request.recovery_tolerance,
        },
        "leakage": leakage,
        "unlearning": strategy.unlearning_report,
        "history": {str(r): h for r, h in run.history.items()},
        "gold-history": {str(r): h for r, h in gold_history.items()},
        "train-history": {str(r): h for r, h in run.train.items()},
        "client-compute": {
            "unlearning+recovery": unlearn_cost,
            "gold": gold_cost,
            "fraction-of-gold-steps": unlearn_cost["train-steps"] / gold_cost["train-steps"]
            if gold_cost["train-steps"]
            else None,
        },
        "server-history-bytes": method.history_bytes(),
        "timings": timings,
        "gold-key": gold_meta.get("key"),
        "code": code_fingerprint(),
        "table-markdown": table,
    }
    out_dir = Path(cfg.output.results_dir) / experiment_name(cfg, method)
    plot_accuracy(
        out_dir / "accuracy.png",
        run.history,
        gold_history,
        cfg.request.round,
        title=f"{method.name} on {task_label(cfg)}: {describe_request(cfg)} in round {cfg.request.round}",
    )
    if leakage:
        plot_roc(
            out_dir / "roc.png",
            leakage["roc"]["rmia"],
            title=f"RMIA on the forget set, {method.name}: {describe_request(cfg)}\n"
            f"({int(leakage['figures']['gold']['members'])} members, "
            f"{int(leakage['figures']['gold']['nonmembers'])} non-members)",
        )
    (out_dir / "table.md").write_text(table + "\n")
    lap("report")
    # written last, so that its time is the experiment's end
    timings.update({"phases": lap.seconds, "total-seconds": time.perf_counter() - t_start})
    write_json(out_dir / "results.json", results)
    log(INFO, "results written to %s", out_dir.resolve())
    return results


def task_label(cfg: ExperimentConfig) -> str:
    """The data the experiment runs on: the built-in dataset, or the task module."""
    return cfg.data.dataset if cfg.data.builtin else cfg.data.task


def describe_request(cfg: ExperimentConfig) -> str:
    """One line naming what is forgotten."""
    return cfg.request.deletion.describe(cfg.request.departing)


def experiment_name(cfg: ExperimentConfig, method: UnlearningMethod) -> str:
    """Folder name of an experiment's results."""
    what = cfg.request.deletion.label(cfg.request.departing)
    data = f"{cfg.data.dataset}_{cfg.data.model}" if cfg.data.builtin else cfg.data.task.replace(".", "-")
    return f"{data}_{method.name}_{what}_r{cfg.request.round}of{cfg.federation.num_server_rounds}_seed{cfg.data.seed}"
