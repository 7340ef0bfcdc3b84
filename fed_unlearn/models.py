"""Small models sized for CPU federations, chosen by name.

``mlp``   two hidden ReLU layers over the flattened input (images or tabular rows).
``cnn``   two 3x3 conv + max-pool blocks and two linear layers (LeNet-like); for images.
``linear`` multinomial logistic regression (one affine layer).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one example (flattened internally).
    num_classes : int
        Number of output logits.
    hidden : tuple of int
        Hidden layer widths.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (200, 100)) -> None:
        super().__init__()
        dims = [int(np.prod(input_shape)), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks (16, 32 channels) and a 64-unit hidden layer.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``; ``H`` and ``W`` must be divisible by 4.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[1] % 4 or input_shape[2] % 4:
            raise ValueError(f"cnn needs (C, H, W) input with H, W divisible by 4, got {input_shape}")
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(self.features(x))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on the flattened input: one affine layer (a convex model).

    The setting in which ascent-based unlearning can provably end further from the
    retrained model than the original (Ascent Fails to Forget).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "linear": LogisticRegression,
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build a freshly initialised model, deterministically from ``seed``.

    Raises
    ------
    ValueError
        If ``name`` is unknown; the message lists the valid names.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {', '.join(sorted(MODELS))}")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return MODELS[name](tuple(input_shape), num_classes)
    finally:
        torch.random.set_rng_state(gen_state)


def get_weights(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Copy a model's state dict into numpy arrays (float32, contiguous)."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


def set_weights(model: nn.Module, weights: OrderedDict[str, np.ndarray] | dict[str, np.ndarray]) -> None:
    """Load numpy arrays into a model; names and shapes must match exactly."""
    state = model.state_dict()
    if set(weights) != set(state):
        missing, extra = set(state) - set(weights), set(weights) - set(state)
        raise ValueError(f"weights do not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"weights '{k}' has shape {tuple(v.shape)}, model expects {tuple(state[k].shape)}")
    model.load_state_dict(OrderedDict((k, torch.as_tensor(np.asarray(v))) for k, v in weights.items()))
