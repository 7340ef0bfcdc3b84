"""The federations an erasure is judged by and served from: original, gold, references.

The *original* runs rounds ``1..d-1`` with everyone; the *gold* retrains those rounds from
the same initial model and seeds without exactly the deleted data; the strong audit's
*reference* federations train like the gold with every client on half of its samples; the
*gold twin* retrains like the gold with other seeds (the spread of retraining itself).
Each is cached on disk (:mod:`fed_unlearn.gold_cache`) under a key that covers what it
depends on, and trained through the project's one round loop with the same strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fed_unlearn import protocol as P
from fed_unlearn.config import ExperimentConfig
from fed_unlearn.flower import FederationRun, ReproducibleFedAvg, Unlearning, run_rounds, to_record, to_weights
from fed_unlearn.gold_cache import load_federation, save_federation
from fed_unlearn.models import get_weights
from fed_unlearn.task import Task
from fed_unlearn.unlearning import UnlearningMethod

from .queries import ClientInfo

#: How far the gold twin's seeds are from the gold's (its initial model and every round's minibatch order).
TWIN_SEED_OFFSET = 1_000_003


def _no_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Per-round evaluation metrics come from the strategy's roll-up; the weighted means add nothing."""
    return MetricRecord()


def new_strategy(method: UnlearningMethod | None, num_clients: int, **kwargs: Any) -> Unlearning:
    """The experiment's strategy: every client each round, reproducible FedAvg, unlearning wrapper."""
    inner = ReproducibleFedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=num_clients,
        evaluate_metrics_aggr_fn=_no_metrics,
    )
    return Unlearning(inner, method, **{"max_strikes": 0, "reproducible": True, **kwargs})


def initial_model(task: Task, run_config: Mapping[str, Any], first: ClientInfo | None) -> ArrayRecord:
    """The federation's initial model (the built-in task sizes it from the clients' data)."""
    model = (
        task.model(run_config, first.input_shape, first.num_classes)
        if task.builtin and first
        else task.model(run_config)
    )
    return to_record(get_weights(model))


def twin_initial(task: Task, run_config: Mapping[str, Any], first: ClientInfo | None) -> ArrayRecord:
    """The gold twin's initial model: the task's model initialised from ``seed + TWIN_SEED_OFFSET``."""
    return initial_model(task, {**run_config, "seed": int(run_config.get("seed", 0)) + TWIN_SEED_OFFSET}, first)


def retrain(
    grid: Grid,
    cfg: ExperimentConfig,
    clients: dict[int, ClientInfo],
    initial: ArrayRecord,
    label: str,
    setup: Callable[[Unlearning], None],
    train_config: Callable[[int], dict[str, Any]] | None = None,
) -> FederationRun:
    """The original's ``d-1`` rounds from ``initial`` with a fresh strategy that ``setup`` adjusts (who, on what)."""
    strategy = new_strategy(None, len(clients), evaluate_departed=True)
    for c, i in clients.items():
        strategy.set_identity(i.node_id, **{"partition-id": c})
    setup(strategy)
    rounds = range(1, cfg.gold_rounds + 1)
    return run_rounds(
        grid,
        strategy,
        FederationRun(arrays=initial),
        rounds,
        cfg.federation.round_timeout,
        label,
        train_config=train_config,
    )


def _twin_seed_round(server_round: int) -> dict[str, Any]:
    """The twin's minibatch order: another round's (the project's local training honours ``seed-round``)."""
    return {P.SEED_ROUND: TWIN_SEED_OFFSET + server_round}


def gold_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    clients: dict[int, ClientInfo],
    initial: ArrayRecord,
    request: Mapping[int, Mapping[str, Any]],
    architecture: str = "",
    twin: bool = False,
) -> tuple[ArrayRecord, dict[str, Any]]:
    """The gold federation (load it from the cache or train it and cache it).

    The original's ``d-1`` rounds from the same initial model and seeds, without exactly
    the deleted data: the departing clients left out, or the requesting clients
    training on their retained samples only. With ``twin``, the *gold twin*: the same
    rounds on the same data from ``initial`` (:func:`twin_initial`) with every round's
    minibatch order taken from another round — a retraining that differs from the gold
    only by its seeds, so its distance to the gold (KL, disagreement) is the spread of
    retraining itself.
    """
    digests = {c: str(r["digest"]) for c, r in request.items()} if not cfg.request.deletion.clients_leave else None
    key = cfg.gold_key(len(clients), digests, architecture) + ("-twin" if twin else "")
    name = "gold twin" if twin else "gold"
    cached = load_federation(cfg.output.gold_cache_dir, key)
    if cached is not None:
        weights, meta = cached
        log(INFO, "%s federation loaded from cache %s", name, Path(cfg.output.gold_cache_dir) / key)
        return to_record(weights), {**meta, "cached": True}
    retain_only = [] if cfg.request.deletion.clients_leave else sorted(request)
    log(
        INFO,
        "%s federation: %d rounds without clients %s, clients %s on their retained data",
        name,
        cfg.gold_rounds,
        list(cfg.leaving),
        retain_only,
    )

    def leave_out(strategy: Unlearning) -> None:
        strategy.leave_out(*(clients[c].node_id for c in cfg.leaving))
        strategy.restrict_to_retained(*(clients[c].node_id for c in retain_only))

    run = retrain(grid, cfg, clients, initial, name, leave_out, _twin_seed_round if twin else None)
    meta = {
        "key": key,
        "config": cfg.to_dict(),
        "history": {str(r): h for r, h in run.history.items()},
        "compute": run.compute(),
        "wall-seconds": run.wall_seconds,
    }
    if run.arrays is None:
        raise RuntimeError("the gold federation produced no model")
    save_federation(cfg.output.gold_cache_dir, key, to_weights(run.arrays), meta)
    return run.arrays, {**meta, "cached": False}


def _train_reference(strategy: Unlearning, index: int, count: int, seed: int) -> None:
    strategy.train_reference(index, count, seed)


def reference_federations(
    grid: Grid,
    cfg: ExperimentConfig,
    clients: dict[int, ClientInfo],
    initial: ArrayRecord,
    architecture: str = "",
    members: Sequence[int] = (),
) -> tuple[list[ArrayRecord], dict[str, Any]]:
    """The strong audit's ``audit.references`` reference federations (each from the cache or trained and cached).

    Reference ``k`` trains like the gold — the same initial model, rounds, seeds and every
    client — but each client on the half of its samples that reference takes
    (:func:`fed_unlearn.attacks.client_reference_masks`, chosen on the node), so every
    sample is "in" half of the references and "out" of the other half. They do not depend
    on the deletion: every request of a (data, model, seed) setting shares them.

    ``members``: the client ids taking part when they are not every client of ``clients``
    (a deployed federation whose erased sites are gone); part of the cache key.

    Returns
    -------
    list of ArrayRecord, dict
        The reference models and their cost (trained now vs loaded, wall seconds, steps).
    """
    if members:
        clients = {c: i for c, i in clients.items() if c in set(members)}
    count = cfg.audit.references
    refs: list[ArrayRecord] = []
    trained, from_cache, wall, steps = 0, 0, 0.0, 0.0
    accuracies: list[float] = []
    for index in range(count):
        key = cfg.reference_key(len(clients), index, count, architecture, members=sorted(clients) if members else ())
        cached = load_federation(cfg.output.gold_cache_dir, key)
        if cached is not None:
            weights, meta = cached
            from_cache += 1
            refs.append(to_record(weights))
        else:
            run = retrain(
                grid,
                cfg,
                clients,
                initial,
                f"reference {index + 1}/{count}",
                partial(_train_reference, index=index, count=count, seed=cfg.data.seed),
            )
            if run.arrays is None:
                raise RuntimeError(f"reference federation {index} produced no model")
            meta = {
                "key": key,
                "history": {str(r): h for r, h in run.history.items()},
                "compute": run.compute(),
                "wall-seconds": run.wall_seconds,
            }
            save_federation(cfg.output.gold_cache_dir, key, to_weights(run.arrays), meta)
            trained += 1
            wall += run.wall_seconds
            refs.append(run.arrays)
        steps += float(meta["compute"]["train-steps"])
        history = meta["history"]
        accuracies.append(float(history[max(history, key=int)].get("test-acc", float("nan"))))
    log(INFO, "reference federations: %d trained, %d from the cache", trained, from_cache)
    cost = {
        "count": count,
        "trained": trained,
        "cached": from_cache,
        "wall-seconds": wall,
        "train-steps": steps,
        "test-acc": accuracies,
    }
    return refs, cost


def uses_ordinary_rounds(method: UnlearningMethod) -> bool:
    """Whether a method keeps something from the rounds before the request (history, a model, client state)."""
    return type(method).observe is not UnlearningMethod.observe or method.client_keeps_last_local


def original_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    strategy: Unlearning,
    method: UnlearningMethod,
    num_clients: int,
    initial: ArrayRecord,
    architecture: str,
) -> tuple[FederationRun, bool]:
    """Rounds ``1..d-1`` with everyone: from the cache when the method needs nothing of them, else trained (and cached).

    Every method of a (data, model, seed) setting starts from the same original; methods that
    keep history (FedEraser), the initial model (retrain) or client state (PGA) run the rounds
    themselves.
    """
    key = cfg.original_key(num_clients, architecture)
    if not uses_ordinary_rounds(method):
        cached = load_federation(cfg.output.gold_cache_dir, key)
        if cached is not None:
            weights, meta = cached
            log(INFO, "original federation (rounds 1..%d) loaded from cache %s", cfg.gold_rounds, key)
            strategy.restore(last_update_norm=meta.get("last-update-norm"))
            run = FederationRun(
                history={int(r): h for r, h in meta["history"].items()},
                train={int(r): h for r, h in meta["train"].items()},
                arrays=to_record(weights),
                rounds_run=cfg.gold_rounds,
            )
            return run, True
    run = run_rounds(
        grid,
        strategy,
        FederationRun(arrays=initial),
        range(1, cfg.request.round),
        cfg.federation.round_timeout,
        method.name,
        train_config=train_config(cfg),
    )
    if run.arrays is not None:
        save_federation(
            cfg.output.gold_cache_dir,
            key,
            to_weights(run.arrays),
            {
                "history": {str(r): h for r, h in run.history.items()},
                "train": {str(r): h for r, h in run.train.items()},
                "wall-seconds": run.wall_seconds,
                "last-update-norm": strategy.last_update_norm,
                "config": cfg.to_dict(),
            },
        )
    return run, False


def train_config(cfg: ExperimentConfig) -> Any:
    """Per-round training config: the augmentation, from the deletion request on (the gold trains without it)."""

    def config(rnd: int) -> dict[str, Any]:
        return {P.AUGMENT: cfg.request.augment} if cfg.request.augment != "none" and rnd >= cfg.request.round else {}

    return config
