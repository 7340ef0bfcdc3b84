"""fed-unlearn ClientApp: ordinary Flower training and evaluation on the node's own data.

The client knows nothing about unlearning for PUF: a departing client's unlearning
round is an ordinary ``train`` message. It answers

* ``query.info``: its id (``partition-id`` from the node config), split sizes, and the
  model's input shape and class count (so the server builds the model without data);
* ``train``: local SGD from the received global model; replies the model and
  ``num-examples`` / ``train-loss`` / ``train-steps`` / ``train-seconds``;
* ``train.unlearn``: the local unlearning routine of the method named in the instruction
  (``unlearn-method``: SRAGU with the server's per-layer stability weights, or gradient
  ascent) on the node's own data (its forget set); the data never leaves the node, only
  the unlearned model does;
* ``query.relearn``: fine-tune the received model on the node's train data until its
  accuracy there reaches ``target-accuracy``; replies the number of steps (relearn time);
* ``evaluate``: measurements of ``arrays`` on its train and held-out splits, fidelity
  to an optional ``reference`` (gold) model and, if asked, the membership-inference AUC.

The node config gives ``partition-id`` and ``num-partitions`` (set by the simulation
engine, or by ``--node-config`` on a deployed SuperNode); data settings come from the
run config, so every client slices the same dataset the same way.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_unlearn.config import ExperimentConfig
from fed_unlearn.data import ArrayDataset, client_datasets
from fed_unlearn.evaluation import measure_client
from fed_unlearn.models import build_model
from fed_unlearn.training import client_seed, relearn_steps, train_local
from fed_unlearn.unlearning import CLIENT_ROUTINES

app = ClientApp()


def _node_identity(context: Context) -> tuple[int, int]:
    try:
        pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(f"node config needs 'partition-id' and 'num-partitions' (missing {exc})") from None
    return pid, num


def _setup(context: Context) -> tuple[ExperimentConfig, int, int, ArrayDataset, ArrayDataset]:
    cfg = ExperimentConfig.from_run_config(context.run_config)
    torch.set_num_threads(cfg.client_threads)
    pid, num = _node_identity(context)
    train, heldout = client_datasets(
        cfg.dataset, pid, num, data_dir=cfg.data_dir, partitioner=cfg.partitioner,
        alpha=cfg.dirichlet_alpha, holdout_fraction=cfg.holdout_fraction, seed=cfg.seed,
    )
    return cfg, pid, num, train, heldout


def _model(cfg: ExperimentConfig, data: ArrayDataset, record: ArrayRecord) -> torch.nn.Module:
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    model.load_state_dict(record.to_torch_state_dict())
    return model


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    """Describe this client: id, split sizes, model input shape, class count."""
    cfg, pid, num, train, heldout = _setup(context)
    metrics = MetricRecord({
        "partition-id": pid, "num-partitions": num, "train-n": len(train), "heldout-n": len(heldout),
        "input-shape": [int(s) for s in train.input_shape], "num-classes": train.num_classes,
    })
    return Message(RecordDict({"info": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model locally and return it."""
    cfg, pid, _, data, _ = _setup(context)
    model = _model(cfg, data, msg.content["arrays"])
    server_round = int(msg.content["config"]["server-round"])
    t0 = time.perf_counter()
    stats = train_local(model, data.x, data.y, cfg.train, seed=client_seed(cfg.seed, server_round, pid))
    metrics = MetricRecord({
        "num-examples": len(data), "train-loss": stats.mean_loss, "train-steps": stats.steps,
        "train-seconds": time.perf_counter() - t0, "partition-id": pid,
    })
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.train("unlearn")
def unlearn(msg: Message, context: Context) -> Message:
    """Run the named method's local unlearning routine on this node's data; return the model."""
    cfg, pid, _, data, heldout = _setup(context)
    model = _model(cfg, data, msg.content["arrays"])
    config = msg.content["config"]
    name = str(config.get("unlearn-method", ""))
    if name not in CLIENT_ROUTINES:
        raise ValueError(f"no client-side unlearning routine '{name}'; valid: {', '.join(sorted(CLIENT_ROUTINES))}")
    t0 = time.perf_counter()
    values = CLIENT_ROUTINES[name](model, (data.x, data.y), (heldout.x, heldout.y), context.run_config, config,
                                   client_seed(cfg.seed, int(config["server-round"]), pid))
    metrics = MetricRecord({**values, "num-examples": len(data), "train-loss": values["forget-loss-end"],
                            "train-seconds": time.perf_counter() - t0, "partition-id": pid})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.query("relearn")
def relearn(msg: Message, context: Context) -> Message:
    """Relearn-time probe: SGD steps on local train data until ``target-accuracy`` is reached."""
    cfg, pid, _, data, _ = _setup(context)
    model = _model(cfg, data, msg.content["arrays"])
    config = msg.content["config"]
    res = relearn_steps(model, data.x, data.y, float(config["target-accuracy"]), cfg.train,
                        max_steps=int(config["max-steps"]), seed=client_seed(cfg.seed, 1_000_000, pid))  # a stream no training round uses
    metrics = MetricRecord({"relearn-steps": res.steps, "relearn-reached": int(res.reached),
                            "start-accuracy": res.start_accuracy, "final-accuracy": res.final_accuracy, "partition-id": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Measure the received model (and its fidelity to ``reference``) on local data."""
    cfg, pid, _, data, heldout = _setup(context)
    model = _model(cfg, data, msg.content["arrays"])
    reference = _model(cfg, data, msg.content["reference"]) if "reference" in msg.content.array_records else None
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    values = measure_client(model, data, heldout, reference=reference, mia=bool(config.get("mia", False)))
    metrics = MetricRecord({**values, "num-examples": len(heldout), "partition-id": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
