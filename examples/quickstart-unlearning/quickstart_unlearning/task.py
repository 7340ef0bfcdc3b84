"""Model, data and training: as in any Flower quickstart (nothing here knows about unlearning)."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def Net() -> nn.Module:  # noqa: N802  (a model factory, named like a class as in Flower's templates)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def load_data(partition_id: int, num_partitions: int) -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    part = np.array_split(np.random.default_rng(0).permutation(len(y)), num_partitions)[partition_id]
    cut = int(0.8 * len(part))
    train, test = TensorDataset(x[part[:cut]], y[part[:cut]]), TensorDataset(x[part[cut:]], y[part[cut:]])
    return DataLoader(train, batch_size=32, shuffle=True), DataLoader(test, batch_size=128)


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    x, y = next(iter(DataLoader(loader.dataset, batch_size=len(loader.dataset))))
    out = net(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
