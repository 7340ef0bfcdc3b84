"""The launcher's staging of a Flower app: what ``flwr run`` is given builds the app's own FAB."""

from __future__ import annotations

import json

from flwr.cli.build import build_fab_from_disk

from simulations.run_experiment import PROJECT_ROOT, stage_app

TIER = "integration"  # see tests/conftest.py (Flower's FAB builder)


def test_a_staged_app_builds_the_same_fab_without_its_ignored_files(tmp_path):
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pyproject.toml").write_text((PROJECT_ROOT / "pyproject.toml").read_text())
    (app / ".gitignore").write_text(".venv/\n/results/\n*.log\n")
    (app / "pkg" / "__init__.py").write_text("X = 1\n")
    (app / "pkg" / "notes.md").write_text("kept\n")
    (app / "run.log").write_text("ignored\n")
    for ignored in (".venv/lib/site", "results/run-1"):
        (app / ignored).mkdir(parents=True)
        (app / ignored / "big.py").write_text("ignored = True\n")
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "__init__.py")  # Flower skips symlinks
    staged = stage_app(app, tmp_path / "staged")
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    assert not (staged / ".venv").exists() and not (staged / "results").exists() and not (staged / "run.log").exists()
    assert (staged / "pkg" / "notes.md").read_text() == "kept\n" and not (staged / "pkg" / "link.py").exists()


def test_the_plain_apps_round_times_run_from_one_rounds_start_to_the_next():
    from simulations.stock_app import round_seconds

    assert round_seconds({1: 10.0, 2: 12.5, 3: 16.0}, end=21.0) == {1: 2.5, 2: 3.5, 3: 5.0}
    assert round_seconds({}, end=1.0) == {}


def test_the_round_floor_app_times_rounds_of_two_exchanges_of_tasks_that_do_nothing(tmp_path):
    from flwr.app import Context, RecordDict

    from clients.client_app import app as client_app
    from fed_unlearn.flower.grid import InProcessGrid
    from simulations.inprocess import fused_run_config
    from simulations.stock_app import floor_main

    rc = fused_run_config(".", f"num-server-rounds=3 node-wait-seconds=2.0 results-dir='{tmp_path}' dataset='digits'")
    grid = InProcessGrid(client_app, 3, rc)
    floor_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    times = json.loads((tmp_path / "floor-rounds.json").read_text())
    assert sorted(times) == ["1", "2", "3"] and all(t > 0 for t in times.values())
    # two exchanges per round, one identify message to every node in each, nothing else
    assert grid.sent == ["query.identify"] * (3 * 2 * 3)
