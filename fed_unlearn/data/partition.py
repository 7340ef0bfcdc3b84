"""Split a dataset across federated clients, and each client's share into train / held-out.

The partitions are the ones flwr-datasets' ``IidPartitioner`` and ``DirichletPartitioner``
(the ones Flower baselines use) give for the same seed. ``dirichlet`` runs flwr-datasets'
own partitioner on an in-memory ``datasets.Dataset`` holding only the labels and the
example indices; ``iid`` computes its contiguous shards (``Dataset.shard(contiguous=True)``,
i.e. ``np.array_split``) directly, sparing every client process the 2 s import of
flwr-datasets (a test checks both against flwr-datasets). Examples are shuffled with the
seed first: the packaged MNIST subset is sorted by label and ``IidPartitioner`` takes
contiguous shards.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .datasets import ArrayDataset, load_dataset

PARTITIONERS = ("iid", "dirichlet", "unique-class")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
    unique_class: int = 0,
) -> list[np.ndarray]:
    """Assign example indices to ``num_partitions`` disjoint clients.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels, shape ``(N,)``.
    num_partitions : int
        Number of clients, ``>= 1`` and ``<= N``.
    partitioner : {"iid", "dirichlet", "unique-class"}
        ``iid``: equal-size random shards. ``dirichlet``: per-class proportions drawn
        from Dirichlet(``alpha``) (Hsu et al. 2019); smaller ``alpha`` = more label skew.
        ``unique-class``: client 0 holds every example of class ``unique_class`` and an
        equal random share of the others; the other clients never see that class (what a
        model retrained without client 0 cannot know at all).
    alpha : float
        Dirichlet concentration, ``> 0``.
    seed : int
        Seed of the shuffle and of the Dirichlet draws.
    min_partition_size : int
        Dirichlet only: redraw until every client has at least this many examples.

    Returns
    -------
    list of np.ndarray
        Sorted index arrays, pairwise disjoint, covering ``range(N)``.
    """
    n = len(labels)
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner '{partitioner}'; valid: {', '.join(PARTITIONERS)}")
    if not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions must be in [1, {n}], got {num_partitions}")
    if partitioner == "dirichlet" and not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")

    if partitioner == "unique-class":
        perm = np.random.default_rng(seed).permutation(n)
        labels = np.asarray(labels)
        if not np.any(labels == unique_class):
            raise ValueError(f"unique-class {unique_class} has no example in the dataset")
        shards = np.array_split(perm[labels[perm] != unique_class], num_partitions)
        shards[0] = np.concatenate([shards[0], perm[labels[perm] == unique_class]])
        return [np.sort(s.astype(np.int64)) for s in shards]

    perm = np.random.default_rng(seed).permutation(n)
    if partitioner == "iid":  # IidPartitioner's contiguous shards of the shuffled examples
        return [np.sort(s.astype(np.int64)) for s in np.array_split(perm, num_partitions)]

    from datasets import Dataset  # heavy import, only where Dirichlet partitions are built
    from flwr_datasets.partitioner import DirichletPartitioner

    table = Dataset.from_dict({"label": np.asarray(labels)[perm].tolist(), "idx": perm.tolist()})
    part = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    part.dataset = table
    return [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_partitions)]


def train_holdout_split(indices: np.ndarray, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into a train part and a held-out part.

    The held-out part is the client's own test data: non-members for the
    membership-inference audit and the retained-utility query set.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout-fraction must be in (0, 1), got {holdout_fraction}")
    perm = np.random.default_rng(seed).permutation(indices)
    n_hold = max(1, int(round(holdout_fraction * len(indices))))
    if n_hold >= len(indices):
        raise ValueError(f"a client with {len(indices)} examples cannot hold out {n_hold}")
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """``y`` with ``round(fraction * len(y))`` labels, chosen at random, changed to another class (seeded)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label-noise must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 77]))
    out = np.array(y, copy=True)
    k = int(round(fraction * len(y)))
    if k == 0 or num_classes < 2:
        return out
    idx = rng.choice(len(y), size=k, replace=False)
    out[idx] = (out[idx] + rng.integers(1, num_classes, size=k)) % num_classes
    return out


@lru_cache(maxsize=8)
def _cached_partitions(
    name: str, data_dir: str, num_partitions: int, partitioner: str, alpha: float, seed: int, unique_class: int = 0
) -> tuple[np.ndarray, ...]:
    labels = load_dataset(name, data_dir).y
    return tuple(partition_indices(labels, num_partitions, partitioner, alpha, seed, unique_class=unique_class))


def client_datasets(
    name: str,
    partition_id: int,
    num_partitions: int,
    *,
    data_dir: str = "",
    partitioner: str = "iid",
    alpha: float = 0.5,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    unique_class: int = 0,
    label_noise: float = 0.0,
    noisy_clients: tuple[int, ...] = (0,),
) -> tuple[ArrayDataset, ArrayDataset]:
    """Return the (train, held-out) data of one client.

    ``label_noise``: on the clients in ``noisy_clients``, that share of the labels is changed
    to another class, in the train and the held-out split alike (the held-out split is the
    client's own data, labelled the same way): mislabeled samples only that client holds, which
    a model can memorise and a model retrained without the client cannot predict.
    Deterministic in its arguments; partitions are computed once per process.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    ds = load_dataset(name, data_dir)
    parts = _cached_partitions(name, data_dir, num_partitions, partitioner, float(alpha), seed, int(unique_class))
    train_idx, hold_idx = train_holdout_split(parts[partition_id], holdout_fraction, seed * 1_000_003 + partition_id)
    train, held = ds.subset(train_idx), ds.subset(hold_idx)
    if label_noise > 0 and partition_id in noisy_clients:
        # each split its exact share, from seeds of its own
        train, held = (
            ArrayDataset(d.x, flip_labels(d.y, label_noise, ds.num_classes, s), d.num_classes, d.name)
            for d, s in ((train, seed * 1_000_003 + partition_id), (held, seed * 1_000_003 + partition_id + 500_009))
        )
    return train, held
