"""Run the project's Flower app on an in-process Grid (no SuperLink, no Ray): tests and the fast harness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from fed_unlearn.flower.grid import InProcessGrid


def fused_run_config(project_dir: str, overrides: str) -> dict[str, Any]:
    """The run config ``flwr run <project_dir> --run-config "<overrides>"`` would give the apps.

    Uses Flower's own parser and merge, so unknown keys are refused the same way.
    """
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    return dict(
        get_fused_config_from_dir(Path(project_dir), parse_config_args([overrides] if overrides.strip() else []))
    )


def run_inprocess(project_dir: str, num_clients: int, overrides: str) -> dict[str, Any]:
    """Run the fed-unlearn ServerApp with ``num_clients`` in-process ClientApp nodes; return its results.

    The same ServerApp ``main`` and ClientApp functions as ``flwr run``, without SuperLink or Ray.
    """

    from clients.client_app import app as client_app
    from server.server_app import run_server as server_main

    rc = fused_run_config(project_dir, overrides)
    grid = InProcessGrid(client_app, num_clients, rc)
    return server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
