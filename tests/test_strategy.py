"""The Unlearning strategy wrapper driven with hand-made Flower messages (no Ray, no SuperLink)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fed_unlearn.aggregation import ClientUpdate
from fed_unlearn.deletion import DeletionRequest
from fed_unlearn.flower import ReproducibleFedAvg, Unlearning, UnlearningFedAvg, to_record, to_weights
from fed_unlearn.unlearning import make_method
from fed_unlearn.unlearning.puf import puf_update

TIER = "integration"  # see tests/conftest.py

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
NODES = {0: 9001, 1: 9002, 2: 9003}  # client id (partition-id) -> Flower node id
GLOBAL = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.5], np.float32)}


class StaticGrid(Grid):
    """A grid that only lists its nodes (the tests deliver replies by hand)."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)
        self.sent = 0
        self.exchanges = 0
        self.ids = True  # False: a grid that leaves its messages without ids

    def number(self, messages) -> list[Message]:
        """``messages`` given distinct ids, as Flower's grids do when they push them."""
        out = list(messages)
        self.exchanges += 1
        for m in out:
            self.sent += 1
            if self.ids:
                m.metadata.__dict__["_message_id"] = f"m{self.sent}"
        return out

    def set_run(self, run):  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id, message_type)

    def get_node_ids(self):  # noqa: D102
        return list(self.nodes)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        raise NotImplementedError


GRID = StaticGrid(NODES.values())


def reply(cid: int, w, n: int, mtype: str = MessageType.TRAIN, extra: dict | None = None) -> Message:
    instr = Message(RecordDict(), NODES[cid], mtype)
    content = RecordDict(
        {
            "arrays": ArrayRecord(array_dict={}) if w is None else to_record(w),
            "metrics": MetricRecord({"num-examples": n, "train-steps": 3, "train-loss": 0.1, **(extra or {})}),
        }
    )
    return Message(content, reply_to=instr)


def weights(w, b, dtype=np.float32):
    return {"w": np.array(w, dtype), "b": np.array([b], dtype)}


def strategy(method="puf", **kw) -> Unlearning:
    kw.setdefault("calibrate", False)  # the methods' own rules; calibration has its own test
    s = Unlearning(
        ReproducibleFedAvg(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1),
        make_method(method) if isinstance(method, str) else method,
        **kw,
    )
    for c, n in NODES.items():
        s.set_identity(n, **{"partition-id": c})
    return s


def start_round(s: Unlearning, rnd: int, grid: Grid = GRID) -> list[Message]:
    return list(s.configure_train(rnd, to_record(GLOBAL), ConfigRecord(), grid))


def by_node(msgs: list[Message]) -> dict[int, Message]:
    return {m.metadata.dst_node_id: m for m in msgs}


def test_ordinary_round_is_the_wrapped_fedavg_over_every_node():
    s = strategy()
    s.request_unlearning(2, round=3)
    msgs = start_round(s, 1)
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(NODES.values())  # the departing one still trains
    assert {m.metadata.message_type for m in msgs} == {MessageType.TRAIN}
    out, metrics = s.aggregate_train(
        1, [reply(0, weights([3, 2], 0.5), 1), reply(1, weights([1, 4], 1.5), 1), reply(2, weights([2, 0], 1.0), 2)]
    )
    got = to_weights(out)
    np.testing.assert_allclose(got["w"], [2.0, 1.5])  # (3 + 1 + 2*2)/4, (2 + 4 + 0)/4
    np.testing.assert_allclose(got["b"], [1.0])
    # the wrapped FedAvg's weighted means, plus the federation roll-up
    assert metrics["train-loss"] == pytest.approx(0.1) and metrics["train-steps"] == pytest.approx(3)
    assert metrics["total-examples"] == 4 and metrics["total-train-steps"] == 9 and metrics["clients"] == 3


def test_unlearning_round_applies_puf_and_the_departed_node_receives_nothing_after():
    s = strategy(make_method("puf", {"puf.scale": 2.0}))
    s.request_unlearning(2, round=2)  # named by its node-config partition-id
    start_round(s, 1)
    s.aggregate_train(1, [reply(c, GLOBAL, 1) for c in NODES])
    msgs = start_round(s, 2)
    assert {m.metadata.message_type for m in msgs} == {MessageType.TRAIN} and len(msgs) == 3
    rep = [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1), reply(2, weights([1, 4], 1.5), 2)]
    out, _ = s.aggregate_train(2, rep)
    expected = puf_update(
        GLOBAL,
        [ClientUpdate(0, weights([2, 2], 0.5), 1), ClientUpdate(1, weights([1, 2], 0.5), 1)],
        [ClientUpdate(2, weights([1, 4], 1.5), 2)],
        eta=2.0,
    )
    for k in GLOBAL:
        np.testing.assert_allclose(to_weights(out)[k], expected[k])
    np.testing.assert_allclose(to_weights(out)["w"], [1.25, 0.0])  # by hand: w + 1/4 (1,0) - 2 * 2/4 (0,2)
    assert s.departed == {NODES[2]} and s.pending == () and s.unlearning_done
    assert sorted(m.metadata.dst_node_id for m in start_round(s, 3)) == [NODES[0], NODES[1]]
    evals = s.configure_evaluate(3, to_record(GLOBAL), ConfigRecord(), GRID)
    assert NODES[2] not in {m.metadata.dst_node_id for m in evals}
    # the wrapped FedAvg keeps its minimums reachable without the departed node
    assert s.strategy.min_available_nodes == 1


def test_special_variant_only_asks_departing_clients():
    s = strategy(make_method("puf", {"puf.variant": "special"}))
    s.request_unlearning(0, 1, round=1)
    msgs = start_round(s, 1)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [NODES[0], NODES[1]]
    out, _ = s.aggregate_train(1, [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 3], 0.5), 1)])
    # eta = 2, N_U = 2: w - 2 * ((1,0) + (0,1)) / 2 = (0, 1)
    np.testing.assert_allclose(to_weights(out)["w"], [0.0, 1.0])
    assert s.departed == {NODES[0], NODES[1]}


@pytest.mark.parametrize(
    "bad, problem",
    [
        (weights([np.nan, 1.0], 0.5), "NaN/inf"),
        ({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}, "shape"),
        ({"w": np.zeros(2, np.float32)}, "missing"),
        (weights([1, 2], 0.5, np.complex64), "not a real number"),
    ],
)
def test_a_bad_update_costs_its_node_the_round_never_the_round(bad, problem):
    s = strategy(max_strikes=2)
    start_round(s, 1)
    out, metrics = s.aggregate_train(
        1, [reply(0, weights([3, 2], 0.5), 1), reply(1, bad, 1), reply(2, weights([1, 2], 0.5), 1)]
    )
    np.testing.assert_allclose(to_weights(out)["w"], [2.0, 2.0])  # FedAvg over nodes 0 and 2 only
    assert problem in s.last_round_problems[NODES[1]] and metrics["clients"] == 2
    assert s.strikes[NODES[1]] == 1 and not s.excluded
    start_round(s, 2)
    s.aggregate_train(2, [reply(0, GLOBAL, 1), reply(1, bad, 1), reply(2, GLOBAL, 1)])
    assert s.excluded == {NODES[1]}  # second strike: out of the federation
    assert sorted(m.metadata.dst_node_id for m in start_round(s, 3)) == [NODES[0], NODES[2]]


def test_claimed_examples_are_capped_at_what_the_node_declared():
    s = strategy(max_update_ratio=None)  # the cap alone (by default this update is refused as an outlier)
    for c in NODES:
        s.declare_examples(NODES[c], 10)
    start_round(s, 1)
    out, _ = s.aggregate_train(
        1,
        [
            reply(0, weights([0, 0], 0.0), 10),
            reply(1, weights([0, 0], 0.0), 10),
            reply(2, weights([1e6, 1e6], 1e6), 10**12),
        ],
    )
    # the attacker weighs what it declared (a third), not 10**12 / (10**12 + 20)
    np.testing.assert_allclose(to_weights(out)["w"], [1e6 / 3] * 2, rtol=1e-6)


def test_without_declarations_a_sudden_claim_is_capped_at_twice_the_nodes_largest_before():
    s = strategy(max_update_ratio=None)
    start_round(s, 1)
    s.aggregate_train(1, [reply(c, GLOBAL, 10) for c in NODES])  # what each node held in its first round
    start_round(s, 2)
    out, _ = s.aggregate_train(
        2,
        [reply(0, weights([0, 0], 0.0), 10), reply(1, weights([0, 0], 0.0), 10), reply(2, weights([3, 3], 3), 10**12)],
    )
    # capped at 20: the attacker weighs half, not 10**12 / (10**12 + 20)
    np.testing.assert_allclose(to_weights(out)["w"], [1.5, 1.5], rtol=1e-6)
    assert s.claimed[NODES[2]] == 20


@pytest.mark.parametrize("value", [1e38, 1e300])
def test_a_finite_but_absurd_update_costs_its_node_the_round_and_the_model_stays_finite(value):
    s = strategy()
    start_round(s, 1)
    dtype = np.float64 if value > 1e38 else np.float32
    out, _ = s.aggregate_train(
        1,
        [
            reply(0, weights([1, 2], 0.5), 10),
            reply(1, weights([1, 2], 0.5), 10),
            reply(2, weights([value] * 2, value, dtype), 10),
        ],
    )
    np.testing.assert_allclose(to_weights(out)["w"], [1.0, 2.0])
    assert s.strikes[NODES[2]] == 1 and s.last_round_problems[NODES[2]] != "ok"


def test_a_federation_whose_every_client_is_excluded_stops_with_one_line():
    s = strategy(max_strikes=1)
    s.restore(excluded=list(NODES.values()))
    with pytest.raises(RuntimeError, match="every connected client has left or was excluded"):
        start_round(s, 1)


def test_missing_departing_reply_raises_or_leaves_the_request_pending():
    s = strategy()
    s.request_unlearning(2, round=1)
    start_round(s, 1)
    with pytest.raises(RuntimeError, match="did not reply"):
        s.aggregate_train(1, [reply(0, GLOBAL, 1), reply(1, GLOBAL, 1)])
    assert s.pending == (NODES[2],) and s.departed == set()
    skip = strategy(on_missing="skip")
    skip.request_unlearning(2, round=1)
    start_round(skip, 1)
    out, _ = skip.aggregate_train(1, [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([0, 2], 0.5), 1)])
    np.testing.assert_allclose(to_weights(out)["w"], [1.0, 2.0])  # an ordinary round over the others
    assert skip.failed == (NODES[2],) and skip.pending == () and skip.departed == set()


def test_impossible_requests_are_refused():
    s = strategy()
    s.request_unlearning(7, round=1)
    with pytest.raises(ValueError, match=r"no connected node has partition-id=7"):
        start_round(s, 1)
    everyone = strategy()
    everyone.request_unlearning(0, 1, 2, round=1)
    with pytest.raises(ValueError, match="no client would remain"):
        start_round(everyone, 1)
    with pytest.raises(ValueError, match="no unlearning method"):
        strategy(None).request_unlearning(1)
    with pytest.raises(ValueError, match="already wrapped"):
        Unlearning(strategy())


def test_fine_tune_round_does_not_contact_departing_clients():
    s = strategy("fine-tune")
    s.request_unlearning(2, round=1)
    msgs = start_round(s, 1)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [NODES[0], NODES[1]]
    out, _ = s.aggregate_train(1, [reply(0, weights([3, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1)])
    np.testing.assert_allclose(to_weights(out)["w"], [2.0, 2.0])
    assert s.departed == {NODES[2]}


def test_not_sends_the_negated_model_and_reports_motion_from_the_round_start():
    g = {
        "net.1.weight": np.ones((2, 2), np.float32),
        "net.1.bias": np.ones(2, np.float32),
        "net.3.weight": np.ones((1, 2), np.float32),
    }
    s = strategy("not")
    s.request_unlearning(2, round=1)
    msgs = list(s.configure_train(1, to_record(g), ConfigRecord(), GRID))
    assert len(msgs) == 2
    sent = to_weights(msgs[0].content["arrays"])
    np.testing.assert_array_equal(sent["net.1.weight"], -np.ones((2, 2)))
    np.testing.assert_array_equal(sent["net.3.weight"], np.ones((1, 2)))
    out, _ = s.aggregate_train(1, [reply(0, sent, 1), reply(1, sent, 1)])  # clients did not move
    np.testing.assert_array_equal(to_weights(out)["net.1.weight"], -np.ones((2, 2)))
    assert s.unlearning_report is not None
    share = {layer["layer"]: layer["motion-share"] for layer in s.unlearning_report["layers"]}
    assert share["net.1"] == pytest.approx(1.0) and share["net.3"] == 0.0


def test_sample_deletion_round_asks_both_roles_and_the_client_stays_on_retained_data():
    s = strategy(make_method("puf", {"puf.scale": 2.0}))
    s.request_unlearning(2, round=2, leave=False, deletion=DeletionRequest("samples"), send_request=False)
    start_round(s, 1)
    s.aggregate_train(1, [reply(c, GLOBAL, 1) for c in NODES])
    msgs = by_node(start_round(s, 2))
    assert len(msgs) == 3  # one message per node, even with two roles
    assert msgs[NODES[2]].metadata.message_type == "train.unlearn"
    cfg2 = msgs[NODES[2]].content["config"]
    assert cfg2["roles"] == "retain,forget" and cfg2["unlearn-method"] == "puf" and cfg2["puf.scale"] == 2.0
    assert msgs[NODES[0]].metadata.message_type == MessageType.TRAIN and "roles" not in msgs[NODES[0]].content["config"]
    both = RecordDict(
        {
            "arrays": to_record(weights([1, 2], 0.5)),
            "metrics": MetricRecord({"num-examples": 1}),
            "forget-arrays": to_record(weights([1, 4], 1.5)),
            "forget-metrics": MetricRecord({"num-examples": 2}),
        }
    )
    rep = [
        reply(0, weights([2, 2], 0.5), 1),
        reply(1, weights([1, 2], 0.5), 1),
        Message(both, reply_to=Message(RecordDict(), NODES[2], "train.unlearn")),
    ]
    out, metrics = s.aggregate_train(2, rep)
    expected = puf_update(
        GLOBAL,
        [
            ClientUpdate(0, weights([2, 2], 0.5), 1),
            ClientUpdate(1, weights([1, 2], 0.5), 1),
            ClientUpdate(2, weights([1, 2], 0.5), 1),
        ],
        [ClientUpdate(2, weights([1, 4], 1.5), 2)],
        eta=2.0,
    )
    for k in GLOBAL:
        np.testing.assert_allclose(to_weights(out)[k], expected[k])
    assert metrics["total-examples"] == 5  # both roles' examples count
    assert s.departed == set() and s.retain_only == {NODES[2]} and s.pending == ()
    later = by_node(start_round(s, 3))
    assert len(later) == 3 and later[NODES[2]].metadata.message_type == "train.retain"


def test_replies_with_records_that_were_not_asked_for_are_dropped():
    s = strategy()
    s.request_unlearning(2, round=3)
    start_round(s, 1)
    sneaky = RecordDict(
        {
            "arrays": to_record(GLOBAL),
            "metrics": MetricRecord({"num-examples": 1}),
            "forget-arrays": to_record(GLOBAL),
            "forget-metrics": MetricRecord({"num-examples": 1}),
        }
    )
    out, metrics = s.aggregate_train(
        1,
        [
            reply(0, GLOBAL, 1),
            reply(1, GLOBAL, 1),
            Message(sneaky, reply_to=Message(RecordDict(), NODES[2], MessageType.TRAIN)),
        ],
    )
    assert out is not None and metrics["clients"] == 2 and "exactly one ArrayRecord" in s.last_round_problems[NODES[2]]
    assert s.departed == set()


def test_multi_round_method_keeps_the_request_pending_until_done():
    s = strategy("retrain")
    s.request_unlearning(2, round=3)
    for rnd in (1, 2):
        start_round(s, rnd)
        s.aggregate_train(rnd, [reply(c, GLOBAL, 1) for c in NODES])
    for rnd, seed_round in ((3, 1), (4, 2)):
        msgs = start_round(s, rnd)
        assert sorted(m.metadata.dst_node_id for m in msgs) == [NODES[0], NODES[1]]
        assert msgs[0].content["config"]["seed-round"] == seed_round
        assert s.is_unlearning_round(rnd) and not s.unlearning_done
        s.aggregate_train(rnd, [reply(0, GLOBAL, 1), reply(1, GLOBAL, 1)])
    assert s.unlearning_done and s.departed == {NODES[2]} and s.unlearning_rounds_run == 2


def test_unlearning_fedavg_takes_every_fedavg_argument_and_aggregates_user_metrics():
    agg_calls = []

    def my_aggr(records, key):
        agg_calls.append(len(records))
        return MetricRecord({"mine": 1.0})

    s = UnlearningFedAvg(
        fraction_train=0.5,
        fraction_evaluate=0.5,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=3,
        weighted_by_key="n",
        arrayrecord_key="model",
        configrecord_key="cfg",
        train_metrics_aggr_fn=my_aggr,
        evaluate_metrics_aggr_fn=my_aggr,
        method="puf",
    )
    assert isinstance(s.strategy, FedAvg) and s.strategy.fraction_train == 0.5
    msgs = list(s.configure_train(1, to_record(GLOBAL), ConfigRecord(), GRID))
    assert len(msgs) == 1 and set(msgs[0].content) == {"model", "cfg"}  # half of 3 nodes, the user's record keys
    node = msgs[0].metadata.dst_node_id
    content = RecordDict({"model": to_record(GLOBAL), "m": MetricRecord({"n": 5, "train_loss": 0.3})})
    _, metrics = s.aggregate_train(1, [Message(content, reply_to=Message(RecordDict(), node, MessageType.TRAIN))])
    assert agg_calls == [1] and metrics["mine"] == 1.0 and metrics["total-examples"] == 5


class CalibratingGrid(StaticGrid):
    """Answers query.calibrate like a client whose forget loss is ``a + b c`` and held-out loss is ``h`` at scale c.

    Evaluation messages (the remaining clients' utility) get ``eval_loss`` = ``utility`` (a number, or a function
    of the evaluated weights; no loss when ``None``). With ``rest`` (a function of c) the client also reports the
    accuracy of 100 other held-out samples. Its 10 forget samples are 5 of class 0 and 5 of class 1, each class
    right at a rate ``1 - c``. Asked ``query.support``, a node answers ``labels[node]`` (label counts; a node
    missing from ``labels`` has no such handler and replies with an error).
    """

    def __init__(
        self,
        nodes,
        a: float,
        b: float,
        h: float,
        pre: tuple[float, float] | None = None,
        utility=None,
        rest=None,
        labels: dict[int, list[int]] | None = None,
    ) -> None:
        super().__init__(nodes)
        self.a, self.b, self.h, self.pre, self.utility, self.rest = a, b, h, pre, utility, rest
        self.labels = {n: [100, 100] for n in self.nodes} if labels is None else labels
        self.asked: list[Message] = []
        self.evaluated: list[Message] = []
        self.support: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in self.number(messages):
            if m.metadata.message_type == "query.support":
                self.support.append(m)
                node = m.metadata.dst_node_id
                if node not in self.labels:
                    out.append(Message(Error(0, "no handler for query.support"), reply_to=m))
                else:
                    counts = MetricRecord({"label-counts": list(self.labels[node])})
                    out.append(Message(RecordDict({"support": counts}), reply_to=m))
                continue
            if m.metadata.message_type == "evaluate":
                self.evaluated.append(m)
                u = self.utility(to_weights(m.content["arrays"])) if callable(self.utility) else self.utility
                loss = {} if u is None else u if isinstance(u, dict) else {"eval_loss": float(u)}
                rec = MetricRecord({**loss, "num-examples": 4})
                out.append(Message(RecordDict({"metrics": rec}), reply_to=m))
                continue
            self.asked.append(m)
            scales = list(m.content["config"]["scales"])
            rec = MetricRecord(
                {
                    "forget-loss-sum": [10 * (self.a + self.b * c) for c in scales],
                    "forget-correct": [10.0 * (1 - c) for c in scales],
                    "heldout-loss-sum": [5 * self.h for _ in scales],
                    "forget-n": [10.0],
                    "heldout-n": [5.0],
                    "forget-class-n": [5.0, 5.0],
                    "forget-class-correct": [v for c in scales for v in (5.0 * (1 - c), 5.0 * (1 - c))],
                }
            )
            if self.rest is not None:
                rec.update(
                    {"rest-loss-sum": [30.0] * len(scales), "rest-correct": [100 * self.rest(c) for c in scales]}
                    | {"rest-n": [100.0]}
                )
            if self.pre is not None:  # pre-request mean losses (forget, held-out), every sample alike: se 0
                f, h = self.pre
                rec.update(
                    {
                        "pre-forget-loss-sum": [10 * f],
                        "pre-forget-loss-sq": [10 * f * f],
                        "pre-forget-correct": [10.0],
                        "pre-heldout-loss-sum": [5 * h],
                        "pre-heldout-loss-sq": [5 * h * h],
                        "pre-auc": [0.5],
                        "pre-forget-class-correct": [5.0, 5.0],
                    }
                )
            out.append(Message(RecordDict({"calibration": rec}), reply_to=m))
        return out


@pytest.mark.parametrize("a, b, h, scale", [(0.1, 0.8, 0.5, 0.5), (0.6, 0.8, 0.5, 0.0), (0.1, 0.2, 0.5, 1.0)])
def test_calibration_scales_the_step_to_where_the_forget_set_looks_unseen(a, b, h, scale):
    """Forget loss a + b c, held-out loss h: the step stops at c = (h - a) / b in [0, 1], never beyond the full step."""
    grid = CalibratingGrid(NODES.values(), a, b, h)
    s = strategy(make_method("puf", {"puf.scale": 2.0}), calibrate=True)
    s.request_unlearning(2, round=1)
    start_round(s, 1, grid)
    rem = [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1)]
    out, _ = s.aggregate_train(1, [*rem, reply(2, weights([1, 4], 1.5), 2)])
    full = puf_update(
        GLOBAL,
        [ClientUpdate(0, weights([2, 2], 0.5), 1), ClientUpdate(1, weights([1, 2], 0.5), 1)],
        [ClientUpdate(2, weights([1, 4], 1.5), 2)],
        eta=2.0,
    )
    base = {"w": np.array([1.5, 2.0]), "b": np.array([0.5])}  # the remaining clients' FedAvg step alone
    for k in GLOBAL:
        np.testing.assert_allclose(to_weights(out)[k], base[k] + scale * (full[k] - base[k]), atol=1e-6)
    cal = s.unlearning_report["calibration"]
    assert cal["used"] and cal["scale"] == pytest.approx(scale) and cal["reached"] == (scale < 1.0)
    (asked,) = grid.asked  # only the departing node is asked, with the base model and the step
    assert asked.metadata.dst_node_id == NODES[2] and asked.metadata.message_type == "query.calibrate"
    np.testing.assert_allclose(to_weights(asked.content["direction"])["w"], full["w"] - base["w"], atol=1e-6)


@pytest.mark.parametrize("pre, kept", [((0.5, 0.5), True), ((0.6, 0.5), True), ((0.1, 0.5), False)])
def test_a_model_that_does_not_remember_the_forget_set_is_kept(pre, kept):
    grid = CalibratingGrid(NODES.values(), 0.1, 0.8, 0.5, pre=pre)
    s = strategy(make_method("puf", {"puf.scale": 2.0}), calibrate=True)
    s.request_unlearning(2, round=1)
    start_round(s, 1, grid)
    rem = [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1)]
    out, _ = s.aggregate_train(1, [*rem, reply(2, weights([1, 4], 1.5), 2)])
    cal = s.unlearning_report["calibration"]
    assert cal["kept"] is kept and cal["memorised"] is (not kept)
    (asked,) = grid.asked
    np.testing.assert_allclose(to_weights(asked.content["pre-request"])["w"], GLOBAL["w"])
    if kept:  # the pre-request model stands: not even the remaining clients' round moves it
        for k in GLOBAL:
            np.testing.assert_allclose(to_weights(out)[k], GLOBAL[k])
    else:
        assert cal["scale"] == pytest.approx(0.5)
    assert s.pending == ()  # served either way


def departure_calibrated(grid: Grid, declared: dict[int, float] | None = None) -> dict:
    """Node 2 departs in round 1 under calibrated PUF (nodes declaring ``declared`` examples); the calibration's
    report."""
    s = strategy(make_method("puf", {"puf.scale": 2.0}), calibrate=True)
    for node, n in (declared or {}).items():
        s.declare_examples(node, n)
    s.request_unlearning(2, round=1)
    start_round(s, 1, grid)
    rem = [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1)]
    s.aggregate_train(1, [*rem, reply(2, weights([1, 4], 1.5), 2)])
    return s.unlearning_report["calibration"]


def test_a_class_only_the_departing_client_holds_must_stop_being_predicted_too():
    """The losses look unseen at c = 0.5; class 1 is held by the departing client alone, right at 1 - c: the
    step goes on to where it is at the 0.02 floor (c = 0.98). The clients who stay are asked in the same exchange."""
    labels = {NODES[0]: [100, 0], NODES[1]: [50, 0]}
    grid = CalibratingGrid(NODES.values(), 0.1, 0.8, 0.5, pre=(0.5, 0.5), labels=labels)
    cal = departure_calibrated(grid)
    # the losses alone say nothing was memorised (pre-request 0.5 vs 0.5); the class says otherwise
    assert cal["memorised"] and not cal["kept"] and cal["scale"] == pytest.approx(0.98)
    assert cal["support"]["classes"] == [1] and cal["support"]["label-counts"] == [150.0, 0.0]
    assert cal["unsupported-acc"] == pytest.approx([1 - c for c in cal["scales"]])
    assert {m.metadata.dst_node_id for m in grid.support} == {NODES[0], NODES[1]}  # never the departing node
    assert grid.exchanges == 1  # the label counts rode with the calibration


@pytest.mark.parametrize("labels", [{NODES[0]: [100, 0]}, {NODES[0]: [100, 90], NODES[1]: [50, 0]}])
def test_the_class_rule_needs_every_client_who_stays_and_a_class_they_hold_is_no_target(labels):
    """Node 2 of the clients who stay has no handler (its labels could be the class's support), or the clients
    who stay hold class 1 (90 of 95): the step stops where the losses look unseen."""
    grid = CalibratingGrid(NODES.values(), 0.1, 0.8, 0.5, labels=labels)
    cal = departure_calibrated(grid)
    assert cal["used"] and cal["scale"] == pytest.approx(0.5)
    assert "unsupported-acc" not in cal
    if NODES[1] in labels:
        assert cal["support"]["classes"] == []
    else:
        assert "9002" in cal["support"]["skipped"]


def test_label_counts_beyond_what_a_client_declared_are_refused_and_the_class_rule_skipped():
    """A client who stays claims 10^6 samples of class 0 against the 150 it declared (it could hide that it holds
    class 1, or claim to hold it): its counts are not believed, and without them no class is called unsupported."""
    labels = {NODES[0]: [100, 0], NODES[1]: [1_000_000, 0]}
    cal = departure_calibrated(CalibratingGrid(NODES.values(), 0.1, 0.8, 0.5, labels=labels), {NODES[1]: 150})
    assert cal["scale"] == pytest.approx(0.5) and "unsupported-acc" not in cal
    assert "node 9002" in cal["support"]["skipped"] and "more than the 150" in cal["support"]["skipped"]


class EvaluatingGrid(StaticGrid):
    """Answers evaluate like a remaining client whose loss is ``loss_of(weights)``."""

    def __init__(self, nodes, loss_of) -> None:
        super().__init__(nodes)
        self.loss_of = loss_of
        self.asked: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in self.number(messages):
            self.asked.append(m)
            loss = self.loss_of(to_weights(m.content["arrays"]))
            rec = MetricRecord({"eval_loss": loss, "eval_acc": 0.9, "num-examples": 4})
            out.append(Message(RecordDict({"metrics": rec}), reply_to=m))
        return out


@pytest.mark.parametrize("ids", [True, False])
def test_a_client_without_the_helpers_gets_the_step_the_remaining_clients_evaluation_allows(ids):
    """No query.calibrate: the remaining clients' own evaluate replies bound the step (loss 1 + 0.4 c: c = 0.125).
    On a grid that gives its messages no ids the candidates' replies cannot be told apart in one exchange: each
    candidate then gets its own, with the same result."""
    base = {"w": np.array([1.5, 2.0]), "b": np.array([0.5])}  # the remaining clients' FedAvg step alone
    full = puf_update(
        GLOBAL,
        [ClientUpdate(0, weights([2, 2], 0.5), 1), ClientUpdate(1, weights([1, 2], 0.5), 1)],
        [ClientUpdate(2, weights([1, 4], 1.5), 2)],
        eta=2.0,
    )
    np.testing.assert_allclose(full["w"], [1.25, 0.0])  # PUF's full step

    def loss_of(w):
        return 1.0 + 0.4 * float((w["w"][1] - base["w"][1]) / (full["w"][1] - base["w"][1]))

    grid = EvaluatingGrid(NODES.values(), loss_of)
    grid.ids = ids
    s = strategy(make_method("puf", {"puf.scale": 2.0}), calibrate=True)
    s.capabilities[NODES[2]] = {}  # it answered query.identify with no capabilities: a plain client
    s.request_unlearning(2, round=1)
    start_round(s, 1, grid)
    out, _ = s.aggregate_train(
        1, [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1), reply(2, weights([1, 4], 1.5), 2)]
    )
    cal = s.unlearning_report["calibration"]
    assert cal["rule"] == "remaining-utility" and cal["utility-key"] == "eval_loss"
    assert cal["scale"] == pytest.approx(0.125)
    for k in GLOBAL:
        np.testing.assert_allclose(to_weights(out)[k], base[k] + 0.125 * (full[k] - base[k]), atol=1e-6)
    # only the remaining nodes evaluated the candidates (0, 0.25, ..., 1), with their ordinary evaluate message
    assert {m.metadata.dst_node_id for m in grid.asked} == {NODES[0], NODES[1]}
    assert {m.metadata.message_type for m in grid.asked} == {"evaluate"}
    if ids:  # all five candidates at once: a SuperNode takes them back to back
        assert len(grid.asked) == 2 * 5 and grid.exchanges == 1
    else:  # the combined exchange, then one per candidate
        assert len(grid.asked) == 2 * 5 * 2 and grid.exchanges == 1 + 5


def _extension_case(grid):
    """A request served by PUF whose full step is too short; returns the strategy, its output, base and step."""
    s = strategy(make_method("puf", {"puf.scale": 2.0}), calibrate=True)
    rem = [ClientUpdate(0, weights([2, 2], 0.5), 1), ClientUpdate(1, weights([1, 2], 0.5), 1)]
    full = puf_update(GLOBAL, rem, [ClientUpdate(2, weights([1, 4], 1.5), 2)], eta=2.0)
    base = {"w": np.array([1.5, 2.0]), "b": np.array([0.5])}
    norm = float(np.sqrt(sum(np.sum((full[k] - base[k]) ** 2) for k in GLOBAL)))
    s.restore(last_update_norm=0.5 * norm)  # the bound: 10 x 0.5 x the step = 5 x the step
    s.request_unlearning(2, round=1)
    start_round(s, 1, grid)
    out, _ = s.aggregate_train(
        1, [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1), reply(2, weights([1, 4], 1.5), 2)]
    )
    return s, to_weights(out), base, {k: full[k] - base[k] for k in GLOBAL}


def _scale_of(w, base, step):
    """The c of base + c * step (read from the second weight, which the step moves)."""
    return float((w["w"][1] - base["w"][1]) / step["w"][1])


def test_a_step_too_short_to_reach_the_target_is_extended_up_to_the_departing_step_bound():
    """Forget loss 0.1 + 0.2 c reaches the held-out 0.5 only at c = 2: beyond the full step, within the bound,
    as the remaining clients' accuracy does not change (their loss grows: the accuracy is what the guard reads)."""
    grid = CalibratingGrid(NODES.values(), 0.1, 0.2, 0.5)
    grid.utility = lambda w: {"eval_loss": 1.0 + _scale_of(w, base, step), "eval_acc": 0.9}
    base = {"w": np.array([1.5, 2.0]), "b": np.array([0.5])}
    step = {"w": np.array([-0.25, -2.0])}
    s, out, base, step = _extension_case(grid)
    cal = s.unlearning_report["calibration"]
    assert list(cal["extension"]["guards"]) == ["remaining clients' 'eval_acc' (negated)"]
    assert cal["reached"] and cal["scale"] == pytest.approx(2.0)
    first, second = grid.asked  # a second query with the longer candidates only
    assert list(second.content["config"]["scales"]) == pytest.approx([2.0, 4.0, 5.0])
    assert "pre-request" in first.content and "pre-request" not in second.content
    # the remaining clients evaluated base, the full step and every longer candidate, in one exchange
    assert cal["extension"]["admitted"] == 3 and len(grid.evaluated) == 2 * 5
    assert grid.exchanges == 3  # the forgetting client's two queries, then the remaining clients' evaluation
    for k in GLOBAL:
        np.testing.assert_allclose(out[k], base[k] + 2.0 * step[k], atol=1e-6)


def test_a_longer_step_is_not_taken_when_the_remaining_clients_pay_for_the_full_one():
    """Their loss 1 + 0.1 c: 10 % worse at the full step (tolerance 5 %): nothing beyond it, the walk stops there."""
    grid = CalibratingGrid(NODES.values(), 0.1, 0.2, 0.5)
    grid.utility = lambda w: 1.0 + 0.1 * _scale_of(w, base, step)
    base = {"w": np.array([1.5, 2.0]), "b": np.array([0.5])}
    step = {"w": np.array([-0.25, -2.0])}  # PUF's full step minus base (as above)
    s, out, base_seen, step_seen = _extension_case(grid)
    np.testing.assert_allclose(step_seen["w"], step["w"])
    base, step = base_seen, step_seen
    cal = s.unlearning_report["calibration"]
    assert cal["extension"]["admitted"] == 0 and cal["extension"]["limit"] == 1.0
    assert not cal["reached"] and cal["scale"] == pytest.approx(1.0) and cal["scales"][-1] == 1.0
    # every candidate evaluated in one exchange; the walk reads them up to where the bound is crossed
    assert len(grid.evaluated) == 2 * 5 and grid.exchanges == 3
    for k in GLOBAL:
        np.testing.assert_allclose(out[k], base[k] + step[k], atol=1e-6)


def test_a_longer_step_stops_where_the_forgetting_clients_other_held_out_samples_pay():
    """No remaining-client metric; their other held-out accuracy 1 - 0.01 c^2 stays within 5 % of 1 up to
    c = 2 + 1/6 (linear between the candidates 2 and 4): of 2, 4, 5 only 2 is admitted, the target (c = 3) unreached."""
    grid = CalibratingGrid(NODES.values(), 0.1, 0.2, 0.7, rest=lambda c: 1 - 0.01 * c * c)
    s, out, base, step = _extension_case(grid)
    cal = s.unlearning_report["calibration"]
    ext = cal["extension"]
    assert ext["limit"] == pytest.approx(2 + 2 / 12)
    assert ext["admitted"] == 1 and list(ext["guards"]) == ["forgetting clients' other held-out accuracy (negated)"]
    assert cal["scales"][-1] == 2.0 and not cal["reached"] and cal["scale"] == pytest.approx(2.0)
    for k in GLOBAL:
        np.testing.assert_allclose(out[k], base[k] + 2.0 * step[k], atol=1e-6)


def test_without_any_measurement_of_what_stays_no_step_beyond_the_method_own_is_taken():
    """Neither a remaining-client loss nor other held-out samples: no evidence a longer step is harmless."""
    grid = CalibratingGrid(NODES.values(), 0.1, 0.2, 0.5)
    s, out, base, step = _extension_case(grid)
    cal = s.unlearning_report["calibration"]
    assert cal["extension"]["guards"] == {} and cal["extension"]["admitted"] == 0
    assert cal["scale"] == pytest.approx(1.0) and not cal["reached"]


def test_when_every_node_is_forgetting_nobody_is_asked_to_evaluate_and_nothing_waits(monkeypatch):
    """A class removed from every client: no node remains to evaluate a candidate (the utility bound's and the longer
    step's guard); the wrapped strategy's sampling would wait for one forever."""
    import flwr.serverapp.strategy.strategy_utils as su

    def no_wait(_):
        raise AssertionError("the strategy waited for a node to connect")

    monkeypatch.setattr(su, "sleep", no_wait)
    s = strategy()
    s.request_unlearning(
        0, 1, 2, round=1, leave=False, deletion=DeletionRequest("class", forget_class=0), send_request=False
    )
    start_round(s, 1)
    assert set(s.pending) == set(NODES.values())
    assert s._evaluate_template(GRID, to_record(GLOBAL)) == []


def test_the_utility_bound_reads_an_accuracy_as_higher_is_better():
    """utility_key='eval_acc', accuracy 0.9 - 0.2 c on the remaining clients: 5 % below 0.9 is reached at c = 0.225."""
    base = {"w": np.array([1.5, 2.0]), "b": np.array([0.5])}
    step = {"w": np.array([-0.25, -2.0])}

    class AccuracyGrid(EvaluatingGrid):
        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for m in self.number(messages):
                self.asked.append(m)
                acc = 0.9 - 0.2 * _scale_of(to_weights(m.content["arrays"]), base, step)
                rec = MetricRecord({"eval_loss": 1.0, "eval_acc": acc, "num-examples": 4})
                out.append(Message(RecordDict({"metrics": rec}), reply_to=m))
            return out

    grid = AccuracyGrid(NODES.values(), lambda w: 0.0)
    s = strategy(make_method("puf", {"puf.scale": 2.0}), calibrate=True, utility_key="eval_acc")
    s.capabilities[NODES[2]] = {}  # a plain client: no query.calibrate
    s.request_unlearning(2, round=1)
    start_round(s, 1, grid)
    s.aggregate_train(
        1, [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1), reply(2, weights([1, 4], 1.5), 2)]
    )
    cal = s.unlearning_report["calibration"]
    assert cal["rule"] == "remaining-utility" and cal["utility-key"] == "eval_acc"
    assert cal["scale"] == pytest.approx(0.225)
    assert cal["utility"] == pytest.approx([0.9, 0.85, 0.8, 0.75, 0.7])  # as the clients reported them


class PushingGrid(CalibratingGrid):
    """A :class:`CalibratingGrid` that also takes pushed messages, answering them at once (training messages with
    an empty reply) and handing the replies out by message id, as a deployment's SuperLink does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: dict[str, Message] = {}
        self.pushes: list[list[tuple[str, int]]] = []

    def push_messages(self, messages):
        msgs = list(messages)
        self.pushes.append([(m.metadata.message_type, m.metadata.dst_node_id) for m in msgs])
        train = [m for m in self.number([m for m in msgs if m.metadata.message_type == "train"])]
        for m in train:
            self.replies[m.metadata.message_id] = Message(RecordDict(), reply_to=m)
        for r in self.send_and_receive([m for m in msgs if m.metadata.message_type != "train"]):
            self.replies[r.metadata.reply_to_message_id] = r
        return [m.metadata.message_id for m in msgs]

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.mark.parametrize("trained", [True, False])
def test_where_queries_ride_behind_training_the_label_counts_go_right_behind_it(trained):
    """On a grid that pushes queries behind an exchange (a deployed service's), the clients who stay are asked for
    their label counts right behind the unlearning round's training: the calibration's exchange asks the departing
    node alone, with the same outcome as asking everyone in that exchange. No training exchange (a loop of its
    own): the counts ride with the calibration, and the waiting rider is dropped."""
    from fed_unlearn.flower.grid import RidingGrid

    labels = {NODES[0]: [100, 0], NODES[1]: [50, 0]}
    inner = PushingGrid(NODES.values(), 0.1, 0.8, 0.5, pre=(0.5, 0.5), labels=labels)
    grid = RidingGrid(inner, lambda: ())
    s = strategy(make_method("puf", {"puf.scale": 2.0}), calibrate=True)
    s.request_unlearning(2, round=1)
    msgs = start_round(s, 1, grid)
    if trained:
        grid.send_and_receive(msgs)  # the round's training exchange
        assert inner.pushes[1] == [("query.support", NODES[0]), ("query.support", NODES[1])]
    rem = [reply(0, weights([2, 2], 0.5), 1), reply(1, weights([1, 2], 0.5), 1)]
    s.aggregate_train(1, [*rem, reply(2, weights([1, 4], 1.5), 2)])
    cal = s.unlearning_report["calibration"]
    assert cal["scale"] == pytest.approx(0.98) and cal["support"]["classes"] == [1]
    assert cal["support"]["label-counts"] == [150.0, 0.0] and cal["support"].get("ahead", False) is trained
    assert [m.metadata.dst_node_id for m in inner.asked] == [NODES[2]]  # the calibration: the departing node
    assert len(inner.support) == 2 and grid.cancel_riders("support") == []
