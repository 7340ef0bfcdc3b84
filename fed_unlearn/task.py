"""Task modules: the model and the data of a federation, named in the run config (``task``).

A task module is a plain Python module, as in Flower's app templates::

    # mypkg/task.py
    def load_model(run_config):            # or a class `Net()` taking no arguments
        return Net()

    def load_data(partition_id, num_partitions, run_config):   # run_config is optional
        ...
        return train, held_out             # arrays (x, y), a torch Dataset or a DataLoader each

    def load_site_data(path, run_config):  # optional: a deployed site's own data file
        ...
        return train, held_out

``flwr run . --run-config "task='mypkg.task'"`` then runs the experiment, the harness and
the erasure service on that model and data (the module must be importable by the
ServerApp and ClientApp processes). The default task, this module's own functions, builds
the project's ``mlp`` / ``cnn`` models (run-config ``model``) on the built-in datasets
(``dataset``, ``data-dir``, ``partitioner``, ...), and reads a deployed site's ``.npz``
data file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .data import client_datasets, load_dataset, load_site_file, train_holdout_split
from .models import build_model

#: The default task: the project's models and datasets.
BUILTIN = "fed_unlearn.task"


class TaskError(ValueError):
    """A task module that cannot be used (missing function, import error)."""


# -- the built-in task -----------------------------------------------------------------------------
def load_model(
    run_config: Mapping[str, Any], input_shape: tuple[int, ...] | None = None, num_classes: int | None = None
) -> torch.nn.Module:
    """The project's model ``model`` (``mlp`` | ``cnn``) for the ``dataset``'s inputs, initialised from ``seed``.

    ``input_shape`` / ``num_classes`` default to those of the dataset.
    """
    if input_shape is None or num_classes is None:
        ds = load_dataset(str(run_config.get("dataset", "mnist-5k")), str(run_config.get("data-dir", "")))
        input_shape, num_classes = ds.input_shape, ds.num_classes
    return build_model(
        str(run_config.get("model", "mlp")), tuple(input_shape), int(num_classes), seed=int(run_config.get("seed", 0))
    )


def load_data(partition_id: int, num_partitions: int, run_config: Mapping[str, Any]) -> tuple[Any, Any]:
    """Partition ``partition_id`` of the built-in ``dataset``: (train, held-out)."""
    return client_datasets(
        str(run_config.get("dataset", "mnist-5k")),
        partition_id,
        num_partitions,
        data_dir=str(run_config.get("data-dir", "")),
        partitioner=str(run_config.get("partitioner", "iid")),
        alpha=float(run_config.get("dirichlet-alpha", 0.5)),
        holdout_fraction=float(run_config.get("holdout-fraction", 0.2)),
        seed=int(run_config.get("seed", 0)),
        unique_class=int(run_config.get("unique-class", 0)),
        label_noise=float(run_config.get("label-noise", 0.0)),
        noisy_clients=tuple(int(c) for c in str(run_config.get("label-noise-clients", "0")).split(",") if c.strip()),
    )


def load_site_data(path: str, run_config: Mapping[str, Any], partition_id: int = 0) -> tuple[Any, Any]:
    """A deployed site's own ``.npz`` file (``x``, ``y``, ``num_classes``), split into train and held-out."""
    ds = load_site_file(path)
    seed = int(run_config.get("seed", 0))
    train_idx, hold_idx = train_holdout_split(
        np.arange(len(ds)), float(run_config.get("holdout-fraction", 0.2)), seed * 1_000_003 + partition_id
    )
    return ds.subset(train_idx), ds.subset(hold_idx)


# -- loading any task --------------------------------------------------------------------------------
def _arity(fn: Callable[..., Any]) -> int:
    try:
        return len(
            [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        )
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True)
class Task:
    """A loaded task module (see the module docstring)."""

    name: str
    module: ModuleType

    @property
    def builtin(self) -> bool:
        """Whether this is the project's own task."""
        return self.name == BUILTIN

    def model(
        self, run_config: Mapping[str, Any], input_shape: tuple[int, ...] | None = None, num_classes: int | None = None
    ) -> torch.nn.Module:
        """A freshly initialised model (seeded by the run config's ``seed``)."""
        if self.builtin:
            return load_model(run_config, input_shape, num_classes)
        with torch.random.fork_rng():
            torch.manual_seed(int(run_config.get("seed", 0)))
            fn = getattr(self.module, "load_model", None)
            if fn is not None:
                model = fn(run_config) if _arity(fn) >= 1 else fn()
            else:
                model = self.module.Net()
        if not isinstance(model, torch.nn.Module):
            raise TaskError(f"task '{self.name}': the model must be a torch.nn.Module, got {type(model).__name__}")
        return model

    def data(self, partition_id: int, num_partitions: int, run_config: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(train, held_out)`` of one partition."""
        fn = self.module.load_data
        got = fn(partition_id, num_partitions, run_config) if _arity(fn) >= 3 else fn(partition_id, num_partitions)
        return _two(got, self.name)

    def site_data(self, path: str, run_config: Mapping[str, Any], partition_id: int = 0) -> tuple[Any, Any]:
        """``(train, held_out)`` of a deployed site's own data file."""
        fn = getattr(self.module, "load_site_data", None)
        if fn is None:
            return load_site_data(path, run_config, partition_id)
        return _two(fn(path, run_config) if _arity(fn) >= 2 else fn(path), self.name)

    def fingerprint(self, model: torch.nn.Module) -> str:
        """Task name + architecture (array names and shapes): part of every cache key."""
        arch = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        return hashlib.sha256(json.dumps([self.name, arch]).encode()).hexdigest()[:16]


def _two(got: Any, name: str) -> tuple[Any, Any]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise TaskError(f"task '{name}': load_data must return (train, held_out), got {type(got).__name__}")
    return got[0], got[1]


def load_task(name: str) -> Task:
    """Import the task module ``name`` and check it defines a model and ``load_data``.

    Raises
    ------
    TaskError
        If it cannot be imported or lacks ``load_model``/``Net`` or ``load_data``.
    """
    if not name or name == BUILTIN:
        return Task(BUILTIN, importlib.import_module(BUILTIN))
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001  (any import failure of user code is reported as one line)
        raise TaskError(f"task '{name}' cannot be imported: {type(exc).__name__}: {exc}") from None
    if not (callable(getattr(module, "load_model", None)) or callable(getattr(module, "Net", None))):
        raise TaskError(f"task '{name}' needs a load_model(run_config) function or a Net class")
    if not callable(getattr(module, "load_data", None)):
        raise TaskError(f"task '{name}' needs a load_data(partition_id, num_partitions) function")
    return Task(name, module)
