"""A user's scikit-learn Flower app (Flower's quickstart-sklearn pattern) on the 8x8 digits, and a numpy one.

``app``: logistic regression, trained with ``warm_start`` from the received arrays; its
evaluate handler reports ``test_logloss`` and ``accuracy``. ``calibrating_app``: the same,
plus fed-unlearn's helpers registered with a framework-neutral ``predict_fn`` (no torch
code). ``numpy_app``: Flower's quickstart-numpy toy (training adds noise), whose
evaluation reports no loss at all.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

CLASSES = list(range(10))


@lru_cache(maxsize=1)
def _digits() -> Any:
    """scikit-learn's digits, read once per process (as Flower's quickstarts keep their dataset)."""
    return load_digits()


def partition(pid: int, num: int, seed: int = 0):
    d = _digits()
    x, y = (d.data / 16.0).astype(np.float64), d.target.astype(np.int64)
    idx = np.array_split(np.random.default_rng(seed).permutation(len(y)), num)[pid]
    cut = int(0.8 * len(idx))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


def model(arrays: ArrayRecord | None = None, seed: int = 0) -> LogisticRegression:
    m = LogisticRegression(max_iter=1, warm_start=True, solver="saga", random_state=seed)
    m.classes_ = np.array(CLASSES)
    m.coef_, m.intercept_ = np.zeros((10, 64)), np.zeros(10)
    if arrays is not None:
        m.coef_, m.intercept_ = arrays["coef"].numpy(), arrays["intercept"].numpy()
    return m


def params(m: LogisticRegression) -> ArrayRecord:
    return ArrayRecord({"coef": Array(np.asarray(m.coef_)), "intercept": Array(np.asarray(m.intercept_))})


def _setup(msg: Message, context: Context):
    seed = int(context.run_config.get("seed", 0))
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    return model(msg.content["arrays"], seed), partition(pid, num, seed)


def train(msg: Message, context: Context) -> Message:
    m, ((x, y), _) = _setup(msg, context)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one saga epoch does not converge, as in Flower's example
        m.fit(x, y)
    metrics = MetricRecord({"num-examples": len(y), "train_logloss": log_loss(y, m.predict_proba(x), labels=CLASSES)})
    return Message(RecordDict({"arrays": params(m), "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    m, (_, (x, y)) = _setup(msg, context)
    metrics = {"num-examples": len(y), "test_logloss": log_loss(y, m.predict_proba(x), labels=CLASSES)}
    metrics["accuracy"] = float(m.score(x, y))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def logits(arrays, x):
    """The framework-neutral model: logits of the logistic regression held in ``arrays``."""
    return x @ arrays["coef"].T + arrays["intercept"]


def data_fn(context: Context):
    seed = int(context.run_config.get("seed", 0))
    return partition(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]), seed)


def make_app(calibrating: bool) -> ClientApp:
    out = ClientApp()
    out.train()(train)
    out.evaluate()(evaluate)
    from fed_unlearn.flower import add_identity, add_unlearning

    if calibrating:
        add_unlearning(out, data_fn=data_fn, predict_fn=logits)
    else:
        add_identity(out)
    return out


app = make_app(False)
calibrating_app = make_app(True)

numpy_app = ClientApp()


@numpy_app.train()
def numpy_train(msg: Message, context: Context) -> Message:
    rng = np.random.default_rng([int(context.run_config.get("seed", 0)), int(msg.content["config"]["server-round"]),
                                 int(context.node_config["partition-id"])])  # fmt: skip
    model_arrays = [m + rng.random(m.shape) for m in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"random_metric": float(rng.random()), "num-examples": 1})
    return Message(RecordDict({"arrays": ArrayRecord(model_arrays), "metrics": metrics}), reply_to=msg)


@numpy_app.evaluate()
def numpy_evaluate(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"random_metric": [0.1, 0.2, 0.3], "num-examples": 1})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _numpy_identity() -> None:
    from fed_unlearn.flower import add_identity

    add_identity(numpy_app)


_numpy_identity()
