"""Dataset loaders, the IDX reader and the partitioners (pure, no Flower runtime)."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fed_unlearn.data import (
    client_datasets,
    load_dataset,
    load_fashion_mnist,
    load_mnist_5k,
    load_uci_adult,
    parse_idx,
    partition_indices,
    read_idx,
    train_holdout_split,
)
from fed_unlearn.data.datasets import _load_torchvision

TIER = "unit"  # see tests/conftest.py

SHARED_ADULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "uci-adult"


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_idx_roundtrip_uint8_and_int32():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(a)), a)
    b = np.array([-5, 70000, 3], dtype=np.int32)
    np.testing.assert_array_equal(parse_idx(idx_bytes(b)), b)


@pytest.mark.parametrize(
    "buf, msg",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "type code"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x00", "payload"),
    ],
)
def test_idx_rejects_corrupt_files(buf, msg):
    with pytest.raises(ValueError, match=msg):
        parse_idx(buf)


def write_fake_fashion(root: Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))  # plain, not gzipped


def test_fashion_mnist_reader_on_small_files(tmp_path):
    write_fake_fashion(tmp_path, 30, 10)
    ds = load_fashion_mnist(tmp_path)
    assert ds.x.shape == (40, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    np.testing.assert_array_equal(ds.y[:12], np.r_[np.arange(10), 0, 1])
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(ds.x[0, 0], raw[0] / 255.0, atol=1e-7)


def test_fashion_mnist_missing_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)


def test_embedded_mnist_is_real_and_balanced():
    ds = load_mnist_5k()
    assert ds.x.shape == (5000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, 500))
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert 0.1 < ds.x.mean() < 0.2  # MNIST's mean ink, not noise (uniform noise would be ~0.5)


def test_uci_adult_small_file(tmp_path):
    rows = [
        "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, "
        "United-States, <=50K",
        "50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, "
        "0, 0, 13, ?, >50K",
    ]
    (tmp_path / "adult.data").write_text("\n".join(rows) + "\n")
    (tmp_path / "adult.test.gz").write_bytes(
        gzip.compress(("|1x3 Cross validator\n" + rows[0].replace("<=50K", ">50K.") + "\n").encode())
    )
    ds = load_uci_adult(tmp_path)
    np.testing.assert_array_equal(ds.y, [0, 1, 1])
    # 6 numeric columns + one-hot columns; every one-hot block sums to 1 per row
    assert ds.x.shape[0] == 3 and ds.num_classes == 2
    np.testing.assert_allclose(ds.x[:, 0].mean(), 0.0, atol=1e-6)  # age is z-scored


@pytest.mark.skipif(not SHARED_ADULT.is_dir(), reason="shared UCI Adult copy not present")
def test_uci_adult_real_files():
    ds = load_uci_adult(SHARED_ADULT)
    assert len(ds) == 32561 + 16281
    assert 0.2 < ds.y.mean() < 0.3  # ~24% earn >50K


def test_torchvision_loader_without_files_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        _load_torchvision("mnist", tmp_path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid: .*mnist-5k"):
        load_dataset("imagenet")


# ------------------------------------------------------------------ partitioning
def labels(n_per_class=100, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_complete(kind):
    y = labels()
    parts = partition_indices(y, 7, kind, alpha=0.5, seed=3)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert all(len(p) > 0 for p in parts)


def test_partitions_are_deterministic_in_seed():
    y = labels()
    a = partition_indices(y, 5, "dirichlet", alpha=0.3, seed=1)
    b = partition_indices(y, 5, "dirichlet", alpha=0.3, seed=1)
    c = partition_indices(y, 5, "dirichlet", alpha=0.3, seed=2)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=False))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=False))


def test_iid_shuffles_sorted_labels():
    parts = partition_indices(labels(), 5, "iid", seed=0)
    for p in parts:  # every client sees every class although the input is sorted by label
        assert len(np.unique(labels()[p])) == 10


@pytest.mark.parametrize(("n", "k", "seed"), [(1000, 5, 0), (1003, 7, 3), (11, 11, 1), (4999, 10, 2)])
def test_iid_partitions_are_flwr_datasets_iid_partitioner_s(n, k, seed):
    """The same shards as flwr-datasets' IidPartitioner on the shuffled examples, without importing it."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    y = np.arange(n) % 10
    perm = np.random.default_rng(seed).permutation(n)
    part = IidPartitioner(num_partitions=k)
    part.dataset = Dataset.from_dict({"label": y[perm].tolist(), "idx": perm.tolist()})
    theirs = [np.sort(np.asarray(part.load_partition(i)["idx"])) for i in range(k)]
    ours = partition_indices(y, k, "iid", seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def label_skew(y, parts):
    """Mean total-variation distance between client label distributions and the global one."""
    glob = np.bincount(y, minlength=10) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - glob).sum() for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = labels(200)
    skews = [
        np.mean([label_skew(y, partition_indices(y, 10, "dirichlet", alpha=a, seed=s)) for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_holdout_split():
    idx = np.arange(100, 200)
    tr, ho = train_holdout_split(idx, 0.2, seed=0)
    assert len(ho) == 20 and len(tr) == 80 and not set(tr) & set(ho) and set(tr) | set(ho) == set(idx)
    with pytest.raises(ValueError):
        train_holdout_split(idx, 1.0, seed=0)


def test_client_datasets_cover_the_dataset_once():
    sizes = 0
    for pid in range(3):
        tr, ho = client_datasets("digits", pid, 3, seed=4)
        sizes += len(tr) + len(ho)
        assert abs(len(ho) - 0.2 * (len(tr) + len(ho))) <= 1
    assert sizes == 1797
    with pytest.raises(ValueError, match="partition-id 3"):
        client_datasets("digits", 3, 3)


def test_unique_class_partition_gives_one_client_a_class_nobody_else_has():
    y = labels()
    parts = partition_indices(y, 4, "unique-class", seed=0, unique_class=3)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert set(np.flatnonzero(y == 3)) <= set(parts[0])  # all of class 3 on client 0
    assert all(3 not in y[p] for p in parts[1:]) and all(len(np.unique(y[p])) == 9 for p in parts[1:])
    with pytest.raises(ValueError, match="no example"):
        partition_indices(y, 4, "unique-class", unique_class=11)


def test_label_noise_changes_that_share_of_the_noisy_clients_labels_in_both_splits():
    from fed_unlearn.data.partition import flip_labels

    y = labels(20)
    noisy = flip_labels(y, 0.3, 10, seed=1)
    assert int(np.sum(noisy != y)) == 60 and noisy.min() >= 0 and noisy.max() < 10  # 30 % of 200, all changed
    np.testing.assert_array_equal(noisy, flip_labels(y, 0.3, 10, seed=1))
    clean_train, clean_held = client_datasets("digits", 0, 3, seed=4)
    train, held = client_datasets("digits", 0, 3, seed=4, label_noise=0.5, noisy_clients=(0,))
    assert int(np.sum(train.y != clean_train.y)) == round(0.5 * len(train))
    # the held-out split is the client's own data, labelled as badly: its exact share, other samples' positions
    assert int(np.sum(held.y != clean_held.y)) == round(0.5 * len(held)) and np.array_equal(held.x, clean_held.x)
    other, _ = client_datasets("digits", 1, 3, seed=4, label_noise=0.5, noisy_clients=(0,))
    assert np.array_equal(other.y, client_datasets("digits", 1, 3, seed=4)[0].y)  # only the noisy clients
