"""fed-unlearn in a Flower app: the strategy wrapper, the client helpers, an in-process Grid.

Server side::

    from flwr.serverapp.strategy import FedAvg
    from fed_unlearn.flower import Unlearning

    strategy = Unlearning(FedAvg(fraction_train=0.5), method="puf")
    strategy.request_unlearning(3, round=6)          # the node whose node-config partition-id is 3
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)

Client side: nothing for server-side methods such as PUF; ``add_identity(app)`` to be
named by a node-config key; ``add_unlearning(app, model_fn=..., data_fn=...)`` (torch) or
``add_unlearning(app, data_fn=..., predict_fn=...)`` (any framework) for calibration, the
methods with a client routine and sample or class deletion. The wire protocol is
:mod:`fed_unlearn.protocol`.

This subpackage is the only part of ``fed_unlearn`` that imports Flower.
"""

from __future__ import annotations

from .client import add_identity, add_unlearning, architecture_mismatch, as_dataset, default_train, train_settings
from .grid import ActiveNodesGrid, InProcessGrid, PromptGrid, prompt
from .records import metric_dict, to_record, to_weights, torch_record, torch_state
from .reproducible import ReproducibleFedAvg
from .requests import SetupError, UnlearningRequest
from .rounds import FederationRun, NoValidRepliesError, run_rounds
from .strategy import Unlearning, UnlearningFedAvg

__all__ = [
    "ActiveNodesGrid",
    "FederationRun",
    "InProcessGrid",
    "PromptGrid",
    "NoValidRepliesError",
    "ReproducibleFedAvg",
    "SetupError",
    "Unlearning",
    "UnlearningFedAvg",
    "UnlearningRequest",
    "add_identity",
    "add_unlearning",
    "architecture_mismatch",
    "as_dataset",
    "default_train",
    "metric_dict",
    "prompt",
    "run_rounds",
    "to_record",
    "to_weights",
    "torch_record",
    "torch_state",
    "train_settings",
]
