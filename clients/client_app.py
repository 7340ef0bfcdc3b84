"""fed-unlearn ClientApp: the task's model and data, with the library's client helpers.

The app is built the way a Flower user adds fed-unlearn to their own ClientApp:
:func:`fed_unlearn.flower.add_unlearning` with a model factory and a data loader, here
both from the run config's task module (:mod:`fed_unlearn.task`: by default the project's
``mlp``/``cnn`` on the built-in ``dataset``). ``default_handlers=True`` also registers
``train`` (local SGD, :func:`fed_unlearn.flower.default_train`) and ``evaluate`` (the
per-part measurements), which a user's app has of its own. Every message type it answers
is documented in :mod:`fed_unlearn.protocol`.

The node config gives ``partition-id`` and ``num-partitions`` (set by the simulation
engine, or by ``--node-config`` on a deployed SuperNode). A deployed node may name its
own data file (``data-file``), its ``site`` and its ``erasure-inbox``.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp

from fed_unlearn.flower import add_unlearning, as_dataset
from fed_unlearn.task import BUILTIN, Task, load_task

app = ClientApp()


def node_identity(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config.

    Raises
    ------
    ValueError
        If either is missing, naming the key.
    """
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(f"node config needs 'partition-id' and 'num-partitions' (missing {exc})") from None


def _task(context: Context) -> Task:
    return load_task(str(context.run_config.get("task", BUILTIN)))


def data_fn(context: Context) -> tuple[Any, Any]:
    """This node's (train, held-out) data: its partition, or the site's own ``data-file``."""
    torch.set_num_threads(int(context.run_config.get("client-threads", 1)))
    pid, num = node_identity(context)
    task = _task(context)
    if "data-file" in context.node_config:
        return task.site_data(str(context.node_config["data-file"]), context.run_config, pid)
    return task.data(pid, num, context.run_config)


def model_fn(context: Context) -> torch.nn.Module:
    """A fresh model of the task (the built-in task sizes it from this node's data)."""
    task = _task(context)
    if task.builtin:
        train = as_dataset(data_fn(context)[0], "train data")
        return task.model(context.run_config, train.input_shape, train.num_classes)
    return task.model(context.run_config)


add_unlearning(app, model_fn=model_fn, data_fn=data_fn, default_handlers=True)
