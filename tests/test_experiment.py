"""The whole experiment (ServerApp main + real ClientApp) on an in-process Grid: no Ray, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from clients.client_app import app as client_app
from server.server_app import main as server_main
from simulations.inprocess import InProcessGrid


def run(rc: dict, num_nodes: int, tmp_path: Path) -> tuple[dict, InProcessGrid]:
    rc = {**rc, "results-dir": str(tmp_path / "results"), "gold-cache-dir": str(tmp_path / "gold")}
    grid = InProcessGrid(client_app, num_nodes, rc)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    (res,) = list((tmp_path / "results").glob("*/results.json"))
    return json.loads(res.read_text()), grid


def test_default_experiment_moves_toward_gold(default_run_config, tmp_path):
    """Behaviour on the embedded MNIST: PUF + recovery brings the forget set toward gold."""
    res, _ = run(default_run_config, 5, tmp_path)
    orig, unl, gold = (res["report"][k] for k in ("original", "unlearned", "gold"))
    # every metric of the report is there, for every model
    for m in (orig, unl, gold):
        for key in ("test-acc", "retain-acc", "forget-acc", "forget-heldout-acc", "mia-auc", "mia-entropy-auc", "kl-forget",
                    "disagree-forget", "kl-test", "disagree-test"):
            assert key in m and m[key] is not None
    assert gold["kl-forget"] == 0.0 and gold["disagree-forget"] == 0.0
    assert gold["average-gap"] == 0.0 and gold["l2-to-gold"] == 0.0 and orig["l2-to-original"] == 0.0
    assert unl["average-gap"] < orig["average-gap"]
    # relearn time: the original is already there; the unlearned model needs steps, like the gold
    assert orig["relearn-steps"] == 0 and gold["relearn-vs-gold"] == 1.0
    assert unl["relearn-steps"] > 0 and gold["relearn-steps"] > 0
    assert unl["l2-to-original"] > 0 and orig["l2-to-gold"] > 0
    # the original model memorised the departing client; unlearning moves it toward the gold
    assert orig["forget-acc"] - gold["forget-acc"] > 0.02
    assert abs(unl["forget-acc"] - gold["forget-acc"]) < abs(orig["forget-acc"] - gold["forget-acc"])
    assert abs(unl["mia-auc"] - gold["mia-auc"]) < abs(orig["mia-auc"] - gold["mia-auc"])
    assert unl["kl-forget"] < orig["kl-forget"]
    # recovery reached the gold's accuracy within tolerance and cost less than retraining
    assert res["recovery"]["rounds-to-gold"] is not None
    assert unl["test-acc"] >= gold["test-acc"] - res["recovery"]["tolerance"]
    assert 0 < res["client-compute"]["fraction-of-gold-steps"] < 1
    out = Path(tmp_path / "results").glob("*/accuracy.png")
    assert next(out).stat().st_size > 10_000


def test_same_seed_same_numbers_and_gold_cache_reused(default_run_config, tmp_path):
    rc = {**default_run_config, "dataset": "digits", "unlearn.round": 3, "num-server-rounds": 5}
    first, grid1 = run(rc, 3, tmp_path)
    for f in (tmp_path / "results").glob("*/results.json"):
        f.unlink()
    second, grid2 = run(rc, 3, tmp_path)
    assert first["timings"]["gold-cached"] is False and second["timings"]["gold-cached"] is True
    assert first["report"] == second["report"]
    # the cached gold was not retrained: the second run sent fewer training messages
    assert grid2.sent.count("train") < grid1.sent.count("train")


def test_two_clients_leave_in_the_same_round(default_run_config, tmp_path):
    rc = {**default_run_config, "dataset": "digits", "unlearn.departing": "0,2", "unlearn.round": 3,
          "num-server-rounds": 4, "unlearn.recovery": "fixed"}
    res, grid = run(rc, 4, tmp_path)
    assert res["config"]["departing"] == [0, 2]
    assert res["recovery"]["rounds-run"] == 1
    # after the unlearning round only clients 1 and 3 train: 2 messages in round 4
    assert res["train-history"]["4"]["clients"] == 2 and res["train-history"]["3"]["clients"] == 4


@pytest.mark.parametrize("override, msg", [
    ({"unlearn.departing": "7"}, r"unknown departing client id\(s\) \[7\]"),
    ({"unlearn.round": 20}, "after the last round"),
    ({"unlearn.method": "nope"}, "unknown unlearning method"),
])
def test_bad_requests_fail_before_any_training(default_run_config, tmp_path, override, msg):
    rc = {**default_run_config, "dataset": "digits", **override}
    grid = None
    with pytest.raises(ValueError, match=msg):
        rc2 = {**rc, "results-dir": str(tmp_path / "r"), "gold-cache-dir": str(tmp_path / "g")}
        grid = InProcessGrid(client_app, 3, rc2)
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc2))
    assert grid is not None and "train" not in grid.sent
    assert not (tmp_path / "r").exists() and not (tmp_path / "g").exists()


def test_sragu_experiment_moves_toward_gold_and_reports_layers(default_run_config, tmp_path):
    res, grid = run({**default_run_config, "unlearn.method": "sragu"}, 5, tmp_path)
    orig, unl, gold = (res["report"][k] for k in ("original", "unlearned", "gold"))
    assert "train.unlearn" in grid.sent  # the departing client ran SRAGU locally
    assert abs(unl["mia-auc"] - gold["mia-auc"]) < abs(orig["mia-auc"] - gold["mia-auc"])
    assert abs(unl["forget-acc"] - gold["forget-acc"]) < abs(orig["forget-acc"] - gold["forget-acc"])
    rep = res["unlearning"]
    assert rep["method"] == "sragu" and rep["departing"] == [0]
    layers = {l["layer"]: l for l in rep["layers"]}
    assert set(layers) == {"net.1", "net.3", "net.5"}
    assert all(0.1 <= l["nu"] <= 1.0 and l["motion-share"] > 0 for l in layers.values())
    client = rep["departing-clients"]["0"]
    assert 0 < client["train-steps"] <= 200 and client["forget-loss-end"] > client["forget-loss-start"]


def test_spectral_puf_and_sragu_serve_concurrent_departures(default_run_config, tmp_path):
    for method in ("spectral-puf", "sragu"):
        rc = {**default_run_config, "dataset": "digits", "unlearn.method": method, "unlearn.departing": "0,2",
              "unlearn.round": 3, "num-server-rounds": 4, "unlearn.recovery": "fixed"}
        res, _ = run(rc, 4, tmp_path / method)
        assert res["unlearning"]["departing"] == [0, 2]
        assert res["train-history"]["4"]["clients"] == 2
        if method == "sragu":
            assert set(res["unlearning"]["departing-clients"]) == {"0", "2"}


@pytest.mark.parametrize("method, trained_in_unlearning_round", [("fine-tune", 3), ("not", 3), ("gradient-ascent", 1)])
def test_baselines_run_in_the_same_harness(default_run_config, tmp_path, method, trained_in_unlearning_round):
    rc = {**default_run_config, "dataset": "digits", "unlearn.method": method, "unlearn.round": 3,
          "num-server-rounds": 4, "unlearn.recovery": "fixed"}
    res, grid = run(rc, 4, tmp_path)
    assert res["method"]["name"] == method
    assert res["train-history"]["3"]["clients"] == trained_in_unlearning_round
    assert res["train-history"]["4"]["clients"] == 3  # client 0 is gone
    assert ("train.unlearn" in grid.sent) == (method == "gradient-ascent")
    assert set(res["report"]) == {"original", "unlearned", "gold"}
    assert res["report"]["unlearned"]["l2-to-original"] > 0
