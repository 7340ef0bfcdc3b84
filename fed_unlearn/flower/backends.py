"""What the client helpers need of a model, for torch and for any other framework.

The helpers (:func:`fed_unlearn.flower.add_unlearning`) load the model a message carries,
predict with it, change its arrays (calibration's candidates) and, for some messages,
train it. :class:`TorchBackend` does that for a ``torch.nn.Module`` from ``model_fn``;
:class:`ArrayBackend` for any framework, from two functions on named numpy arrays (the
arrays the ClientApp already puts in its ArrayRecord):

* ``predict_fn(arrays, x) -> logits``: per-class scores whose softmax is the model's
  predictive distribution (logits, or log-probabilities such as
  ``np.log(clf.predict_proba(x))``);
* ``fit_fn(arrays, x, y, instruction, context) -> (arrays, metrics)`` (optional): local
  training, for the messages that train (retained data after a deletion, the strong
  audit's reference models, PUF on a forget set).

A scikit-learn logistic regression, for example::

    def predict_fn(arrays, x):
        return x @ arrays["coef"].T + arrays["intercept"]

    add_unlearning(app, data_fn=load_data, predict_fn=predict_fn)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context

from ..data import ArrayDataset
from .records import to_record, to_weights, torch_record, torch_state, wire_dtypes

#: ``predict_fn(arrays, x) -> logits`` of a framework-neutral model.
PredictFn = Callable[[Mapping[str, np.ndarray], np.ndarray], Any]
#: ``fit_fn(arrays, x, y, instruction, context) -> (arrays, metrics)``: local training of a framework-neutral model.
FitFn = Callable[[Mapping[str, np.ndarray], np.ndarray, np.ndarray, Mapping[str, Any], Context], tuple[Any, Any]]


class ArrayModel:
    """A framework-neutral model: its named arrays and ``predict_fn``; calling it on ``x`` gives logits."""

    def __init__(self, arrays: dict[str, np.ndarray], wire: Mapping[str, str], predict_fn: PredictFn) -> None:
        self.arrays = arrays
        self.wire = dict(wire)
        self.predict_fn = predict_fn

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits on ``x`` (float64, one row per sample)."""
        out = np.asarray(self.predict_fn(self.arrays, x), dtype=np.float64)
        if out.ndim != 2 or len(out) != len(x):
            raise ValueError(f"predict_fn must return one row of class scores per sample, got shape {out.shape}")
        return out


class TorchBackend:
    """The helpers' model operations on a torch model built by ``model_fn(context)``."""

    torch = True

    def __init__(self, model_fn: Callable[[Context], Any], train_fn: Callable[..., Mapping[str, Any]]) -> None:
        self.model_fn, self.train_fn = model_fn, train_fn

    @property
    def can_fit(self) -> bool:  # noqa: D102
        return True

    def fresh(self, context: Context) -> Any:
        """A new model of the client's architecture."""
        return self.model_fn(context)

    def load(self, record: ArrayRecord, context: Context) -> Any:
        """A model holding ``record``'s arrays (bfloat16 included)."""
        model = self.model_fn(context)
        model.load_state_dict(torch_state(record))
        return model

    def record(self, model: Any) -> ArrayRecord:
        """The model's arrays as an ArrayRecord."""
        return torch_record(model.state_dict())

    def arrays(self, model: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """A copy of the model's arrays (bfloat16 as float32) and their wire dtypes."""
        rec = self.record(model)
        return to_weights(rec), wire_dtypes(rec)

    def set_arrays(self, model: Any, arrays: Mapping[str, np.ndarray], wire: Mapping[str, str]) -> None:
        """Load ``arrays`` (cast to ``wire`` dtypes) into ``model``."""
        model.load_state_dict(torch_state(to_record(arrays, wire)))

    def fit(self, model: Any, data: ArrayDataset, instruction: Mapping[str, Any], context: Context) -> dict[str, Any]:
        """Train ``model`` in place on ``data``; its metrics."""
        return dict(self.train_fn(model, data, instruction, context))

    def num_classes(self, model: Any, x: np.ndarray) -> int:
        """Output width of ``model`` on one sample."""
        import torch

        with torch.no_grad():
            model.eval()
            return int(model(torch.from_numpy(np.ascontiguousarray(x[:1]))).shape[1])


class ArrayBackend:
    """The helpers' model operations on named numpy arrays (any framework; module docstring)."""

    torch = False

    def __init__(self, predict_fn: PredictFn, fit_fn: FitFn | None = None) -> None:
        self.predict_fn, self.fit_fn = predict_fn, fit_fn

    @property
    def can_fit(self) -> bool:  # noqa: D102
        return self.fit_fn is not None

    def fresh(self, context: Context) -> Any:  # noqa: D102
        return None

    def load(self, record: ArrayRecord, context: Context) -> ArrayModel:  # noqa: D102
        return ArrayModel(to_weights(record), wire_dtypes(record), self.predict_fn)

    def record(self, model: ArrayModel) -> ArrayRecord:  # noqa: D102
        return to_record(model.arrays, model.wire)

    def arrays(self, model: ArrayModel) -> tuple[dict[str, np.ndarray], dict[str, str]]:  # noqa: D102
        return {k: np.array(v, copy=True) for k, v in model.arrays.items()}, dict(model.wire)

    def set_arrays(self, model: ArrayModel, arrays: Mapping[str, np.ndarray], wire: Mapping[str, str]) -> None:  # noqa: D102
        model.arrays = {k: np.asarray(v) for k, v in arrays.items()}

    def fit(
        self, model: ArrayModel, data: ArrayDataset, instruction: Mapping[str, Any], context: Context
    ) -> dict[str, Any]:
        """``fit_fn`` on ``data``; the model takes the arrays it returns."""
        if self.fit_fn is None:
            raise ValueError("this message trains the model: pass fit_fn= to add_unlearning")
        arrays, metrics = self.fit_fn(model.arrays, data.x, data.y, instruction, context)
        model.arrays = {k: np.asarray(v) for k, v in dict(arrays).items()}
        return dict(metrics or {})

    def num_classes(self, model: ArrayModel | None, x: np.ndarray) -> int:  # noqa: D102
        if model is None:
            raise ValueError("no model to measure")
        return int(model(x[:1]).shape[1])
