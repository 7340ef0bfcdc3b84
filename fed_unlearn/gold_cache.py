"""On-disk cache of federations: the gold (retrained without the deleted data), the original, the references.

One folder per key (see :meth:`fed_unlearn.config.ExperimentConfig.gold_key` and
``original_key``) with ``weights.npz`` (the final model) and ``meta.json`` (per-round
history, cost, config). Writes go to a temporary folder renamed into place, so a crash
never leaves a half-written entry that a later run would trust. Every key includes
:func:`code_fingerprint`: a change of the code never reuses a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Digest of the code that produces cached results: this package's sources and the app's (``server``, ``clients``).

    Computed once per process (the files do not change under a running process).
    """
    root = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    for sibling in ("server", "clients"):
        folder = root.parent / sibling
        if folder.is_dir():
            files += sorted(folder.rglob("*.py"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root.parent)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def load_federation(cache_dir: str | Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Return ``(weights, meta)`` of a cached federation (gold, original or reference), or ``None`` if absent."""
    entry = Path(cache_dir) / key
    if not (entry / "meta.json").is_file() or not (entry / "weights.npz").is_file():
        return None
    meta = json.loads((entry / "meta.json").read_text())
    with np.load(entry / "weights.npz") as npz:
        order = meta["array_names"]
        weights = {name: npz[f"a{i}"] for i, name in enumerate(order)}
    return weights, meta


def save_federation(
    cache_dir: str | Path, key: str, weights: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Path:
    """Store a federation (gold, original or reference) under ``key`` atomically; returns the entry folder."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        names = list(weights)
        arrays = {f"a{i}": np.asarray(weights[n]) for i, n in enumerate(names)}
        np.savez(tmp / "weights.npz", **arrays)  # type: ignore[arg-type]
        (tmp / "meta.json").write_text(json.dumps({**meta, "array_names": names}, indent=2))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
