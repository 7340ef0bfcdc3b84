"""fed-unlearn ClientApp: ordinary Flower training and evaluation on the node's own data.

The client knows nothing about unlearning for PUF: a departing client's unlearning
round is an ordinary ``train`` message. It answers

* ``query.info``: its id (``partition-id`` from the node config), split sizes, and the
  model's input shape and class count (so the server builds the model without data);
* ``query.erasure``: the server's poll of a deployed site's erasure inbox (node-config
  ``erasure-inbox``; see :mod:`fed_unlearn.erasure`): files the requests the server has
  journaled (``acks``) and replies the pending ones;
* ``query.forget``: the deletion request. With the model of that moment, a client named
  in the request selects the train samples it must forget
  (:func:`fed_unlearn.deletion.forget_mask`), keeps the mask in its ``Context`` state and
  replies only counts and a digest (the samples never leave the node);
* ``train``: local SGD from the received global model, for the *roles* named in the
  config (``roles``, default ``retain``; see :mod:`fed_unlearn.unlearning.base`):

  - ``retain``: training on ``data-part`` (``all``, or ``retain`` = the train samples not
    to forget), replied as ``arrays`` + ``metrics`` (what Flower's FedAvg expects);
  - ``forget``: training on the forget set, replied as ``forget-arrays`` + ``forget-metrics``
    (PUF's departing pseudo-gradient when the client stays: sample or class deletion).

  Optional ``local-epochs-ratio`` (FedEraser's calibration) and ``seed-round`` (the round whose
  minibatch seeds are used: the retrain baseline replays the gold's) override the run
  config. Metrics: ``num-examples`` / ``train-loss`` / ``train-steps`` / ``train-seconds``;
* ``train.unlearn``: the forget role runs the local unlearning routine of the method
  named in ``unlearn-method`` (SRAGU with the server's per-layer stability weights,
  gradient ascent, projected gradient ascent, IEU) on the node's forget set; the data
  never leaves the node, only the unlearned model does. ``roles`` may add the retain role;
* ``query.relearn``: fine-tune the received model on the node's forget set until its
  accuracy there reaches ``target-accuracy``; replies the number of steps (relearn time);
* ``evaluate``: measurements of ``arrays`` on its forget / retain / held-out parts,
  fidelity to an optional ``reference`` (gold) model and, if asked, the
  membership-inference AUCs.

The node config gives ``partition-id`` and ``num-partitions`` (set by the simulation
engine, or by ``--node-config`` on a deployed SuperNode); data settings come from the
run config, so every client slices the same dataset the same way, unless the node
config names the site's own data (``data-file``, an ``.npz``). A deployed node also
names its ``site`` and its ``erasure-inbox``. A node is sent at
most one message per round: Flower may run two messages of one node concurrently,
each on its own copy of the node's ``Context``, and the last one to finish would
overwrite the other's state.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_unlearn.config import ExperimentConfig
from fed_unlearn.data import ArrayDataset, client_datasets, load_site_file, train_holdout_split
from fed_unlearn.deletion import forget_mask, mask_digest
from fed_unlearn.erasure import acknowledge_in_inbox, pending_in_inbox
from fed_unlearn.evaluation import measure_client
from fed_unlearn.models import build_model
from fed_unlearn.protocol import DATA_PARTS, ROLE_KEYS, ROLES
from fed_unlearn.training import TrainSettings, client_seed, relearn_steps, train_local
from fed_unlearn.unlearning import CLIENT_ROUTINES, KEEPS_LAST_LOCAL_MODEL

app = ClientApp()

#: Context-state keys of this app (the node's own state, persisted by Flower between messages).
MASK_KEY = "fed-unlearn.forget-mask"
LAST_LOCAL_KEY = "fed-unlearn.last-local"
LAST_LOCAL_N_KEY = "fed-unlearn.last-local-n"


def _node_identity(context: Context) -> tuple[int, int]:
    try:
        pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(f"node config needs 'partition-id' and 'num-partitions' (missing {exc})") from None
    return pid, num


def _site(context: Context, pid: int) -> str:
    """The site name this node speaks for (node-config ``site``; default ``site-<partition-id>``)."""
    return str(context.node_config.get("site", f"site-{pid}"))


def _setup(context: Context) -> tuple[ExperimentConfig, int, int, ArrayDataset, ArrayDataset]:
    cfg = ExperimentConfig.from_run_config(context.run_config)
    torch.set_num_threads(cfg.client_threads)
    pid, num = _node_identity(context)
    if "data-file" in context.node_config:  # a deployed site with its own data
        ds = load_site_file(str(context.node_config["data-file"]))
        train_idx, hold_idx = train_holdout_split(np.arange(len(ds)), cfg.holdout_fraction, cfg.seed * 1_000_003 + pid)
        return cfg, pid, num, ds.subset(train_idx), ds.subset(hold_idx)
    train, heldout = client_datasets(
        cfg.dataset, pid, num, data_dir=cfg.data_dir, partitioner=cfg.partitioner,
        alpha=cfg.dirichlet_alpha, holdout_fraction=cfg.holdout_fraction, seed=cfg.seed,
    )
    return cfg, pid, num, train, heldout


def _model(cfg: ExperimentConfig, data: ArrayDataset, record: ArrayRecord) -> torch.nn.Module:
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    model.load_state_dict(record.to_torch_state_dict())
    return model


def _involved(cfg: ExperimentConfig, pid: int) -> bool:
    # (a service's requests arrive at run time: it names the site to forget with ``forget-all``)
    return cfg.deletion.scenario == "class" or pid in cfg.departing


def _mask(cfg: ExperimentConfig, pid: int, context: Context, data: ArrayDataset, config: Any = None) -> np.ndarray | None:
    """This node's deletion mask: recorded by ``query.forget``, or derived when no model is needed.

    All ``True`` when the instruction says ``forget-all`` (a deployed site being erased:
    stateless, so it survives SuperNode and run restarts); all ``False`` for a client not
    named in the request; ``None`` = the request that picks the samples with the model
    has not arrived yet.
    """
    if config is not None and bool(config.get("forget-all", False)):
        return np.ones(len(data), bool)
    if not _involved(cfg, pid):
        return np.zeros(len(data), bool)
    if MASK_KEY in context.state.array_records:
        return context.state[MASK_KEY]["mask"].numpy().astype(bool)
    if cfg.deletion.needs_model:
        return None
    return forget_mask(cfg.deletion, pid, data.x, data.y, cfg.seed)


def _part(cfg: ExperimentConfig, pid: int, context: Context, data: ArrayDataset, part: str, config: Any = None) -> ArrayDataset:
    """The train samples of ``part``: all of them, the retained ones, or the ones to forget."""
    if part not in DATA_PARTS:
        raise ValueError(f"unknown data-part '{part}'; valid: {', '.join(DATA_PARTS)}")
    if part == "all":
        return data
    mask = _mask(cfg, pid, context, data, config)
    if mask is None:
        raise RuntimeError(f"client {pid}: data-part '{part}' asked before the deletion request (query.forget) reached this node")
    idx = np.flatnonzero(mask if part == "forget" else ~mask)
    if len(idx) == 0:
        raise ValueError(f"client {pid}: its '{part}' part is empty")
    return data.subset(idx)


def _roles(config: Any, default: str) -> list[str]:
    roles = [r.strip() for r in str(config.get("roles", default)).split(",") if r.strip()]
    bad = sorted(set(roles) - set(ROLES))
    if bad or not roles:
        raise ValueError(f"unknown role(s) {bad or roles}; valid: {', '.join(ROLES)}")
    return roles


def _settings(cfg: ExperimentConfig, config: Any) -> TrainSettings:
    """Local SGD settings; ``local-epochs-ratio`` in the instruction runs ``max(1, round(r E))`` epochs (FedEraser's calibration)."""
    if "local-epochs-ratio" not in config:
        return cfg.train
    t = cfg.train
    epochs = max(1, int(np.floor(float(config["local-epochs-ratio"]) * t.epochs + 0.5)))
    return TrainSettings(epochs, t.batch_size, t.lr, t.momentum, t.weight_decay)


def _augment(cfg: ExperimentConfig, config: Any) -> str:
    """Augmentation of this instruction: the configured one from the deletion request on, else none."""
    if cfg.augment == "none" or "seed-round" in config:  # (the retrain baseline replays the gold's recipe)
        return "none"
    return cfg.augment if int(config.get("server-round", 0)) >= cfg.departure_round else "none"


def _train_role(cfg: ExperimentConfig, pid: int, data: ArrayDataset, record: ArrayRecord, config: Any) -> tuple[ArrayRecord, MetricRecord]:
    """Plain local SGD on ``data`` from the received model: one role's reply."""
    model = _model(cfg, data, record)
    seed_round = int(config.get("seed-round", config["server-round"]))
    t0 = time.perf_counter()
    stats = train_local(model, data.x, data.y, _settings(cfg, config), seed=client_seed(cfg.seed, seed_round, pid),
                        augment=_augment(cfg, config), clip_bound=cfg.fastclip_bound, clip_every=cfg.fastclip_every)
    metrics = MetricRecord({
        "num-examples": len(data), "train-loss": stats.mean_loss, "train-steps": stats.steps,
        "train-seconds": time.perf_counter() - t0, "partition-id": pid,
    })
    return ArrayRecord(model.state_dict()), metrics


def _unlearn_role(cfg: ExperimentConfig, pid: int, context: Context, forget: ArrayDataset, heldout_all: ArrayDataset,
                  record: ArrayRecord, config: Any, retain: ArrayDataset | None = None) -> tuple[ArrayRecord, MetricRecord]:
    """The method's local unlearning routine on the forget set: the forget role's reply."""
    name = str(config.get("unlearn-method", ""))
    if name not in CLIENT_ROUTINES:
        raise ValueError(f"no client-side unlearning routine '{name}'; valid: {', '.join(sorted(CLIENT_ROUTINES))}")
    # the held-out samples of the forgotten classes: the routines' reference for "unseen"
    heldout = heldout_all.subset(np.flatnonzero(np.isin(heldout_all.y, np.unique(forget.y))))
    model = _model(cfg, forget, record)
    state: dict[str, Any] = {"augment": _augment(cfg, config)}
    if retain is not None:
        state["retain"] = (retain.x, retain.y)
    if LAST_LOCAL_KEY in context.state.array_records:
        state["last-local"] = {k: v.numpy() for k, v in context.state[LAST_LOCAL_KEY].items()}
        state["last-local-n"] = int(context.state.metric_records[LAST_LOCAL_N_KEY]["num-examples"])
    t0 = time.perf_counter()
    values = CLIENT_ROUTINES[name](model, (forget.x, forget.y), (heldout.x, heldout.y), context.run_config, config,
                                   client_seed(cfg.seed, int(config["server-round"]), pid), state)
    metrics = MetricRecord({**values, "num-examples": len(forget), "train-loss": values["forget-loss-end"],
                            "train-seconds": time.perf_counter() - t0, "partition-id": pid})
    return ArrayRecord(model.state_dict()), metrics


def _train_reply(msg: Message, context: Context, forget_routine: bool) -> Message:
    cfg, pid, _, full, heldout = _setup(context)
    config = msg.content["config"]
    record = msg.content["arrays"]
    roles = _roles(config, "forget" if forget_routine else "retain")
    out: dict[str, Any] = {}
    for role in roles:
        if role == "retain":
            arrays, metrics = _train_role(cfg, pid, _part(cfg, pid, context, full, str(config.get("data-part", "all")), config), record, config)
        elif forget_routine:
            mask = _mask(cfg, pid, context, full, config)
            retain = full.subset(np.flatnonzero(~mask)) if mask is not None and (~mask).any() else None
            arrays, metrics = _unlearn_role(cfg, pid, context, _part(cfg, pid, context, full, "forget", config), heldout, record,
                                            config, retain)
        else:
            arrays, metrics = _train_role(cfg, pid, _part(cfg, pid, context, full, "forget", config), record, config)
        akey, mkey = ROLE_KEYS[role]
        out[akey], out[mkey] = arrays, metrics
    if roles == ["retain"] and cfg.method in KEEPS_LAST_LOCAL_MODEL:
        # the node's own last local model (projected gradient ascent builds its reference from it)
        context.state[LAST_LOCAL_KEY] = out["arrays"]
        context.state[LAST_LOCAL_N_KEY] = MetricRecord({"num-examples": int(out["metrics"]["num-examples"])})
    return Message(RecordDict(out), reply_to=msg)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    """Describe this client: id, split sizes, model input shape, class count."""
    cfg, pid, num, train, heldout = _setup(context)
    metrics = MetricRecord({
        "partition-id": pid, "num-partitions": num, "train-n": len(train), "heldout-n": len(heldout),
        "input-shape": [int(s) for s in train.input_shape], "num-classes": train.num_classes,
    })
    return Message(RecordDict({"info": metrics, "identity": ConfigRecord({"site": _site(context, pid)})}), reply_to=msg)


@app.query("erasure")
def erasure(msg: Message, context: Context) -> Message:
    """The server's poll: file the acknowledged requests, then hand over the pending ones.

    Reads the site's inbox (node-config ``erasure-inbox``); a node without one never
    has requests. The server validates what it receives; this only moves files.
    """
    pid, _ = _node_identity(context)
    inbox = context.node_config.get("erasure-inbox")
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    acks = [str(a) for a in config.get("acks", [])] if "acks" in config else []
    refused = [str(a) for a in config.get("refused", [])] if "refused" in config else []
    moved = acknowledge_in_inbox(str(inbox), acks) if inbox and acks else []
    moved_refused = acknowledge_in_inbox(str(inbox), refused, "refused") if inbox and refused else []
    pending = pending_in_inbox(str(inbox)) if inbox else []
    out = {"site": _site(context, pid), "count": len(pending), "acknowledged": len(moved), "refused": len(moved_refused)}
    if pending:
        out["requests"] = [text for _, text in pending]
        out["files"] = [stem for stem, _ in pending]
    return Message(RecordDict({"erasure": ConfigRecord(out)}), reply_to=msg)


@app.query("forget")
def forget(msg: Message, context: Context) -> Message:
    """The deletion request: pick the samples to forget with the received model; keep the mask here."""
    cfg, pid, _, data, heldout = _setup(context)
    if not _involved(cfg, pid):
        raise ValueError(f"client {pid} is not named in the deletion request")
    model = _model(cfg, data, msg.content["arrays"]) if "arrays" in msg.content.array_records else None
    mask = forget_mask(cfg.deletion, pid, data.x, data.y, cfg.seed, model=model, heldout=(heldout.x, heldout.y))
    context.state[MASK_KEY] = ArrayRecord({"mask": Array(mask.astype(np.uint8))})
    metrics = MetricRecord({"forget-n": int(mask.sum()), "retain-n": int((~mask).sum()), "partition-id": pid})
    return Message(RecordDict({"metrics": metrics, "receipt": ConfigRecord({"digest": mask_digest(mask)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model locally for the requested roles and return the model(s)."""
    return _train_reply(msg, context, forget_routine=False)


@app.train("unlearn")
def unlearn(msg: Message, context: Context) -> Message:
    """Run the named method's local unlearning routine on this node's forget set; return the model."""
    return _train_reply(msg, context, forget_routine=True)


@app.query("relearn")
def relearn(msg: Message, context: Context) -> Message:
    """Relearn-time probe: SGD steps on the node's forget set until ``target-accuracy`` is reached."""
    cfg, pid, _, full, _ = _setup(context)
    config = msg.content["config"]
    data = _part(cfg, pid, context, full, "forget", config)
    model = _model(cfg, data, msg.content["arrays"])
    res = relearn_steps(model, data.x, data.y, float(config["target-accuracy"]), cfg.train,
                        max_steps=int(config["max-steps"]), seed=client_seed(cfg.seed, 10_000, pid))
    return Message(RecordDict({"metrics": MetricRecord({
        "relearn-steps": res.steps, "relearn-reached": int(res.reached), "relearn-start-acc": res.start_accuracy,
        "relearn-final-acc": res.final_accuracy, "partition-id": pid,
    })}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Measure the received model (and its fidelity to an optional reference) on local data."""
    cfg, pid, _, data, heldout = _setup(context)
    model = _model(cfg, data, msg.content["arrays"])
    reference = _model(cfg, data, msg.content["reference"]) if "reference" in msg.content.array_records else None
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    values = measure_client(model, data, heldout, forget=_mask(cfg, pid, context, data, config),
                            removed_classes=cfg.deletion.removed_classes, reference=reference, mia=bool(config.get("mia", False)))
    metrics = MetricRecord({**values, "num-examples": len(heldout), "partition-id": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
