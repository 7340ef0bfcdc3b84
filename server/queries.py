"""The server's questions to the nodes, beyond training: who they are, deletion, measurement, audit.

Every function sends one kind of message of :mod:`fed_unlearn.protocol` to the nodes it is
given and checks what comes back (a node's reply is hostile until read): ``query.identify``
and ``query.info`` (:func:`describe_nodes`, :func:`discover_clients`), ``query.forget``
(:func:`request_deletion`), ``evaluate.audit`` (:func:`measure`, :func:`strong_audit_scores`)
and ``query.relearn`` (:func:`relearn_time`). The experiment and the deployed service ask
the same questions through these functions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fed_unlearn import protocol as P
from fed_unlearn.attacks import ATTACKS
from fed_unlearn.config import ExperimentConfig
from fed_unlearn.flower import metric_dict
from fed_unlearn.flower.wire import (
    as_int,
    forget_request,
    handlers_of,
    identify_request,
    read_forget_reply,
    read_identify_reply,
    read_info_reply,
    read_relearn_reply,
    relearn_request,
)

#: Handlers the experiment needs on every client, besides Flower's ``train`` and ``evaluate``.
EXPERIMENT_HANDLERS = P.NEEDS["the experiment and its report"]


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
    msgs = [Message(identify_request(keys), n, P.IDENTIFY) for n in nodes]
    identity: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            problems[node] = f"no {P.IDENTIFY} handler ({last_line(reply.error.reason)})"
            continue
        try:
            ident, caps = read_identify_reply(reply.content)
        except KeyError:
            ident, caps = {}, {}  # said below as the node-config keys it lacks
        missing_keys = [k for k in ("partition-id", "num-partitions") if k not in ident]
        has = handlers_of(caps)
        missing = [h for h in handlers if h != P.IDENTIFY and h not in has]
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
        try:
            data = read_info_reply(reply.content)
            ident = identity[node]
            info = ClientInfo(
                client_id=as_int(ident["partition-id"]),
                node_id=node,
                num_partitions=as_int(ident["num-partitions"]),
                train_n=data.train_n,
                heldout_n=data.heldout_n,
                input_shape=data.input_shape,
                num_classes=data.num_classes,
                site=str(ident.get("site", "")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # a node's description is hostile too
            problems[node] = f"its {P.INFO} / {P.IDENTIFY} reply is malformed ({type(exc).__name__}: {exc})"
            continue
        if data.architecture != "ok":
            problems[node] = f"the task's model does not fit its architecture: {data.architecture}"
            continue
        found.append(info)
    for node in set(ok) - {i.node_id for i in found} - set(problems):
        problems[node] = f"did not answer {P.INFO} within {timeout:.0f} s"
    return found, problems


def last_line(text: str | None) -> str:
    """The last non-empty line of a client's error (its exception), or the text itself."""
    text = "" if text is None else str(text)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


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

    msgs = audit_messages(node_of, arrays, reference, forget_all)
    return read_measurements(grid.send_and_receive(msgs, timeout=timeout), node_of, allow_missing)


def audit_messages(
    node_of: dict[int, int], arrays: ArrayRecord, reference: ArrayRecord | None, forget_all: Sequence[int] = ()
) -> list[Message]:
    """The ``evaluate.audit`` messages of :func:`measure`, one per client in ``node_of``."""

    def content(cid: int) -> RecordDict:
        c: dict[str, Any] = {
            "arrays": arrays,
            P.CONFIG_RECORD: ConfigRecord({P.MIA: True, P.FORGET_ALL: cid in set(forget_all)}),
        }
        if reference is not None:
            c[P.REFERENCE_RECORD] = reference
        return RecordDict(c)

    return [Message(content(cid), nid, P.AUDIT) for cid, nid in sorted(node_of.items())]


def read_measurements(
    replies: Iterable[Message], node_of: dict[int, int], allow_missing: bool = False
) -> dict[int, dict[str, float]]:
    """The clients' measurements in the replies to :func:`audit_messages` (see :func:`measure`)."""
    out: dict[int, dict[str, float]] = {}
    client_of = {nid: cid for cid, nid in node_of.items()}
    for reply in replies:
        if reply.has_error():
            if allow_missing:
                continue
            raise RuntimeError(
                f"client {client_of.get(reply.metadata.src_node_id)} failed to evaluate: {reply.error.reason}"
            )
        out[client_of[reply.metadata.src_node_id]] = metric_dict(reply.content.metric_records[P.METRICS_RECORD])
    return out


def relearn_time(
    grid: Grid, node_of: dict[int, int], arrays: ArrayRecord, targets: dict[int, float], max_steps: int, timeout: float
) -> dict[str, float]:
    """Relearn time of ``arrays``: mean SGD steps the forgetting clients need to reach their targets."""
    msgs = [
        Message(
            RecordDict({"arrays": arrays, P.CONFIG_RECORD: relearn_request(t, max_steps)}),
            node_of[c],
            P.RELEARN,
        )
        for c, t in sorted(targets.items())
    ]
    steps, reached = [], []
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"relearn probe failed on node {reply.metadata.src_node_id}: {reply.error.reason}")
        n, ok = read_relearn_reply(reply.content)
        steps.append(n)
        reached.append(int(ok))
    return {P.RELEARN_STEPS: float(np.mean(steps)), "relearn-all-reached": float(min(reached))}


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
    spec = forget_request(cfg.request.deletion, cfg.data.seed)
    msgs = [
        Message(RecordDict({"arrays": arrays, P.CONFIG_RECORD: spec}), node_of[c], P.FORGET) for c in sorted(involved)
    ]
    client_of = {nid: cid for cid, nid in node_of.items()}
    out: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        cid = client_of[reply.metadata.src_node_id]
        if reply.has_error():
            raise RuntimeError(f"client {cid} failed to process the deletion request: {reply.error.reason}")
        out[cid] = read_forget_reply(reply.content)
    missing = sorted(set(involved) - set(out))
    if missing:
        raise RuntimeError(f"client(s) {missing} did not answer the deletion request")
    if not any(r[P.FORGET_N] for r in out.values()):
        raise RuntimeError("the deletion request selects no sample on any client")
    return out


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
    config = {P.REFERENCE_COUNT: len(references), P.REFERENCE_SEED: int(seed), P.MIA: False}
    content = {"arrays": arrays, **{P.reference_model_record(j): r for j, r in enumerate(references)}}
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
        if P.ATTACK_SCORES_RECORD not in reply.content.metric_records:
            continue
        rec = reply.content.metric_records[P.ATTACK_SCORES_RECORD]
        for k in pooled:
            values = np.asarray(rec.get(k, []), dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise RuntimeError(f"client {cid} sent non-finite attack scores ({k})")
            pooled[k].extend(values.tolist())
    return {k: np.asarray(v) for k, v in pooled.items()}
