"""Small models sized for CPU federations, chosen by name.

``mlp``        two hidden ReLU layers over the flattened input (images or tabular rows).
``cnn``        two 3x3 conv + max-pool blocks and two linear layers (LeNet-like); for images.
``linear``     multinomial logistic regression (one affine layer).
``resnet-bn``  a small ResNet (three stages of one basic block) with BatchNorm, as most image
               federations train; its running statistics and int64 counters travel with it.
``resnet-gn``  the same with GroupNorm (no running statistics: the PUF authors' choice).
``lora-vit``   a small vision transformer, frozen and built from a config (no weights
               downloaded), with LoRA adapters on its attention in bfloat16: only the adapters
               and the classifier head travel (the FlowerTune pattern). Needs the ``lora``
               extra (``pip install fed-unlearn[lora]``: ``transformers`` and ``peft``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a normalisation each and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for images: a stem, three stages of one basic block (widths w, 2w, 4w), global pooling.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    norm : {"batch", "group"}
        BatchNorm (running statistics and an int64 counter in the state dict) or GroupNorm.
    width : int
        Channels of the first stage.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, norm: str = "batch", width: int = 16) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"resnet needs (C, H, W) input, got {input_shape}")
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

        def make_norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(8, c // 4), c)

        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False), make_norm(width), nn.ReLU()
        )
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1, make_norm),
            BasicBlock(width, 2 * width, 2, make_norm),
            BasicBlock(2 * width, 4 * width, 2, make_norm),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class LoRAViT(nn.Module):
    """A frozen vision transformer with bfloat16 LoRA adapters; its state dict is the adapters and the head only.

    The base model is built from a ``transformers`` ViT config with the seed's initial
    weights (every client builds the same one: nothing is downloaded and the base never
    travels); ``peft`` adds rank-``rank`` adapters to the attention's query and value
    projections and trains the classifier head. ``state_dict`` / ``load_state_dict`` see
    only what ``peft`` saves (``get_peft_model_state_dict``), so the ArrayRecord a client
    sends is the adapters, as in Flower's FlowerTune examples.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, rank: int = 4, dtype: str = "bfloat16") -> None:
        super().__init__()
        try:
            from peft import LoraConfig, get_peft_model
            from transformers import ViTConfig, ViTForImageClassification
        except ImportError as exc:
            raise ValueError(
                "model 'lora-vit' needs the lora extra: pip install 'fed-unlearn[lora]' (transformers, peft)"
            ) from exc
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ValueError(f"lora-vit needs square (C, H, W) input, got {input_shape}")
        size = int(input_shape[1])
        patch = next(p for p in (4, 2, 1) if size % p == 0 and size // p <= 16)
        config = ViTConfig(
            image_size=size,
            patch_size=patch,
            num_channels=int(input_shape[0]),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
        config.num_labels = num_classes
        lora = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
        )
        self.dtype = getattr(torch, dtype)
        self.peft = get_peft_model(ViTForImageClassification(config), lora).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.peft(pixel_values=x.to(self.dtype)).logits

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The adapters and the head (what travels), not the frozen base."""
        from peft import get_peft_model_state_dict

        return OrderedDict(get_peft_model_state_dict(self.peft))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load the adapters and the head; with ``strict`` every one of them must be given, nothing else."""
        from peft import set_peft_model_state_dict

        own = self.state_dict()
        if strict and set(state_dict) != set(own):
            missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            raise RuntimeError(f"lora-vit adapters do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        return set_peft_model_state_dict(self.peft, {k: v.to(self.dtype) for k, v in state_dict.items()})


MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "linear": LogisticRegression,
    "resnet-bn": lambda shape, classes: ResNet(shape, classes, norm="batch"),
    "resnet-gn": lambda shape, classes: ResNet(shape, classes, norm="group"),
    "lora-vit": LoRAViT,
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
    """Copy a model's state dict into numpy arrays (their dtypes; bfloat16, which numpy lacks, as float32)."""
    return OrderedDict(
        (k, (v.detach().cpu().float() if v.dtype == torch.bfloat16 else v.detach().cpu()).numpy().copy())
        for k, v in model.state_dict().items()
    )


def set_weights(model: nn.Module, weights: OrderedDict[str, np.ndarray] | dict[str, np.ndarray]) -> None:
    """Load numpy arrays into a model; names and shapes must match exactly."""
    state = model.state_dict()
    if set(weights) != set(state):
        missing, extra = set(state) - set(weights), set(weights) - set(state)
        raise ValueError(f"weights do not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"weights '{k}' has shape {tuple(v.shape)}, model expects {tuple(state[k].shape)}")
    model.load_state_dict(OrderedDict((k, _tensor(v)) for k, v in weights.items()))


def _tensor(value: np.ndarray) -> torch.Tensor:
    """A tensor of ``value`` for ``load_state_dict`` (which copies): shared when writable, else copied once."""
    arr = np.asarray(value)
    return torch.as_tensor(arr if arr.flags.writeable else arr.copy())
