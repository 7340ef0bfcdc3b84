"""The user's ClientApp: train and evaluate as in Flower's quickstart, plus the six-line identify handler.

No fed-unlearn import: PUF needs nothing from the client, and being named by a node-config
key needs only ``query.identify`` (fed_unlearn.protocol).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import Net, load_data
from .task import test as test_fn
from .task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    torch.manual_seed(1000 * int(msg.content["config"]["server-round"]) + pid)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _ = load_data(pid, num)
    loss = train_fn(
        model,
        trainloader,
        int(context.run_config["local-epochs"]),
        float(context.run_config["lr"]),
        float(msg.content["config"].get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(trainloader.dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, testloader = load_data(pid, num)
    loss, acc = test_fn(model, testloader)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(testloader.dataset)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    keys = msg.content["config"]["keys"]
    found = {k: context.node_config[k] for k in keys if k in context.node_config}
    return Message(RecordDict({"identity": ConfigRecord(found)}), reply_to=msg)
