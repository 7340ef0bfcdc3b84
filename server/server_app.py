"""fed-unlearn ServerApp: ``flwr run .`` entry point.

Reads the run config, builds the unlearning method by name, and runs the experiment
of :mod:`server.experiment` (gold federation, federation with departure, report).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_unlearn.config import ExperimentConfig
from fed_unlearn.unlearning import make_method

from .experiment import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> dict[str, Any]:
    """Run one federated-unlearning experiment as configured in ``context.run_config``; return its results."""
    run_config = dict(context.run_config)
    cfg = ExperimentConfig.from_run_config(run_config)  # bad settings fail here, before any round
    method = make_method(cfg.method, run_config)
    return run_experiment(grid, cfg, method, run_config)
