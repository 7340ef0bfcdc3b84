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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fed_unlearn import protocol as P
from fed_unlearn.attacks import ATTACKS, leakage_summary, roc_on_grid
from fed_unlearn.config import ExperimentConfig
from fed_unlearn.evaluation import summarise
from fed_unlearn.flower import (
    FederationRun,
    ReproducibleFedAvg,
    Unlearning,
    metric_dict,
    run_rounds,
    to_record,
    to_weights,
)
from fed_unlearn.gold_cache import code_fingerprint, load_gold, save_gold
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
from fed_unlearn.task import Task, load_task
from fed_unlearn.unlearning import UnlearningMethod

#: Handlers the experiment needs on every client, besides Flower's ``train`` and ``evaluate``.
EXPERIMENT_HANDLERS = P.NEEDS["the experiment and its report"]


#: Strong-audit figures that go into each model's row of the report (the rest: ``results["leakage"]``).
LEAKAGE_REPORT_KEYS = ("rmia-auc", "rmia-tpr@1%", "lira-auc", "lira-tpr@1%", "rmia-vs-gold-auc")


class ClientProtocolError(RuntimeError):
    """Clients that cannot take part: missing handlers, a model that does not fit, ..."""


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
    site: str = ""


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


def discover_clients(
    grid: Grid,
    wait_seconds: float,
    timeout: float,
    check: ArrayRecord | None = None,
    handlers: Sequence[str] = EXPERIMENT_HANDLERS,
) -> dict[int, ClientInfo]:
    """Ask every connected node who it is; wait until all ``num-partitions`` clients answered.

    Each node is asked :data:`~fed_unlearn.protocol.IDENTIFY` (its ``partition-id``,
    ``num-partitions``, ``site`` and the handlers it has) and :data:`~fed_unlearn.protocol.INFO`
    (its data sizes and, with ``check``, whether that model loads into its architecture).

    Raises
    ------
    ClientProtocolError
        Naming, node by node, what is missing (handlers, node-config keys, a model that
        does not fit), as soon as any node has a problem.
    RuntimeError
        If not every client connected within ``wait_seconds``, or two nodes claim one id.
    """
    deadline = time.monotonic() + wait_seconds
    infos: dict[int, ClientInfo] = {}
    seen: set[int] = set()
    while True:
        new = sorted(set(grid.get_node_ids()) - seen)
        if new:
            seen |= set(new)
            found, problems = describe_nodes(grid, new, timeout, check, handlers)
            if problems:
                raise ClientProtocolError(describe_problems(problems, handlers))
            for info in found:
                if info.client_id in infos:
                    raise RuntimeError(
                        f"nodes {infos[info.client_id].node_id} and {info.node_id} both claim client id "
                        f"{info.client_id}"
                    )
                infos[info.client_id] = info
        expected = max((i.num_partitions for i in infos.values()), default=None)
        if expected is not None and len(infos) >= expected:
            return infos
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(infos)} of {expected or '?'} clients connected within {wait_seconds:.0f}s")
        time.sleep(0.5)


def describe_problems(problems: Mapping[int, str], handlers: Sequence[str]) -> str:
    """One message for every client that cannot take part (the same problem on several nodes said once)."""
    by_problem: dict[str, list[int]] = {}
    for node, problem in sorted(problems.items()):
        by_problem.setdefault(problem, []).append(node)
    lines = [
        f"  {'node ' + str(nodes[0]) if len(nodes) == 1 else f'{len(nodes)} nodes {nodes}'}: {problem}"
        for problem, nodes in by_problem.items()
    ]
    text = f"{len(problems)} client(s) cannot take part in the experiment:\n" + "\n".join(lines)
    if any("handler" in p for p in problems.values()):
        text += (
            f"\nEvery client needs Flower's train and evaluate handlers and {', '.join(handlers)}: add them with "
            "fed_unlearn.flower.add_unlearning(app, model_fn=..., data_fn=...) (docs/own-app.md)."
        )
    return text


def describe_nodes(
    grid: Grid,
    nodes: list[int],
    timeout: float,
    check: ArrayRecord | None,
    handlers: Sequence[str] = EXPERIMENT_HANDLERS,
) -> tuple[list[ClientInfo], dict[int, str]]:
    """Identify and describe ``nodes``: what each says it is, and node -> problem for the others."""
    problems: dict[int, str] = {}
    found: list[ClientInfo] = []
    keys = ["partition-id", "num-partitions", "site"]
    msgs = [Message(RecordDict({P.CONFIG_RECORD: ConfigRecord({P.KEYS: keys})}), n, P.IDENTIFY) for n in nodes]
    identity: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            problems[node] = f"no {P.IDENTIFY} handler ({last_line(reply.error.reason)})"
            continue
        ident = dict(reply.content[P.IDENTITY_RECORD]) if P.IDENTITY_RECORD in reply.content.config_records else {}
        caps = (
            dict(reply.content[P.CAPABILITIES_RECORD]) if P.CAPABILITIES_RECORD in reply.content.config_records else {}
        )
        missing_keys = [k for k in ("partition-id", "num-partitions") if k not in ident]
        missing = [h for h in handlers if h != P.IDENTIFY and h not in list(caps.get("handlers", []))]
        if missing_keys or missing:
            problems[node] = "; ".join(
                ([f"node config lacks {missing_keys}"] if missing_keys else [])
                + ([f"missing handlers {missing}"] if missing else [])
            )
            continue
        identity[node] = ident
    ok = sorted(identity)
    content: dict[str, Any] = {"arrays": check} if check is not None else {}
    info_msgs = [Message(RecordDict(content), n, P.INFO) for n in ok]
    for reply in grid.send_and_receive(info_msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            problems[node] = f"{P.INFO} failed: {last_line(reply.error.reason)}"
            continue
        arch = str(reply.content["check"]["architecture"]) if "check" in reply.content.config_records else "ok"
        if arch != "ok":
            problems[node] = f"the task's model does not fit its architecture: {arch}"
            continue
        try:
            m = reply.content["info"]
            ident = identity[node]
            info = ClientInfo(
                client_id=int(ident["partition-id"]),
                node_id=node,
                num_partitions=int(ident["num-partitions"]),
                train_n=int(m["train-n"]),
                heldout_n=int(m["heldout-n"]),
                input_shape=tuple(int(s) for s in m["input-shape"]),  # type: ignore[union-attr]
                num_classes=int(m["num-classes"]),
                site=str(ident.get("site", "")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # a node's description is hostile too
            problems[node] = f"its {P.INFO} / {P.IDENTIFY} reply is malformed ({type(exc).__name__}: {exc})"
            continue
        found.append(info)
    for node in set(ok) - {i.node_id for i in found} - set(problems):
        problems[node] = f"did not answer {P.INFO} within {timeout:.0f} s"
    return found, problems


def last_line(text: str) -> str:
    """The last non-empty line of a client's error (its exception), or the text itself."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else str(text)


def initial_model(task: Task, run_config: Mapping[str, Any], first: ClientInfo | None) -> ArrayRecord:
    """The federation's initial model (the built-in task sizes it from the clients' data)."""
    model = (
        task.model(run_config, first.input_shape, first.num_classes)
        if task.builtin and first
        else task.model(run_config)
    )
    return to_record(get_weights(model))


def measure(
    grid: Grid,
    node_of: dict[int, int],
    arrays: ArrayRecord,
    reference: ArrayRecord | None,
    timeout: float,
    forget_all: Sequence[int] = (),
    allow_missing: bool = False,
) -> dict[int, dict[str, float]]:
    """Have every client in ``node_of`` measure ``arrays`` (vs ``reference``, with the MIA) on its own data.

    ``forget_all``: clients whose whole train split is the forget set (a site being
    erased). ``allow_missing``: a client that fails or does not answer is left out
    instead of raising (a deployed site may be gone).
    """

    def content(cid: int) -> RecordDict:
        c: dict[str, Any] = {
            "arrays": arrays,
            "config": ConfigRecord({"mia": True, P.FORGET_ALL: cid in set(forget_all)}),
        }
        if reference is not None:
            c["reference"] = reference
        return RecordDict(c)

    msgs = [Message(content(cid), nid, P.AUDIT) for cid, nid in sorted(node_of.items())]
    out: dict[int, dict[str, float]] = {}
    client_of = {nid: cid for cid, nid in node_of.items()}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            if allow_missing:
                continue
            raise RuntimeError(
                f"client {client_of.get(reply.metadata.src_node_id)} failed to evaluate: {reply.error.reason}"
            )
        out[client_of[reply.metadata.src_node_id]] = metric_dict(reply.content["metrics"])
    return out


def relearn_time(
    grid: Grid, node_of: dict[int, int], arrays: ArrayRecord, targets: dict[int, float], max_steps: int, timeout: float
) -> dict[str, float]:
    """Relearn time of ``arrays``: mean SGD steps the forgetting clients need to reach their targets."""
    msgs = [
        Message(
            RecordDict(
                {"arrays": arrays, "config": ConfigRecord({"target-accuracy": float(t), "max-steps": max_steps})}
            ),
            node_of[c],
            P.RELEARN,
        )
        for c, t in sorted(targets.items())
    ]
    steps, reached = [], []
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"relearn probe failed on node {reply.metadata.src_node_id}: {reply.error.reason}")
        m = reply.content["metrics"]
        steps.append(float(m["relearn-steps"]))  # type: ignore[arg-type]
        reached.append(int(m["relearn-reached"]))  # type: ignore[call-overload]
    return {"relearn-steps": float(np.mean(steps)), "relearn-all-reached": float(min(reached))}


def request_deletion(
    grid: Grid,
    node_of: dict[int, int],
    involved: Sequence[int],
    arrays: ArrayRecord,
    cfg: ExperimentConfig,
    timeout: float,
) -> dict[int, dict[str, Any]]:
    """Send the deletion request (``query.forget``) with the current model to the clients it names.

    Each selects its samples on its own data and keeps the mask; the server learns only
    counts and a digest per client.

    Raises
    ------
    RuntimeError
        If a client fails, or the request selects no sample anywhere.
    """
    d = cfg.request.deletion
    spec = ConfigRecord(
        {
            "scenario": d.scenario,
            "selection": d.selection,
            "fraction": d.fraction,
            "class": d.forget_class,
            "seed": cfg.data.seed,
        }
    )
    msgs = [Message(RecordDict({"arrays": arrays, "config": spec}), node_of[c], P.FORGET) for c in sorted(involved)]
    client_of = {nid: cid for cid, nid in node_of.items()}
    out: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        cid = client_of[reply.metadata.src_node_id]
        if reply.has_error():
            raise RuntimeError(f"client {cid} failed to process the deletion request: {reply.error.reason}")
        m = reply.content["metrics"]
        out[cid] = {
            "forget-n": int(m["forget-n"]),
            "retain-n": int(m["retain-n"]),  # type: ignore[call-overload]
            "digest": str(reply.content["receipt"]["digest"]),
        }
    missing = sorted(set(involved) - set(out))
    if missing:
        raise RuntimeError(f"client(s) {missing} did not answer the deletion request")
    if not any(r["forget-n"] for r in out.values()):
        raise RuntimeError("the deletion request selects no sample on any client")
    return out


def retrain(
    grid: Grid,
    cfg: ExperimentConfig,
    clients: dict[int, ClientInfo],
    initial: ArrayRecord,
    label: str,
    setup: Callable[[Unlearning], None],
) -> FederationRun:
    """The original's ``d-1`` rounds from ``initial`` with a fresh strategy that ``setup`` adjusts (who, on what)."""
    strategy = new_strategy(None, len(clients), evaluate_departed=True)
    for c, i in clients.items():
        strategy.set_identity(i.node_id, **{"partition-id": c})
    setup(strategy)
    rounds = range(1, cfg.gold_rounds + 1)
    return run_rounds(grid, strategy, FederationRun(arrays=initial), rounds, cfg.federation.round_timeout, label)


def gold_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    clients: dict[int, ClientInfo],
    initial: ArrayRecord,
    request: Mapping[int, Mapping[str, Any]],
    architecture: str = "",
) -> tuple[ArrayRecord, dict[str, Any]]:
    """The gold federation (load it from the cache or train it and cache it).

    The original's ``d-1`` rounds from the same initial model and seeds, without exactly
    the deleted data: the departing clients left out, or the requesting clients
    training on their retained samples only.
    """
    digests = {c: str(r["digest"]) for c, r in request.items()} if cfg.request.deletion.scenario != "client" else None
    key = cfg.gold_key(len(clients), digests, architecture)
    cached = load_gold(cfg.output.gold_cache_dir, key)
    if cached is not None:
        weights, meta = cached
        log(INFO, "gold federation loaded from cache %s", Path(cfg.output.gold_cache_dir) / key)
        return to_record(weights), {**meta, "cached": True}
    retain_only = [] if cfg.request.deletion.clients_leave else sorted(request)
    log(
        INFO,
        "gold federation: %d rounds without clients %s, clients %s on their retained data",
        cfg.gold_rounds,
        list(cfg.leaving),
        retain_only,
    )

    def leave_out(strategy: Unlearning) -> None:
        strategy.exclude(*(clients[c].node_id for c in cfg.leaving))
        strategy.restrict_to_retained(*(clients[c].node_id for c in retain_only))

    run = retrain(grid, cfg, clients, initial, "gold", leave_out)
    meta = {
        "key": key,
        "config": cfg.to_dict(),
        "history": {str(r): h for r, h in run.history.items()},
        "compute": run.compute(),
        "wall-seconds": run.wall_seconds,
    }
    if run.arrays is None:
        raise RuntimeError("the gold federation produced no model")
    save_gold(cfg.output.gold_cache_dir, key, to_weights(run.arrays), meta)
    return run.arrays, {**meta, "cached": False}


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
    cost = {"count": count, "trained": 0, "cached": 0, "wall-seconds": 0.0, "train-steps": 0.0, "test-acc": []}
    for index in range(count):
        key = cfg.reference_key(len(clients), index, count, architecture, members=sorted(clients) if members else ())
        cached = load_gold(cfg.output.gold_cache_dir, key)
        if cached is not None:
            weights, meta = cached
            cost["cached"] += 1
            refs.append(to_record(weights))
        else:
            run = retrain(
                grid,
                cfg,
                clients,
                initial,
                f"reference {index + 1}/{count}",
                lambda strategy, k=index: strategy.train_reference(k, count, cfg.data.seed),
            )
            if run.arrays is None:
                raise RuntimeError(f"reference federation {index} produced no model")
            meta = {
                "key": key,
                "history": {str(r): h for r, h in run.history.items()},
                "compute": run.compute(),
                "wall-seconds": run.wall_seconds,
            }
            save_gold(cfg.output.gold_cache_dir, key, to_weights(run.arrays), meta)
            cost["trained"] += 1
            cost["wall-seconds"] += run.wall_seconds
            refs.append(run.arrays)
        cost["train-steps"] += float(meta["compute"]["train-steps"])
        history = meta["history"]
        cost["test-acc"].append(history[max(history, key=int)].get("test-acc", float("nan")))
    log(INFO, "reference federations: %d trained, %d from the cache", cost["trained"], cost["cached"])
    return refs, cost


def strong_audit_scores(
    grid: Grid,
    node_of: dict[int, int],
    arrays: ArrayRecord,
    references: Sequence[ArrayRecord],
    seed: int,
    timeout: float,
    forget_all: Sequence[int] = (),
    allow_missing: bool = False,
) -> dict[str, np.ndarray]:
    """The strong audit of ``arrays``: every client scores its forget and held-out samples; pooled here.

    Each client in ``node_of`` gets the model and the reference models in one
    ``evaluate.audit`` and answers per-sample scores of :data:`fed_unlearn.attacks.ATTACKS`
    (clients with nothing to forget answer none). ``allow_missing`` as in :func:`measure`.
    """
    config = {P.REFERENCE_COUNT: len(references), P.REFERENCE_SEED: int(seed), "mia": False}
    content = {"arrays": arrays, **{f"ref-{j}": r for j, r in enumerate(references)}}
    msgs = [
        Message(
            RecordDict({**content, "config": ConfigRecord({**config, P.FORGET_ALL: cid in set(forget_all)})}),
            nid,
            P.AUDIT,
        )
        for cid, nid in sorted(node_of.items())
    ]
    client_of = {nid: cid for cid, nid in node_of.items()}
    pooled: dict[str, list[float]] = {f"{a}-{p}": [] for a in ATTACKS for p in ("forget", "heldout")}
    for reply in sorted(grid.send_and_receive(msgs, timeout=timeout), key=lambda r: r.metadata.src_node_id):
        cid = client_of.get(reply.metadata.src_node_id)
        if reply.has_error():
            if allow_missing:
                continue
            raise RuntimeError(f"client {cid} failed the strong audit: {last_line(reply.error.reason)}")
        if "attack-scores" not in reply.content.metric_records:
            continue
        rec = reply.content["attack-scores"]
        for k in pooled:
            values = np.asarray(rec.get(k, []), dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise RuntimeError(f"client {cid} sent non-finite attack scores ({k})")
            pooled[k].extend(values.tolist())
    return {k: np.asarray(v) for k, v in pooled.items()}


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
        cached = load_gold(cfg.output.gold_cache_dir, key)
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
        save_gold(
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


def run_experiment(
    grid: Grid, cfg: ExperimentConfig, method: UnlearningMethod, run_config: dict[str, Any]
) -> dict[str, Any]:
    """Run the original rounds, the deletion request, gold, unlearning + recovery and the report."""
    t_start = time.perf_counter()
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
    unknown = sorted(set(cfg.request.departing) - set(clients))
    if unknown:
        raise ValueError(f"unknown departing client id(s) {unknown}; the federation has clients {sorted(clients)}")
    first = clients[min(clients)]
    d = cfg.request.deletion
    by_class = d.scenario == "class" or d.selection == "class" and d.scenario == "samples"
    if by_class and d.forget_class >= first.num_classes:
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
    # the deletion request, made with the original model; then the gold without exactly those samples
    request = request_deletion(grid, node_of, involved, original, cfg, cfg.federation.round_timeout)
    forgetting = sorted(c for c in involved if request[c]["forget-n"] > 0)
    strategy.request_unlearning(
        *(node_of[c] for c in forgetting),
        key=None,
        round=cfg.request.round,
        leave=cfg.request.deletion.clients_leave,
        deletion=cfg.request.deletion,
        joint=cfg.request.deletion.scenario == "class",
        send_request=False,
    )
    gold_arrays, gold_meta = gold_federation(grid, cfg, clients, initial, request, architecture)
    gold_history = {int(r): h for r, h in gold_meta["history"].items()}
    gold_final = gold_history[max(gold_history)]
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
    if not strategy.unlearning_done or not finished or run.arrays is None:
        raise RuntimeError(f"{method.name} did not finish unlearning by round {cfg.federation.num_server_rounds}")
    end_unlearning = finished[0]
    reached = [r for r in sorted(run.history) if r >= end_unlearning and run.history[r].get("test-acc", -1.0) >= target]

    models = {"original": original, "unlearned": run.arrays, "gold": gold_arrays}
    per_client = {
        name: measure(grid, node_of, arrays, gold_arrays, cfg.federation.round_timeout)
        for name, arrays in models.items()
    }
    report = {name: summarise(evals) for name, evals in per_client.items()}
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
    weights = {name: to_weights(arrays) for name, arrays in models.items()}
    for name, metrics in report.items():
        metrics["average-gap"] = average_gap(metrics, report["gold"])
        metrics["l2-to-gold"] = weight_distance(weights[name], weights["gold"])
        metrics["l2-to-original"] = weight_distance(weights[name], weights["original"])
    table = markdown_table(report)
    log(INFO, "\n%s", table)
    further = further_than_original(report)
    if further:
        log(WARNING, "%s ended further from the gold than the original on: %s", method.name, ", ".join(further))

    unlearn_cost = run.compute(first_round=cfg.request.round)
    gold_cost = gold_meta["compute"]
    results = {
        "config": cfg.to_dict(),
        "run-config": dict(run_config),
        "method": {"name": method.name, "settings": asdict(method.config) if is_dataclass(method.config) else {}},
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
        "timings": {
            "federation-wall-seconds": run.wall_seconds,
            "gold-wall-seconds": gold_meta.get("wall-seconds"),
            "unlearning+recovery-wall-seconds": unlearn_wall,
            "gold-cached": gold_meta["cached"],
            "original-cached": original_cached,
            "total-seconds": time.perf_counter() - t_start,
        },
        "gold-key": gold_meta.get("key"),
        "code": code_fingerprint(),
        "table-markdown": table,
    }
    out_dir = Path(cfg.output.results_dir) / experiment_name(cfg, method)
    write_json(out_dir / "results.json", results)
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
    log(INFO, "results written to %s", out_dir.resolve())
    return results


def task_label(cfg: ExperimentConfig) -> str:
    """The data the experiment runs on: the built-in dataset, or the task module."""
    return cfg.data.dataset if cfg.data.builtin else cfg.data.task


def describe_request(cfg: ExperimentConfig) -> str:
    """One line naming what is forgotten."""
    d = cfg.request.deletion
    if d.scenario == "client":
        return f"client(s) {list(cfg.request.departing)} leave"
    if d.scenario == "class":
        return f"class {d.forget_class} removed"
    what = f"class-{d.forget_class} samples" if d.selection == "class" else f"{d.selection} samples"
    return f"client(s) {list(cfg.request.departing)} delete {d.fraction:.0%} ({what})"


def experiment_name(cfg: ExperimentConfig, method: UnlearningMethod) -> str:
    """Folder name of an experiment's results."""
    d = cfg.request.deletion
    if d.scenario == "class":
        what = f"class{d.forget_class}"
    else:
        what = "dep" + "-".join(map(str, cfg.request.departing))
        if d.scenario == "samples":
            sel = f"class{d.forget_class}" if d.selection == "class" else d.selection
            what += f"-{sel}{d.fraction:g}"
    data = f"{cfg.data.dataset}_{cfg.data.model}" if cfg.data.builtin else cfg.data.task.replace(".", "-")
    return f"{data}_{method.name}_{what}_r{cfg.request.round}of{cfg.federation.num_server_rounds}_seed{cfg.data.seed}"
