"""The query messages' codecs: what one side writes the other reads back; what a hostile node sends is refused."""

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fed_unlearn import protocol as P
from fed_unlearn.deletion import DeletionRequest
from fed_unlearn.flower import wire

TIER = "integration"  # see tests/conftest.py (imports Flower's records, nothing else of it)


def test_forget_request_and_receipt_round_trip():
    d = DeletionRequest(scenario="samples", selection="high-loss", fraction=0.25, forget_class=3)
    request, seed = wire.read_forget_request(wire.forget_request(d, seed=7))
    assert (request, seed) == (d, 7)
    assert wire.read_forget_request(wire.forget_request(d))[1] is None  # no seed: the node's own
    receipt = wire.read_forget_reply(wire.forget_reply(12, 88, "ab" * 32))
    assert receipt == {P.FORGET_N: 12, P.RETAIN_N: 88, P.DIGEST: "ab" * 32}


@pytest.mark.parametrize(
    "metrics, digest, error",
    [
        ({P.FORGET_N: 1.5, P.RETAIN_N: 3}, "d", ValueError),  # a count is whole
        ({P.FORGET_N: -1, P.RETAIN_N: 3}, "d", ValueError),
        ({P.FORGET_N: [1], P.RETAIN_N: 3}, "d", TypeError),
        ({P.FORGET_N: 1, P.RETAIN_N: 3}, 5, TypeError),  # the digest is text
        ({P.RETAIN_N: 3}, "d", KeyError),
    ],
)
def test_a_hostile_receipt_is_refused(metrics, digest, error):
    content = RecordDict({P.METRICS_RECORD: MetricRecord(metrics), P.RECEIPT_RECORD: ConfigRecord({P.DIGEST: digest})})
    with pytest.raises(error):
        wire.read_forget_reply(content)


def test_an_integer_from_a_node_is_a_whole_number_and_never_a_bool():
    assert wire.as_int(3.0) == wire.as_int("3") == 3
    with pytest.raises(TypeError):
        wire.as_int(True)
    with pytest.raises(ValueError):
        wire.as_int(2.5)


def test_info_round_trip_and_a_shape_that_is_no_list():
    data = wire.NodeData(train_n=80, heldout_n=20, num_classes=10, input_shape=(1, 28, 28), architecture="ok")
    assert wire.read_info_reply(wire.info_reply(data)) == data
    bad = wire.info_reply(data)
    bad.metric_records[P.INFO_RECORD][P.INPUT_SHAPE] = 28
    with pytest.raises(TypeError):
        wire.read_info_reply(bad)


def test_identify_reply_without_identity_and_handlers_said_wrongly():
    keys = wire.read_identify_request(wire.identify_request(["partition-id", "site"])[P.CONFIG_RECORD])
    assert keys == ["partition-id", "site"]
    ident, caps = wire.read_identify_reply(wire.identify_reply({"site": "a"}, {P.HANDLERS: [P.FORGET]}))
    assert ident == {"site": "a"} and wire.handlers_of(caps) == [P.FORGET]
    assert wire.read_identify_reply(wire.identify_reply({"site": "a"}))[1] == {}  # a hand-written handler
    with pytest.raises(KeyError):
        wire.read_identify_reply(RecordDict({}))
    assert wire.handlers_of({P.HANDLERS: "query.forget"}) == []  # a string is not a list of handlers


def test_relearn_round_trip():
    assert wire.read_relearn_request(wire.relearn_request(0.9, 50)) == (0.9, 50)
    assert wire.read_relearn_reply(wire.relearn_reply(17, True, 0.1, 0.95)) == (17.0, True)


def test_calibrate_request_and_reply_round_trip():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    base = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    direction = ArrayRecord({"w": Array(np.full(3, -0.5))})
    sent = wire.calibrate_request(wire.CalibrateRequest(base, direction, (0.0, 0.5, 1.0)), {P.FORGET_ALL: True})
    got = wire.read_calibrate_request(sent)
    assert got.scales == (0.0, 0.5, 1.0) and got.pre_request is None
    assert np.array_equal(got.direction["w"].numpy(), np.full(3, -0.5))
    assert sent.config_records[P.CONFIG_RECORD][P.FORGET_ALL] is True
    stats = {"forget-loss-sum": [1.0, 2.0], "forget-n": [4.0]}
    assert wire.read_calibrate_reply(wire.calibrate_reply(stats)) == stats
    with pytest.raises(KeyError):
        wire.read_calibrate_reply(RecordDict({"other": MetricRecord({"x": 1})}))


def test_support_round_trip_counts_labels_and_refuses_what_is_no_count():
    assert wire.read_support_reply(wire.support_reply([0, 2, 2, 5])) == [1.0, 0.0, 2.0, 0.0, 0.0, 1.0]
    assert wire.read_support_reply(wire.support_reply([1], num_classes=4)) == [0.0, 1.0, 0.0, 0.0]
    assert wire.read_support_reply(wire.support_reply([])) == []
    assert P.SERVER_ROUND in wire.support_request({P.SERVER_ROUND: 3}).config_records[P.CONFIG_RECORD]

    def reply(counts):
        return RecordDict({P.SUPPORT_RECORD: MetricRecord({P.LABEL_COUNTS: counts})})

    with pytest.raises(ValueError):
        wire.read_support_reply(reply([1.0, -2.0]))
    with pytest.raises(ValueError):
        wire.read_support_reply(reply([0.5]))
    with pytest.raises(ValueError):
        wire.read_support_reply(reply(3))  # one number is not a list of counts
    with pytest.raises(ValueError, match="at most"):
        wire.read_support_reply(reply([0] * (wire.MAX_CLASSES + 1)))
    with pytest.raises(KeyError):
        wire.read_support_reply(RecordDict({"other": MetricRecord({"x": 1})}))
    assert wire.read_support_reply(reply([3, 2]), at_most=5) == [3.0, 2.0]
    with pytest.raises(ValueError, match="more than the 4 examples it declared"):
        wire.read_support_reply(reply([3, 2]), at_most=4)
