"""The same ClientApp plus fed-unlearn's client helpers in one call (methods with a client routine, sample deletion)."""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp

from fed_unlearn.flower import add_unlearning

from . import client_app as own
from .task import Net, load_data

app = ClientApp()
app.train()(own.train)
app.evaluate()(own.evaluate)


def data(context: Context):
    return load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))


add_unlearning(app, model_fn=lambda context: Net(), data_fn=data)
