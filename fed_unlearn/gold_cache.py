"""On-disk cache of gold federations (retrained from scratch without the departing clients).

One folder per key (see :meth:`fed_unlearn.config.ExperimentConfig.gold_key`) with
``weights.npz`` (the final gold model) and ``meta.json`` (per-round history, cost, config).
Writes go to a temporary folder renamed into place, so a crash never leaves a
half-written entry that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def load_gold(cache_dir: str | Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Return ``(weights, meta)`` of a cached gold federation, or ``None`` if absent."""
    entry = Path(cache_dir) / key
    if not (entry / "meta.json").is_file() or not (entry / "weights.npz").is_file():
        return None
    meta = json.loads((entry / "meta.json").read_text())
    with np.load(entry / "weights.npz") as npz:
        order = meta["array_names"]
        weights = {name: npz[f"a{i}"] for i, name in enumerate(order)}
    return weights, meta


def save_gold(cache_dir: str | Path, key: str, weights: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Store a gold federation under ``key`` atomically; returns the entry folder."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        names = list(weights)
        np.savez(tmp / "weights.npz", **{f"a{i}": np.asarray(weights[n]) for i, n in enumerate(names)})
        (tmp / "meta.json").write_text(json.dumps({**meta, "array_names": names}, indent=2))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
