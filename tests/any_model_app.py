"""A user's Flower app with the models federations train: BatchNorm, half precision, 0-dim arrays.

Plain Flower code (Flower's quickstart pattern, no fed-unlearn import): a small CNN with
BatchNorm (its ``num_batches_tracked`` is an int64 0-dim buffer) on scikit-learn's 8x8
digits, in the dtype the run config names (``dtype``: float32, float16 or bfloat16). Flower's
own ArrayRecord cannot hold bfloat16 tensors, so in bfloat16 the app converts with
``fed_unlearn.flower.torch_record`` / ``torch_state`` (the one fed-unlearn helper it uses).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_digits
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@lru_cache(maxsize=1)
def _digits() -> Any:
    """scikit-learn's digits, read once per process (as Flower's quickstarts keep their dataset)."""
    return load_digits()


class BNNet(nn.Module):
    """Conv + BatchNorm + a scalar (0-dim) temperature: what a ResNet-style model carries."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1)) / self.temperature


def make_model(dtype: str, seed: int = 0) -> BNNet:
    torch.manual_seed(seed)
    return BNNet().to(DTYPES[dtype])


def partition(pid: int, num: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    d = _digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.array_split(np.random.default_rng(7).permutation(len(y))[:720], num)[pid]  # small: tests run fast
    cut = int(0.8 * len(idx))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


def to_record(model: nn.Module, dtype: str) -> ArrayRecord:
    if dtype == "bfloat16":
        from fed_unlearn.flower import torch_record

        return torch_record(model.state_dict())
    return ArrayRecord(model.state_dict())


def load(model: nn.Module, record: ArrayRecord, dtype: str) -> None:
    if dtype == "bfloat16":
        from fed_unlearn.flower import torch_state

        model.load_state_dict(torch_state(record))
    else:
        model.load_state_dict(record.to_torch_state_dict())


app = ClientApp()


def received(msg: Message, context: Context) -> tuple[nn.Module, str, int, tuple, tuple]:
    """The message's model, its dtype, this node's partition id and its (train, test) data."""
    dtype = str(context.run_config.get("dtype", "float32"))
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    model = make_model(dtype)
    load(model, msg.content["arrays"], dtype)
    return model, dtype, pid, *partition(pid, num)


@app.train()
def train(msg: Message, context: Context) -> Message:
    model, dtype, pid, (x, y), _ = received(msg, context)
    torch.manual_seed(100 * int(msg.content["config"]["server-round"]) + pid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    xt, yt = torch.from_numpy(x).to(DTYPES[dtype]), torch.from_numpy(y)
    total = 0.0
    for i in range(0, len(y), 32):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt[i : i + 32]).float(), yt[i : i + 32])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(yt[i : i + 32])
    rc = context.run_config
    weight: float | int = len(y) * float(rc["weight-scale"]) if "weight-scale" in rc else len(y)
    if "weight" in rc:  # one weight for every client (a DP accountant's uniform FedAvg)
        weight = rc["weight"]
    metrics = MetricRecord({"train_loss": total / len(y), "num-examples": weight})
    content = RecordDict({"arrays": to_record(model, dtype), "metrics": metrics, "extra": ConfigRecord({"note": pid})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model, dtype, _, _, (x, y) = received(msg, context)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x).to(DTYPES[dtype])).float()
    loss = float(nn.functional.cross_entropy(out, torch.from_numpy(y)))
    acc = float((out.argmax(1).numpy() == y).mean())
    return Message(
        RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})}),
        reply_to=msg,
    )


def forget_accuracy(record: ArrayRecord, dtype: str, pid: int, num: int) -> float:
    """Accuracy of a global model on partition ``pid``'s training data (the test measures forgetting centrally)."""
    model = make_model(dtype)
    load(model, record, dtype)
    (x, y), _ = partition(pid, num)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x).to(DTYPES[dtype])).float()
    return float((out.argmax(1).numpy() == y).mean())
