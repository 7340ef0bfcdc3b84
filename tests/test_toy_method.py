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
