"""Offline datasets, the IDX reader and federated partitioning."""

from .datasets import (
    DATASETS,
    ArrayDataset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist_5k,
    load_site_file,
    load_uci_adult,
)
from .idx import parse_idx, read_idx
from .partition import PARTITIONERS, client_datasets, partition_indices, train_holdout_split

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ArrayDataset",
    "client_datasets",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist_5k",
    "load_site_file",
    "load_uci_adult",
    "parse_idx",
    "partition_indices",
    "read_idx",
    "train_holdout_split",
]
