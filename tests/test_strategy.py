"""UnlearningFedAvg driven with hand-made Flower messages (no Ray, no SuperLink)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fed_unlearn.aggregation import ClientUpdate, InvalidUpdateError
from fed_unlearn.unlearning import make_method, puf_update
from server.records import to_record, to_weights
from server.strategy import UnlearningFedAvg

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
NODES = {0: 9001, 1: 9002, 2: 9003}  # client id -> Flower node id
GLOBAL = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.5], np.float32)}


def reply(cid: int, w, n: int, mtype: str = MessageType.TRAIN) -> Message:
    instr = Message(RecordDict(), NODES[cid], mtype)
    content = RecordDict({"arrays": ArrayRecord(array_dict={}) if w is None else to_record(w),
                          "metrics": MetricRecord({"num-examples": n, "train-steps": 3, "train-loss": 0.1})})
    return Message(content, reply_to=instr)


def weights(w, b):
    return {"w": np.array(w, np.float32), "b": np.array([b], np.float32)}


def strategy(**kw) -> UnlearningFedAvg:
    return UnlearningFedAvg(NODES, **kw)


def start_round(s: UnlearningFedAvg, rnd: int) -> list[Message]:
    return list(s.configure_train(rnd, to_record(GLOBAL), ConfigRecord(), grid=None))


def test_ordinary_round_is_fedavg_over_active_clients():
    s = strategy(method=make_method("puf"), departing=[2], departure_round=3)
    msgs = start_round(s, 1)
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(NODES.values())  # departing one still trains
    out, metrics = s.aggregate_train(1, [reply(0, weights([3, 2], 0.5), 1), reply(1, weights([1, 4], 1.5), 1), reply(2, weights([2, 0], 1.0), 2)])
    got = to_weights(out)
    np.testing.assert_allclose(got["w"], [2.0, 1.5])  # (3 + 1 + 2*2)/4, (2 + 4 + 0)/4
    np.testing.assert_allclose(got["b"], [1.0])
    assert metrics["num-examples"] == 4 and metrics["train-steps"] == 9


def test_unlearning_round_applies_puf_and_removes_the_client():
    s = strategy(method=make_method("puf", {"puf.scale": 2.0}), departing=[2], departure_round=2)
    start_round(s, 1)
    s.aggregate_train(1, [reply(c, GLOBAL, 1) for c in NODES])
    msgs = start_round(s, 2)
    assert {m.metadata.message_type for m in msgs} == {MessageType.TRAIN} and len(msgs) == 3
    rep = [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1), reply(2, weights([1, 4], 1.5), 2)]
    out, _ = s.aggregate_train(2, rep)
    expected = puf_update(GLOBAL, [ClientUpdate(0, weights([2, 2], 0.5), 1), ClientUpdate(1, weights([1, 2], 0.5), 1)],
                          [ClientUpdate(2, weights([1, 4], 1.5), 2)], eta=2.0)
    for k in GLOBAL:
        np.testing.assert_allclose(to_weights(out)[k], expected[k])
    np.testing.assert_allclose(to_weights(out)["w"], [1.25, 0.0])  # by hand: w + 1/4 (1,0) - 2 * 2/4 (0,2)
    assert s.departed == {2} and s.pending == ()
    assert sorted(m.metadata.dst_node_id for m in start_round(s, 3)) == [NODES[0], NODES[1]]


def test_special_variant_only_asks_departing_clients():
    s = strategy(method=make_method("puf", {"puf.variant": "special"}), departing=[0, 1], departure_round=1)
    msgs = start_round(s, 1)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [NODES[0], NODES[1]]
    out, _ = s.aggregate_train(1, [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 3], 0.5), 1)])
    # eta = 2, N_U = 2: w - 2 * ((1,0) + (0,1)) / 2 = (0, 1)
    np.testing.assert_allclose(to_weights(out)["w"], [0.0, 1.0])
    assert s.remaining == [2]


@pytest.mark.parametrize("bad, msg", [
    (weights([np.nan, 1.0], 0.5), "NaN/inf"),
    ({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}, "shape"),
    ({"w": np.zeros(2, np.float32)}, "missing"),
])
def test_bad_update_raises_and_changes_nothing(bad, msg):
    s = strategy(method=make_method("puf"), departing=[2], departure_round=1)
    start_round(s, 1)
    before = (set(s.departed), s.pending, {k: v.copy() for k, v in s._global.items()})
    with pytest.raises(InvalidUpdateError, match=msg):
        s.aggregate_train(1, [reply(0, GLOBAL, 1), reply(1, bad, 1), reply(2, GLOBAL, 1)])
    assert (set(s.departed), s.pending) == before[:2]
    for k in GLOBAL:
        np.testing.assert_array_equal(s._global[k], before[2][k])


def test_missing_departing_reply_leaves_the_request_pending():
    s = strategy(method=make_method("puf"), departing=[2], departure_round=1)
    start_round(s, 1)
    with pytest.raises(RuntimeError, match=r"departing client\(s\) \[2\] did not reply"):
        s.aggregate_train(1, [reply(0, GLOBAL, 1), reply(1, GLOBAL, 1)])
    assert s.pending == (2,) and s.departed == set()


@pytest.mark.parametrize("kw, msg", [
    ({"method": make_method("puf"), "departing": [7], "departure_round": 2}, r"unknown client id\(s\) \[7\]"),
    ({"excluded": [5]}, "unknown client"),
    ({"departing": [1]}, "need an unlearning method"),
    ({"excluded": [0, 1, 2]}, "no client would remain"),
])
def test_impossible_strategies_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        strategy(**kw)


def test_fine_tune_round_does_not_contact_departing_clients():
    s = strategy(method=make_method("fine-tune"), departing=[2], departure_round=1)
    msgs = start_round(s, 1)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [NODES[0], NODES[1]]
    out, _ = s.aggregate_train(1, [reply(0, weights([3, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1)])
    np.testing.assert_allclose(to_weights(out)["w"], [2.0, 2.0])
    assert s.departed == {2}


def test_not_sends_the_negated_model_and_reports_motion_from_the_round_start():
    g = {"net.1.weight": np.ones((2, 2), np.float32), "net.1.bias": np.ones(2, np.float32),
         "net.3.weight": np.ones((1, 2), np.float32)}
    s = strategy(method=make_method("not"), departing=[2], departure_round=1)
    msgs = list(s.configure_train(1, to_record(g), ConfigRecord(), grid=None))
    assert len(msgs) == 2
    sent = to_weights(msgs[0].content["arrays"])
    np.testing.assert_array_equal(sent["net.1.weight"], -np.ones((2, 2)))
    np.testing.assert_array_equal(sent["net.3.weight"], np.ones((1, 2)))
    out, _ = s.aggregate_train(1, [reply(0, sent, 1), reply(1, sent, 1)])  # clients did not move
    np.testing.assert_array_equal(to_weights(out)["net.1.weight"], -np.ones((2, 2)))
    share = {l["layer"]: l["motion-share"] for l in s.unlearning_report["layers"]}
    assert share["net.1"] == pytest.approx(1.0) and share["net.3"] == 0.0


def test_sample_deletion_round_asks_both_roles_and_the_client_stays_on_retained_data():
    s = strategy(method=make_method("puf", {"puf.scale": 2.0}), departing=[2], departure_round=2, leave=False)
    start_round(s, 1)
    s.aggregate_train(1, [reply(c, GLOBAL, 1) for c in NODES])
    msgs = {m.metadata.dst_node_id: m for m in start_round(s, 2)}
    assert len(msgs) == 3  # one message per node, even with two roles
    cfg2 = msgs[NODES[2]].content["config"]
    assert cfg2["roles"] == "retain,forget" and cfg2["data-part"] == "retain"
    assert "roles" not in msgs[NODES[0]].content["config"] and msgs[NODES[0]].content["config"]["data-part"] == "all"
    both = RecordDict({"arrays": to_record(weights([1, 2], 0.5)), "metrics": MetricRecord({"num-examples": 1}),
                       "forget-arrays": to_record(weights([1, 4], 1.5)), "forget-metrics": MetricRecord({"num-examples": 2})})
    rep = [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1),
           Message(both, reply_to=Message(RecordDict(), NODES[2], MessageType.TRAIN))]
    out, metrics = s.aggregate_train(2, rep)
    expected = puf_update(GLOBAL, [ClientUpdate(0, weights([2, 2], 0.5), 1), ClientUpdate(1, weights([1, 2], 0.5), 1),
                                   ClientUpdate(2, weights([1, 2], 0.5), 1)],
                          [ClientUpdate(2, weights([1, 4], 1.5), 2)], eta=2.0)
    for k in GLOBAL:
        np.testing.assert_allclose(to_weights(out)[k], expected[k])
    assert metrics["num-examples"] == 5  # both roles' examples count
    assert s.departed == set() and s.retain_only == {2} and s.pending == ()
    later = {m.metadata.dst_node_id: m for m in start_round(s, 3)}
    assert len(later) == 3 and later[NODES[2]].content["config"]["data-part"] == "retain"


def test_replies_with_records_that_were_not_asked_for_are_refused():
    s = strategy(method=make_method("puf"), departing=[2], departure_round=3)
    start_round(s, 1)
    sneaky = RecordDict({"arrays": to_record(GLOBAL), "metrics": MetricRecord({"num-examples": 1}),
                         "forget-arrays": to_record(GLOBAL), "forget-metrics": MetricRecord({"num-examples": 1})})
    with pytest.raises(InvalidUpdateError, match="exactly the records"):
        s.aggregate_train(1, [reply(0, GLOBAL, 1), reply(1, GLOBAL, 1),
                              Message(sneaky, reply_to=Message(RecordDict(), NODES[2], MessageType.TRAIN))])
    assert s.pending == (2,) and s.departed == set()


def test_multi_round_method_keeps_the_request_pending_until_done():
    s = strategy(method=make_method("retrain"), departing=[2], departure_round=3)
    for rnd in (1, 2):
        start_round(s, rnd)
        s.aggregate_train(rnd, [reply(c, GLOBAL, 1) for c in NODES])
    for rnd, seed_round in ((3, 1), (4, 2)):
        msgs = start_round(s, rnd)
        assert sorted(m.metadata.dst_node_id for m in msgs) == [NODES[0], NODES[1]]
        assert msgs[0].content["config"]["seed-round"] == seed_round
        assert s.is_unlearning_round(rnd) and not s.unlearning_done
        s.aggregate_train(rnd, [reply(0, GLOBAL, 1), reply(1, GLOBAL, 1)])
    assert s.unlearning_done and s.departed == {2} and s.unlearning_rounds_run == 2
