"""Shared helpers for the Flower-tier tests (the pure-math tests import none of this)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def flatten(d: dict, prefix: str = "") -> dict:
    """Flatten nested TOML tables with dots, as Flower does for the run config."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


@pytest.fixture
def default_run_config() -> dict:
    """The app's ``[tool.flwr.app.config]`` as Flower flattens it."""
    return flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
