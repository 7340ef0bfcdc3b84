"""The whole experiment (ServerApp main + real ClientApp) on an in-process Grid: no Ray, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from clients.client_app import app as client_app
from fed_unlearn.flower import InProcessGrid
from server.server_app import run_server as server_main

TIER = "integration"  # see tests/conftest.py


def run(rc: dict, num_nodes: int, tmp_path: Path, cache: Path | None = None) -> tuple[dict, InProcessGrid]:
    # the gold and original federations are cached by what they depend on: tests share them
    cache = cache or tmp_path.parent / "shared-gold-cache"
    rc = {**rc, "results-dir": str(tmp_path / "results"), "gold-cache-dir": str(cache)}
    grid = InProcessGrid(client_app, num_nodes, rc)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    (res,) = list((tmp_path / "results").glob("*/results.json"))
    return json.loads(res.read_text()), grid


def test_default_experiment_moves_toward_gold(default_run_config, tmp_path):
    """Behaviour on the embedded MNIST: PUF + recovery brings the forget set toward gold."""
    res, _ = run(default_run_config, 5, tmp_path)
    orig, unl, gold = (res["report"][k] for k in ("original", "unlearned", "gold"))
    # every metric of the report is there, for every model
    accuracies = ("test-acc", "retain-acc", "forget-acc", "forget-heldout-acc")
    leakage_and_fidelity = ("mia-auc", "mia-entropy-auc", "kl-forget", "disagree-forget", "kl-test", "disagree-test")
    for m in (orig, unl, gold):
        for key in accuracies + leakage_and_fidelity:
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


def test_a_cells_figures_are_the_same_alone_and_after_another_cell(default_run_config, tmp_path):
    """The caches key everything that changes what they hold: no figure depends on the order of cells."""
    small = {**default_run_config, "dataset": "digits", "unlearn.round": 3, "num-server-rounds": 4}
    client = {**small, "unlearn.scenario": "client"}
    samples = {**small, "unlearn.scenario": "samples", "unlearn.selection": "high-loss", "unlearn.fraction": 0.3}
    alone, _ = run(samples, 3, tmp_path / "alone", cache=tmp_path / "cache-alone")
    run(client, 3, tmp_path / "first", cache=tmp_path / "cache-shared")
    after, _ = run(samples, 3, tmp_path / "after", cache=tmp_path / "cache-shared")

    def untimed(history):  # wall-clock figures aside
        return {r: {k: v for k, v in h.items() if "seconds" not in k} for r, h in history.items()}

    assert after["report"] == alone["report"] and untimed(after["history"]) == untimed(alone["history"])
    assert after["recovery"] == alone["recovery"]


def test_same_seed_same_numbers_and_gold_cache_reused(default_run_config, tmp_path):
    rc = {**default_run_config, "dataset": "digits", "unlearn.round": 3, "num-server-rounds": 5}
    first, grid1 = run(rc, 3, tmp_path, cache=tmp_path / "gold")
    for f in (tmp_path / "results").glob("*/results.json"):
        f.unlink()
    second, grid2 = run(rc, 3, tmp_path, cache=tmp_path / "gold")
    assert first["timings"]["gold-cached"] is False and second["timings"]["gold-cached"] is True
    assert first["report"] == second["report"]
    # the cached gold was not retrained: the second run sent fewer training messages
    assert grid2.sent.count("train") < grid1.sent.count("train")


def test_two_clients_leave_in_the_same_round(default_run_config, tmp_path):
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.departing": "0,2",
        "unlearn.round": 3,
        "num-server-rounds": 4,
        "unlearn.recovery": "fixed",
    }
    res, grid = run(rc, 4, tmp_path)
    assert res["config"]["unlearn.departing"] == [0, 2]
    assert res["recovery"]["rounds-run"] == 1
    # after the unlearning round only clients 1 and 3 train: 2 messages in round 4
    assert res["train-history"]["4"]["clients"] == 2 and res["train-history"]["3"]["clients"] == 4


@pytest.mark.parametrize(
    "override, msg",
    [
        ({"unlearn.departing": "7"}, r"unknown departing client id\(s\) \[7\]"),
        ({"unlearn.round": 20}, "after the last round"),
        ({"unlearn.method": "nope"}, "unknown unlearning method"),
    ],
)
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
    layers = {layer["layer"]: layer for layer in rep["layers"]}
    assert set(layers) == {"net.1", "net.3", "net.5"}
    assert all(0.1 <= layer["nu"] <= 1.0 and layer["motion-share"] > 0 for layer in layers.values())
    client = rep["departing-clients"]["0"]
    assert 0 < client["train-steps"] <= 200 and client["forget-loss-end"] > client["forget-loss-start"]


def test_spectral_puf_and_sragu_serve_concurrent_departures(default_run_config, tmp_path):
    for method in ("spectral-puf", "sragu"):
        rc = {
            **default_run_config,
            "dataset": "digits",
            "unlearn.method": method,
            "unlearn.departing": "0,2",
            "unlearn.round": 3,
            "num-server-rounds": 4,
            "unlearn.recovery": "fixed",
            "unlearn.memorisation-z": 0.0,  # weak evidence on this small federation: step anyway
        }
        res, _ = run(rc, 4, tmp_path / method)
        assert res["unlearning"]["departing"] == [0, 2]
        assert res["train-history"]["4"]["clients"] == 2
        if method == "sragu":
            assert set(res["unlearning"]["departing-clients"]) == {"0", "2"}


@pytest.mark.parametrize(
    "method, trained_in_unlearning_round",
    [("fine-tune", 3), ("not", 3), ("gradient-ascent", 1), ("retrain", 3), ("federaser", 3), ("pga", 1), ("ieu", 1)],
)
def test_baselines_run_in_the_same_harness(default_run_config, tmp_path, method, trained_in_unlearning_round):
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.method": method,
        "unlearn.round": 3,
        "num-server-rounds": 5,
        "unlearn.recovery": "fixed",
    }
    res, grid = run(rc, 4, tmp_path)
    assert res["method"]["name"] == method
    assert res["train-history"]["3"]["clients"] == trained_in_unlearning_round
    assert res["train-history"]["5"]["clients"] == 3  # client 0 is gone
    assert ("train.unlearn" in grid.sent) == (method in ("gradient-ascent", "pga", "ieu"))
    assert set(res["report"]) == {"original", "unlearned", "gold"}
    assert res["report"]["unlearned"]["l2-to-original"] > 0
    if method == "pga":  # the departing client built the other clients' average from its own last model
        assert res["unlearning"]["departing-clients"]["0"]["pga-reference"] == 1


@pytest.mark.parametrize(
    "scenario", [{}, {"unlearn.scenario": "samples", "unlearn.selection": "high-loss", "unlearn.fraction": 0.2}]
)
def test_retrain_reproduces_the_gold_exactly(default_run_config, tmp_path, scenario):
    """The harness check: retraining with the gold's seeds lands on the gold's weights."""
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.method": "retrain",
        "unlearn.round": 3,
        "num-server-rounds": 5,
        "unlearn.recovery": "until-gold",
        **scenario,
    }  # the oracle stop: no recovery round after retraining
    res, _ = run(rc, 3, tmp_path)
    unl = res["report"]["unlearned"]
    assert unl["l2-to-gold"] == 0.0 and unl["average-gap"] == 0.0 and unl["kl-forget"] == 0.0
    assert res["recovery"]["unlearning-rounds"] == 2 and res["recovery"]["rounds-to-gold"] == 0
    assert res["client-compute"]["fraction-of-gold-steps"] == pytest.approx(1.0)


def test_sample_deletion_selects_with_the_original_model_and_golds_without_those_samples(default_run_config, tmp_path):
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.scenario": "samples",
        "unlearn.selection": "high-loss",
        "unlearn.fraction": 0.1,
        "unlearn.departing": "1",
        "unlearn.round": 3,
        "num-server-rounds": 6,
        "unlearn.memorisation-z": 0.0,  # 48 samples: weak evidence, which the default reads as nothing memorised
    }
    res, grid = run(rc, 3, tmp_path)
    assert grid.sent.count("query.forget") == 1
    req = res["deletion"]
    assert req["scenario"] == "samples" and list(req["clients"]) == ["1"]
    n1 = res["clients"]["1"]["train-n"]
    assert req["clients"]["1"]["forget-n"] == round(0.1 * n1) and len(req["clients"]["1"]["digest"]) == 16
    orig, unl, gold = (res["report"][k] for k in ("original", "unlearned", "gold"))
    # the highest-loss samples: the original fits them worst; the gold (never saw them) even worse
    assert orig["forget-acc"] < orig["retain-acc"] and gold["forget-acc"] < orig["forget-acc"]
    # the unlearning round moves the forget set toward the gold (48 samples; recovery may relearn them)
    after = res["history"]["3"]["forget-acc"]
    assert abs(after - gold["forget-acc"]) < abs(orig["forget-acc"] - gold["forget-acc"])
    assert unl["forget-acc"] <= orig["forget-acc"]
    # the client stays and plays both roles in the unlearning round (PUF-regular): 3 replies, 4 updates
    assert res["train-history"]["3"]["clients"] == 3
    assert res["train-history"]["3"]["total-examples"] == sum(c["train-n"] for c in res["clients"].values())
    client_gold = run({**rc, "unlearn.scenario": "client"}, 3, tmp_path / "client")[0]
    assert client_gold["gold-key"] != res["gold-key"]


def test_class_deletion_reports_mia_nn_and_the_gold_never_predicts_the_class(default_run_config, tmp_path):
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.scenario": "class",
        "unlearn.class": 3,
        "unlearn.round": 3,
        "num-server-rounds": 6,
    }
    res, grid = run(rc, 3, tmp_path)
    # every client is asked: at the start (the class does not depend on the model) and with the original model
    assert res["config"]["unlearn.departing"] == [] and grid.sent.count("query.forget") == 6
    assert set(res["deletion"]["clients"]) == {"0", "1", "2"}
    orig, unl, gold = (res["report"][k] for k in ("original", "unlearned", "gold"))
    assert gold["forget-acc"] < 0.05 and orig["forget-acc"] > 0.8
    for m in (orig, unl, gold):
        assert 0.0 <= m["mia-nn-auc"] <= 1.0
    assert unl["forget-acc"] < 0.5  # PUF's ascent on every client's class-3 samples removed it
    assert res["train-history"]["3"]["clients"] == 3  # every client stays, with both roles


def test_federaser_reports_its_history_cost(default_run_config, tmp_path):
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.method": "federaser",
        "unlearn.round": 4,
        "num-server-rounds": 6,
        "unlearn.recovery": "fixed",
    }
    res, _ = run(rc, 3, tmp_path)
    model_bytes = 4 * ((64 * 200 + 200) + (200 * 100 + 100) + (100 * 10 + 10))  # MLP on 8x8 digits, float32
    # 3 checkpoints (rounds 1-3) x (start model + 3 client updates)
    assert res["server-history-bytes"] == 3 * 4 * model_bytes
    assert res["recovery"]["unlearning-rounds"] == 2  # J - 1 calibration rounds
    assert res["unlearning"]["history-bytes"] == res["server-history-bytes"]


@pytest.mark.parametrize(
    "override, msg",
    [
        ({"unlearn.scenario": "class", "unlearn.class": 99}, "does not exist"),
        ({"unlearn.scenario": "samples", "unlearn.departing": ""}, "needs the requesting client"),
        (
            {"unlearn.method": "retrain", "unlearn.round": 8, "num-server-rounds": 10},
            "num-server-rounds must be at least 14",
        ),
    ],
)
def test_impossible_deletions_fail_before_any_training(default_run_config, tmp_path, override, msg):
    rc = {
        **default_run_config,
        "dataset": "digits",
        **override,
        "results-dir": str(tmp_path / "r"),
        "gold-cache-dir": str(tmp_path / "g"),
    }
    grid = InProcessGrid(client_app, 3, rc)
    with pytest.raises(ValueError, match=msg):
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    assert "train" not in grid.sent


def test_augmentation_only_changes_training_after_the_request(default_run_config, tmp_path):
    """``unlearn.augment`` reaches the clients and acts from the unlearning round on, never before."""
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.method": "fine-tune",
        "unlearn.round": 3,
        "num-server-rounds": 4,
        "unlearn.recovery": "fixed",
    }
    plain, _ = run(rc, 3, tmp_path / "plain")
    shifted, _ = run({**rc, "unlearn.augment": "shift"}, 3, tmp_path / "shift")
    assert shifted["config"]["unlearn.augment"] == "shift"
    for r in ("1", "2"):  # the original federation is the same model
        assert shifted["train-history"][r]["train-loss"] == plain["train-history"][r]["train-loss"]
    assert shifted["report"]["original"] == plain["report"]["original"]
    for r in ("3", "4"):  # augmented batches after the request: a different (harder) training loss
        assert shifted["train-history"][r]["train-loss"] != plain["train-history"][r]["train-loss"]
    assert shifted["report"]["unlearned"]["l2-to-original"] != plain["report"]["unlearned"]["l2-to-original"]


def test_strong_audit_trains_reference_federations_once_and_reads_them_at_low_fpr(default_run_config, tmp_path):
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.round": 3,
        "num-server-rounds": 5,
        "unlearn.recovery": "fixed",
        "audit.references": 2,
    }
    res, grid = run(rc, 3, tmp_path, cache=tmp_path / "cache")
    leak = res["leakage"]
    assert leak["references"]["trained"] == 2 and leak["references"]["cached"] == 0
    assert grid.sent.count("train.reference") == 2 * 2 * 3  # 2 references x 2 rounds (the gold's) x 3 clients
    forget_n, heldout_n = res["deletion"]["clients"]["0"]["forget-n"], res["clients"]["0"]["heldout-n"]
    for name in ("original", "unlearned", "gold"):
        fig = leak["figures"][name]
        assert fig["members"] == forget_n and fig["nonmembers"] == heldout_n  # the departing client's own samples
        assert 0.0 <= res["report"][name]["rmia-auc"] <= 1.0 and "lira-tpr@1%" in res["report"][name]
        assert fig["rmia-tpr@0.1%"] is None  # 0.1 % of ~120 non-members: not measurable, said so (null)
        assert fig["rmia-tpr@1%-low"] <= fig["rmia-tpr@1%"] <= fig["rmia-tpr@1%-high"]
    assert "rmia-vs-gold-auc" not in res["report"]["gold"] and "rmia-vs-gold-auc" in res["report"]["unlearned"]
    assert (next((tmp_path / "results").glob("*/roc.png"))).stat().st_size > 10_000
    # the references do not depend on the deletion: a second request reuses them, same figures
    for f in (tmp_path / "results").glob("*/results.json"):
        f.unlink()
    again, grid2 = run(rc, 3, tmp_path, cache=tmp_path / "cache")
    assert again["leakage"]["references"]["cached"] == 2 and "train.reference" not in grid2.sent
    assert again["leakage"]["figures"] == leak["figures"]


def test_a_reference_round_trains_each_client_on_its_half(default_run_config):
    from flwr.app import ArrayRecord, ConfigRecord, Message

    from fed_unlearn import protocol as P
    from fed_unlearn.attacks import client_reference_masks
    from fed_unlearn.models import build_model

    rc = {**default_run_config, "dataset": "digits", "local-epochs": 1}
    grid = InProcessGrid(client_app, 3, rc)
    node = sorted(grid.get_node_ids())[1]
    model = ArrayRecord(build_model("mlp", (64,), 10, seed=0).state_dict())
    sizes = []
    for index in (0, 1):
        cfg = {P.REFERENCE_INDEX: index, P.REFERENCE_COUNT: 2, P.REFERENCE_SEED: 5}
        msg = Message(RecordDict({"arrays": model, "config": ConfigRecord(cfg)}), node, P.TRAIN_REFERENCE)
        (reply,) = grid.send_and_receive([msg])
        sizes.append(int(reply.content["metrics"][P.NUM_EXAMPLES]))
    (info,) = grid.send_and_receive([Message(RecordDict(), node, P.INFO)])
    n = int(info.content["info"]["train-n"])
    halves = client_reference_masks(n, 2, 5, client_id=1)
    assert sizes == [int(halves[0].sum()), int(halves[1].sum())] and sum(sizes) == n


def test_the_calibration_handler_measures_every_scale_from_the_same_base(default_run_config):
    """Each candidate is base + c d, never the previous candidate + c d (the scales are not cumulative)."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Message

    from fed_unlearn import protocol as P
    from fed_unlearn.flower import to_record
    from fed_unlearn.models import build_model

    rc = {**default_run_config, "dataset": "digits"}
    grid = InProcessGrid(client_app, 3, rc)
    node = sorted(grid.get_node_ids())[0]
    base = build_model("mlp", (64,), 10, seed=0).state_dict()
    direction = to_record({k: np.full(tuple(v.shape), 0.05, np.float32) for k, v in base.items()})
    spec = ConfigRecord({"scenario": "samples", "selection": "random", "fraction": 0.2, "class": 0, "seed": 0})
    (got,) = grid.send_and_receive([Message(RecordDict({"arrays": ArrayRecord(base), "config": spec}), node, P.FORGET)])
    assert not got.has_error()

    def calibrate(scales):
        content = {"base": ArrayRecord(base), "direction": direction, "config": ConfigRecord({"scales": scales})}
        (reply,) = grid.send_and_receive([Message(RecordDict(content), node, P.CALIBRATE)])
        return reply.content["calibration"]

    together, alone = calibrate([0.0, 0.5, 1.0]), calibrate([1.0])
    for key in ("forget-loss-sum", "forget-correct", "heldout-loss-sum", "heldout-correct"):
        assert together[key][2] == pytest.approx(alone[key][0]), key
    assert together["forget-loss-sum"][0] != pytest.approx(together["forget-loss-sum"][2])
    assert "rest-n" not in together  # random samples span every class: no other held-out samples
    # a class: the held-out samples of the other classes are what the client keeps, measured beside
    spec = ConfigRecord({"scenario": "class", "class": 3, "seed": 0})
    (got,) = grid.send_and_receive([Message(RecordDict({"arrays": ArrayRecord(base), "config": spec}), node, P.FORGET)])
    assert not got.has_error()
    (info,) = grid.send_and_receive([Message(RecordDict(), node, P.INFO)])
    held = int(info.content["info"]["heldout-n"])
    one = calibrate([1.0])
    assert 0 < one["rest-n"][0] < held and one["heldout-n"][0] + one["rest-n"][0] == held
    assert 0 <= one["rest-correct"][0] <= one["rest-n"][0]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("amun", {"fastclip.bound": 2.0}),  # AMUN's smoothness condition via FastClip
        ("trw", {"unlearn.scenario": "class", "unlearn.class": 3}),
        ("mpru", {"unlearn.scenario": "class", "unlearn.class": 3}),
    ],
)
def test_seed_methods_move_toward_gold(default_run_config, tmp_path, method, extra):
    rc = {
        **default_run_config,
        "dataset": "digits",
        "num-server-rounds": 5,
        "unlearn.round": 3,
        "unlearn.method": method,
        **extra,
    }
    res, _ = run(rc, 3, tmp_path)
    orig, unl, gold = (res["report"][k] for k in ("original", "unlearned", "gold"))
    assert res["method"]["name"] == method
    assert abs(unl["forget-acc"] - gold["forget-acc"]) < abs(orig["forget-acc"] - gold["forget-acc"])
    if method in ("trw", "mpru"):
        assert unl["forget-acc"] < 0.05 and "mia-nn-auc" in unl and "tv-forget" in unl
        assert res["recovery"]["unlearning-rounds"] == (2 if method == "trw" else 1)
    else:
        assert res["config"]["fastclip.bound"] == 2.0
        assert unl["average-gap"] < orig["average-gap"]


def test_the_gold_twin_is_a_retraining_with_other_seeds_measured_against_the_gold(default_run_config, tmp_path):
    rc = {
        **default_run_config,
        "dataset": "digits",
        "unlearn.round": 3,
        "num-server-rounds": 5,
        "audit.gold-twin": True,
    }
    first, grid1 = run(rc, 3, tmp_path, cache=tmp_path / "gold")
    twin, gold = first["report"]["gold-twin"], first["report"]["gold"]
    # other seeds, the same data: another model, as useful as the gold, that disagrees with it on some samples
    assert twin["l2-to-gold"] > 0 and twin["kl-forget"] > 0 and twin["kl-test"] > 0
    assert abs(twin["test-acc"] - gold["test-acc"]) < 0.1
    assert "relearn-steps" not in twin  # measured, not probed
    assert "gold-twin" in first["table-markdown"].splitlines()[0]
    for f in (tmp_path / "results").glob("*/results.json"):
        f.unlink()
    second, grid2 = run(rc, 3, tmp_path, cache=tmp_path / "gold")
    assert second["report"] == first["report"]  # cached, and the same numbers
    assert grid2.sent.count("train") < grid1.sent.count("train")
