"""Adding a method touches only its module and its test: a toy method registered in ``tests/toy_method.py``
runs through the in-process harness, its client routine through the project's ClientApp."""

import importlib
import json

import pytest

from fed_unlearn.unlearning import METHODS, registry

TIER = "integration"  # see tests/conftest.py


@pytest.fixture
def toy_method():
    """Import the toy module (it registers itself); take it out of the registry afterwards.

    The registry is filled at import time and never shrinks in a real process; a test that
    adds a method must not leak it into the others (they check every registered method).
    """
    module = importlib.import_module("toy_method")
    registry.register_method(module.ToyShrink)  # again, in case an earlier test took it out
    yield "toy-shrink"
    registry._REGISTRY.pop("toy-shrink", None)  # test isolation only


def test_a_method_registered_outside_the_package_runs_in_the_in_process_harness(toy_method, tmp_path):
    from simulations.harness import main

    assert toy_method in METHODS
    rc = "dataset='digits' num-server-rounds=4 unlearn.round=3 local-epochs=1 relearn-max-steps=0"
    argv = ["--methods", toy_method, "--scenarios", "client", "--seeds", "0", "--engine", "inprocess"]
    assert main([*argv, "--run-config", rc, "--results-dir", str(tmp_path), "--name", "toy"]) == 0
    (res_file,) = (tmp_path / "toy" / "client" / toy_method / "seed0").glob("*/results.json")
    res = json.loads(res_file.read_text())
    assert res["method"]["name"] == res["config"]["unlearn.method"] == toy_method
    # the departing client ran the toy's routine with its default settings: three ascent steps
    (client,) = res["unlearning"]["departing-clients"].values()
    assert client["train-steps"] == 3 and client["forget-loss-end"] > client["forget-loss-start"]
    assert f"| {toy_method} |" in (tmp_path / "toy" / "harness.md").read_text()


@pytest.mark.e2e
def test_a_method_added_as_one_file_of_the_package_runs_every_scenario_it_declares(tmp_path):
    """Copy the tree, add the toy as one module of ``fed_unlearn/unlearning``, change nothing else, run it."""
    import hashlib
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", "*.egg-info", ".pytest_cache")
    for part in ("fed_unlearn", "server", "clients", "simulations"):
        shutil.copytree(root / part, tree / part, ignore=skip)
    shutil.copy(root / "pyproject.toml", tree / "pyproject.toml")

    def digests() -> dict[str, str]:
        return {
            str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and "results" not in p.parts
        }

    before = digests()
    source = (root / "tests" / "toy_method.py").read_text()
    (tree / "fed_unlearn" / "unlearning" / "toy_shrink.py").write_text(source)
    scenarios = ("client", "samples")  # what ToyShrink declares
    env = {**os.environ, "PYTHONPATH": str(tree)}
    check = "from fed_unlearn.unlearning import METHODS; print(','.join(METHODS['toy-shrink'].scenarios))"
    declared = subprocess.run([sys.executable, "-c", check], cwd=tree, env=env, capture_output=True, text=True)
    assert declared.returncode == 0, declared.stderr
    assert tuple(declared.stdout.strip().split(",")) == scenarios
    rc = "dataset='digits' num-server-rounds=4 unlearn.round=3 local-epochs=1 relearn-max-steps=0"
    cells = {"client": "client", "samples": "samples-random"}  # a harness scenario of each deletion scenario
    argv = ["--methods", "toy-shrink", "--scenarios", *cells.values(), "--seeds", "0", "--engine", "inprocess"]
    cmd = [sys.executable, "-m", "simulations.harness", *argv, "--run-config", rc, "--name", "toy"]
    run = subprocess.run(
        [*cmd, "--results-dir", str(tmp_path / "results")], cwd=tree, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for scenario in scenarios:
        (res_file,) = (tmp_path / "results" / "toy" / cells[scenario] / "toy-shrink" / "seed0").glob("*/results.json")
        res = json.loads(res_file.read_text())
        assert res["method"]["name"] == "toy-shrink" and res["deletion"]["scenario"] == scenario
        (client,) = res["unlearning"]["departing-clients"].values()  # the toy's routine ran, its default steps
        assert client["train-steps"] == 3 and client["forget-loss-end"] > client["forget-loss-start"], scenario
    after = digests()
    assert set(after) - set(before) == {"fed_unlearn/unlearning/toy_shrink.py"}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing else of the tree changed
