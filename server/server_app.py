"""fed-unlearn ServerApp: ``flwr run .`` entry point.

Reads the run config, builds the unlearning method by name, and runs either the
experiment of :mod:`server.experiment` (``mode = "experiment"``: original rounds, deletion
request, gold federation, unlearning, report) or the long-running erasure service of
:mod:`server.service` (``mode = "service"``: a deployed federation whose sites ask to be
forgotten at run time).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_unlearn.config import ExperimentConfig, ServiceConfig, mode_of
from fed_unlearn.flower import prompt
from fed_unlearn.unlearning import config_from_run_config, make_method

from .experiment import run_experiment
from .service import run_service

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: one experiment, or the erasure service, as ``context.run_config`` says."""
    run_server(grid, context)


def run_server(grid: Grid, context: Context) -> dict[str, Any]:
    """Run one federated-unlearning experiment (or the service) as configured in ``context.run_config``; its results."""
    run_config = dict(context.run_config)
    grid = prompt(grid)  # deployed: replies picked up every 0.1 s, not every 3 s
    cfg = ExperimentConfig.from_run_config(run_config)  # bad settings fail here, before any round
    method = make_method(cfg.request.method, run_config)
    if mode_of(run_config) == "service":
        svc = config_from_run_config(ServiceConfig, run_config, "service")
        return run_service(grid, cfg, svc, run_config)
    return run_experiment(grid, cfg, method, run_config)
