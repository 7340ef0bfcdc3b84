"""Test tiers and shared helpers.

Every test belongs to one tier, selected with ``-m``:

* ``unit``: pure math and files, no Flower (milliseconds each);
* ``integration``: the apps and the strategy on the in-process Grid (seconds each);
* ``e2e``: real processes — ``flwr run`` on Ray, SuperLink / SuperNodes, a packaging
  install (a minute or more each).

A module declares ``TIER = "unit"`` or ``TIER = "integration"``; a test marked
``@pytest.mark.e2e`` is end-to-end whatever its module. A test without a tier is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tomllib

# Two xdist workers on two cores: one OpenMP/BLAS thread each. With the libraries' default
# (a thread per core in every worker) the workers' threads spin against each other and the
# fast tiers take three times as long. Set before torch or numpy is imported by any test.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]


def flatten(d: dict, prefix: str = "") -> dict:
    """Flatten nested TOML tables with dots, as Flower does for the run config."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


TIERS = ("unit", "integration")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its module's tier, unless it is marked ``e2e``."""
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            continue
        tier = getattr(getattr(item, "module", None), "TIER", None)
        if tier not in TIERS:
            raise pytest.UsageError(
                f"{item.nodeid}: its module needs TIER = 'unit' or 'integration', or the test @pytest.mark.e2e"
            )
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def default_run_config() -> dict:
    """The app's ``[tool.flwr.app.config]`` as Flower flattens it."""
    return flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
