"""The user's task: their own small CNN on scikit-learn's 8x8 digits, split their own way."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset


@lru_cache(maxsize=1)
def _digits() -> Any:
    """scikit-learn's digits, read once per process (as Flower's quickstarts keep their dataset)."""
    return load_digits()


class Net(nn.Module):
    """A small CNN (not one of fed-unlearn's models)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


class Digits(Dataset):
    """Items as dicts, as Flower's quickstart datasets yield them."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"img": self.x[i], "label": self.y[i]}


def load_data(partition_id: int, num_partitions: int) -> tuple[DataLoader, DataLoader]:
    """This partition's train and test loaders (a fixed shuffle, contiguous shards, 80/20)."""
    d = _digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.array_split(np.random.default_rng(42).permutation(len(y)), num_partitions)[partition_id]
    cut = int(0.8 * len(idx))
    gen = torch.Generator().manual_seed(partition_id)
    return (
        DataLoader(Digits(x[idx[:cut]], y[idx[:cut]]), batch_size=32, shuffle=True, generator=gen),
        DataLoader(Digits(x[idx[cut:]], y[idx[cut:]]), batch_size=128),
    )


def train(net: Net, loader: DataLoader, epochs: int, lr: float, proximal_mu: float = 0.0) -> float:
    """SGD; FedProx's proximal term when the server sends ``proximal-mu``. Returns the mean loss."""
    start = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, n = 0.0, 0
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(batch["img"]), batch["label"])
            if proximal_mu > 0:
                prox = sum(((p - s) ** 2).sum() for p, s in zip(net.parameters(), start, strict=True))
                loss = loss + proximal_mu / 2 * prox
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(batch["label"]), n + len(batch["label"])
    return total / n


@torch.no_grad()
def test(net: Net, loader: DataLoader) -> tuple[float, float]:
    """Mean loss and accuracy."""
    net.eval()
    loss, correct, n = 0.0, 0, 0
    for batch in loader:
        out = net(batch["img"])
        loss += float(nn.functional.cross_entropy(out, batch["label"], reduction="sum"))
        correct += int((out.argmax(1) == batch["label"]).sum())
        n += len(batch["label"])
    return loss / n, correct / n
