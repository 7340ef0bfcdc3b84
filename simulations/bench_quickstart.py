"""How far the unlearning step goes on Flower's own quickstart apps, with no client help.

Flower's ``quickstart-pytorch``, ``quickstart-sklearn`` and ``quickstart-numpy`` examples,
read from a Flower checkout (or bare git directory) into a temporary directory (never into
this repository), with their data swapped for offline data and nothing else changed; PUF
added in five lines (the strategy wrapped, one request, ``add_identity``). Each app runs four
federations per seed on the in-process grid: the gold (the departing client never takes
part), the federation that never unlearns, PUF's reference step (``calibrate=False``) and the
default (the step bounded by the remaining clients' own evaluation).

* quickstart-pytorch: Fashion-MNIST (padded to 3x32x32 for the example's Net), 10 clients of
  600 samples, 5 local epochs, lr 0.05; client 0 leaves in round 6 of 10. Printed: client
  0's forget loss at the end as a share of the gap between the federation that never
  unlearned (0 %) and the gold (100 %), and the remaining clients' test accuracy.
* quickstart-sklearn: iris from scikit-learn; client 0 of 5 leaves in round 10 of 25.
* quickstart-numpy: its training adds noise and its evaluation reports no loss.

For these two, the final model's distance to the same seed's gold is printed, beside a
federation where client 0 simply stopped contributing (``fine-tune``).

    python -m simulations.bench_quickstart --flower /path/to/flower [--seeds 3] [--apps pytorch,sklearn,numpy]

Needs Debian's ``dataset-fashion-mnist`` for the pytorch app. Prints one line per app and
variant.
"""

from __future__ import annotations

import argparse
import importlib
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES = ("quickstart-pytorch", "quickstart-sklearn", "quickstart-numpy")


def extract(flower: Path, dest: Path) -> None:
    """Flower's three quickstart examples into ``dest`` (from a checkout, or ``git archive`` of a bare directory)."""
    for name in EXAMPLES:
        src = flower / "examples" / name
        target = dest / name
        if src.is_dir():
            subprocess.run(["cp", "-r", str(src), str(target)], check=True)
            continue
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "--git-dir", str(flower), "archive", "HEAD", f"examples/{name}"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(target), "--strip-components=2"], input=archive.stdout, check=True)


def federation(app: Any, nodes: int, initial: Any, kind: str, seed: int, rounds: int, depart: int, **start: Any) -> Any:
    """One run: ``gold``, ``kept`` (never unlearns), ``stopped``, ``reference`` (PUF's fixed step) or ``default``."""
    from flwr.serverapp.strategy import FedAvg

    from fed_unlearn.flower import InProcessGrid, Unlearning

    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
    grid = InProcessGrid(app, nodes, start.pop("run_config"))
    strategy: Any = FedAvg(fraction_train=1.0, fraction_evaluate=start.pop("fraction_evaluate", 1.0))
    if kind == "gold":
        strategy = Unlearning(strategy, None)
        strategy.identify(grid, grid.get_node_ids())
        strategy.leave_out(*(n for n, i in strategy.identities.items() if int(i["partition-id"]) == 0))
    elif kind in ("reference", "default", "stopped"):
        method = "fine-tune" if kind == "stopped" else "puf"  # stopped: the client simply stops contributing
        strategy = Unlearning(strategy, method=method, calibrate=kind == "default")
        strategy.request_unlearning(0, round=depart)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, **start)
    return result, strategy


def pytorch(folder: Path, seeds: list[int]) -> None:
    """quickstart-pytorch on Fashion-MNIST (module docstring)."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from torch.utils.data import DataLoader, Dataset

    from fed_unlearn.data.datasets import load_fashion_mnist
    from fed_unlearn.flower import add_identity

    sys.path.insert(0, str(folder / "quickstart-pytorch"))
    task = importlib.import_module("pytorchexample.task")
    client = importlib.import_module("pytorchexample.client_app")
    ds = load_fashion_mnist()
    x = np.pad(ds.x.reshape(-1, 1, 28, 28), ((0, 0), (0, 0), (2, 2), (2, 2)))
    x = ((np.repeat(x, 3, axis=1) - 0.5) / 0.5).astype(np.float32)  # the example's 3x32x32, normalised as it does
    y = ds.y.astype(np.int64)
    nodes, rounds, depart, samples = 10, 10, 6, 6000
    perm = np.random.default_rng(42).permutation(len(y))[:samples]

    class Items(Dataset):
        def __init__(self, idx: np.ndarray) -> None:
            self.idx = idx

        def __len__(self) -> int:
            return len(self.idx)

        def __getitem__(self, i: int) -> dict[str, Any]:
            j = self.idx[i]
            return {"img": torch.from_numpy(x[j]), "label": int(y[j])}

    def load_data(partition_id: int, num_partitions: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
        idx = np.array_split(perm, num_partitions)[partition_id]
        cut = int(0.8 * len(idx))
        train = DataLoader(Items(idx[:cut]), batch_size=batch_size, shuffle=True)
        return train, DataLoader(Items(idx[cut:]), batch_size=batch_size)

    task.load_data = load_data  # type: ignore[attr-defined]  # a module loaded from the checkout
    client.load_data = load_data  # type: ignore[attr-defined]  # a module loaded from the checkout
    add_identity(client.app)
    lr = 0.05
    rc = {"num-server-rounds": rounds, "local-epochs": 5, "learning-rate": lr, "batch-size": 32}

    def measure(arrays: ArrayRecord) -> tuple[float, float]:
        net = task.Net()
        net.load_state_dict(arrays.to_torch_state_dict())
        forget = task.test(net, load_data(0, nodes, 256)[0], "cpu")[0]
        acc = float(np.mean([task.test(net, load_data(p, nodes, 256)[1], "cpu")[1] for p in range(1, nodes)]))
        return forget, acc

    print(
        f"quickstart-pytorch, Fashion-MNIST, {nodes} clients of {samples // nodes}, client 0 leaves in round {depart}"
    )
    for seed in seeds:
        torch.manual_seed(seed)
        initial = ArrayRecord(task.Net().state_dict())
        out, scales = {}, {}
        for kind in ("gold", "kept", "reference", "default"):
            result, strategy = federation(
                client.app, nodes, initial, kind, seed, rounds, depart,
                run_config=rc, fraction_evaluate=0.5, train_config=ConfigRecord({"lr": lr}),
            )  # fmt: skip
            out[kind] = measure(result.arrays)
            cal = (getattr(strategy, "unlearning_report", None) or {}).get("calibration", {})
            scales[kind] = cal.get("scale")
        gap = out["gold"][0] - out["kept"][0]
        for kind in ("reference", "default"):
            share = 100 * (out[kind][0] - out["kept"][0]) / gap
            scale = "" if scales[kind] is None else f", scale {scales[kind]:.3f}"
            print(
                f"  seed {seed} {kind:9s}: forget loss at {share:5.0f} % of the gap{scale}; test accuracy "
                f"{out[kind][1]:.3f} (gold {out['gold'][1]:.3f}, never unlearned {out['kept'][1]:.3f})"
            )


def sklearn(folder: Path, seeds: list[int]) -> None:
    """quickstart-sklearn on scikit-learn's iris (module docstring)."""
    from flwr.app import ArrayRecord
    from sklearn.datasets import load_iris

    from fed_unlearn.flower import add_identity

    sys.path.insert(0, str(folder / "quickstart-sklearn"))
    task = importlib.import_module("sklearnexample.task")
    client = importlib.import_module("sklearnexample.client_app")
    iris = load_iris()
    perm = np.random.default_rng(0).permutation(len(iris.target))

    def load_data(partition_id: int, num_partitions: int) -> tuple[np.ndarray, ...]:
        idx = np.array_split(perm, num_partitions)[partition_id]
        features, labels = iris.data[idx][:, [2, 3, 0, 1]], iris.target[idx]  # the example's feature order
        cut = int(0.8 * len(idx))
        return features[:cut], labels[:cut], features[cut:], labels[cut:]

    task.load_data = load_data  # type: ignore[attr-defined]  # a module loaded from the checkout
    client.load_data = load_data  # type: ignore[attr-defined]  # a module loaded from the checkout
    add_identity(client.app)
    initial = ArrayRecord(task.get_model_params(task.create_log_reg_and_instantiate_parameters("l2")))
    print(
        "quickstart-sklearn, iris, 5 clients, client 0 leaves in round 10 of 25: the final model's distance to the gold"
    )
    spread(client.app, 5, initial, seeds, 25, 10, {"penalty": "l2"})


def spread(app: Any, nodes: int, initial: Any, seeds: list[int], rounds: int, depart: int, rc: dict[str, Any]) -> None:
    """Per variant, the final model's L2 distance to the same seed's gold, mean +- std over seeds."""
    finals: dict[str, list[np.ndarray]] = {}
    for kind in ("gold", "kept", "stopped", "reference", "default"):
        for seed in seeds:
            result, _ = federation(app, nodes, initial, kind, seed, rounds, depart, run_config=rc)
            flat = np.concatenate([a.ravel() for a in result.arrays.to_numpy_ndarrays()])
            finals.setdefault(kind, []).append(flat)
    for kind in ("kept", "stopped", "reference", "default"):
        dist = [float(np.linalg.norm(w - g)) for w, g in zip(finals[kind], finals["gold"], strict=True)]
        print(f"  {kind:9s}: {np.mean(dist):.3f} +- {np.std(dist):.3f}")


def numpy_app(folder: Path, seeds: list[int]) -> None:
    """quickstart-numpy (module docstring)."""
    from flwr.app import ArrayRecord

    from fed_unlearn.flower import add_identity

    sys.path.insert(0, str(folder / "quickstart-numpy"))
    client = importlib.import_module("quickstart_numpy.client_app")
    add_identity(client.app)
    print("quickstart-numpy, 5 clients, client 0 leaves in round 4 of 6: final distance to the gold")
    spread(client.app, 5, ArrayRecord([np.ones((1, 1))]), seeds, 6, 4, {})


APPS: dict[str, Callable[[Path, list[int]], None]] = {"pytorch": pytorch, "sklearn": sklearn, "numpy": numpy_app}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen apps; print their lines."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flower", type=Path, required=True, help="a Flower checkout or bare git directory")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--apps", default="pytorch,sklearn,numpy")
    args = ap.parse_args(argv)
    from logging import WARNING

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        extract(args.flower, Path(tmp))
        for name in args.apps.split(","):
            APPS[name.strip()](Path(tmp), list(range(args.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
