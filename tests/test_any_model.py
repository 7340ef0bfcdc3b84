"""The wrapper on the models and strategies federations run: BatchNorm, half precision, 0-dim arrays, DP.

A user's own app (tests/any_model_app.py, plain Flower code) on the in-process grid, bare
and wrapped, under Flower's own ``Strategy.start()``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedTrimmedAvg,
    Krum,
)

from fed_unlearn.flower import InProcessGrid, SetupError, Unlearning, add_identity, to_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
import any_model_app as user  # noqa: E402

TIER = "integration"  # see tests/conftest.py

NODES = 4


def fedavg(**kw):
    return FedAvg(min_available_nodes=NODES, **kw)


STRATEGIES = {
    "fedavg": lambda: fedavg(),
    "fedadam": lambda: FedAdam(eta=0.01, eta_l=0.1, min_available_nodes=NODES),
    "fedtrimmedavg": lambda: FedTrimmedAvg(beta=0.25, min_available_nodes=NODES),
    "krum": lambda: Krum(num_malicious_nodes=0, min_available_nodes=NODES),
}


def app_with_identity():
    add_identity(user.app)  # registers query.identify once (a second call leaves the app as it is)
    return user.app


class WireGrid(InProcessGrid):
    """Records the dtype of every array of every training message sent, by round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wire: dict[int, set[str]] = {}

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type.startswith("train") and "arrays" in m.content.array_records:
                rnd = int(m.content["config"]["server-round"])
                self.wire.setdefault(rnd, set()).update(a.dtype for a in m.content["arrays"].values())
        return super().push_messages(messages)


def start(strategy, dtype: str = "float32", rounds: int = 3, extra: dict | None = None, snapshots=None, grid=None):
    random.seed(0)
    grid = grid or InProcessGrid(app_with_identity(), NODES, {"dtype": dtype, **(extra or {})})
    initial = user.to_record(user.make_model(dtype), dtype)

    def keep(rnd, arrays):
        if snapshots is not None:
            snapshots[rnd] = arrays
        return None

    return strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=keep)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_ordinary_rounds_are_the_bare_strategy_bit_for_bit_on_batchnorm_and_half_precision(name, dtype):
    bare = start(STRATEGIES[name](), dtype).arrays
    wrapped = Unlearning(STRATEGIES[name](), "puf")
    got = start(wrapped, dtype).arrays
    for k, v in bare.items():
        np.testing.assert_array_equal(got[k].numpy(), v.numpy())
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
    # every reply of every round was used: nothing struck, the counter arrived as int64 for a float64 average
    assert not wrapped.strikes and set(wrapped.last_round_problems.values()) == {"ok"}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_training_goes_on_after_an_unlearning_round_with_every_reply_used(dtype):
    strategy = Unlearning(fedavg(), "puf", calibrate=False)
    strategy.request_unlearning(0, round=3)
    seen: dict[int, ArrayRecord] = {}
    grid = WireGrid(app_with_identity(), NODES, {"dtype": dtype})
    result = start(strategy, dtype, rounds=5, snapshots=seen, grid=grid)
    assert strategy.departed and not strategy.strikes and set(strategy.last_round_problems.values()) == {"ok"}
    assert result.train_metrics_clientapp[5]["clients"] == NODES - 1
    for rnd in (3, 4, 5):
        arrays = seen[rnd]
        assert arrays["temperature"].shape == ()  # 0-dim stays 0-dim through the unlearning round
        assert arrays["bn.num_batches_tracked"].shape == ()
        # the model travels in its precision, bfloat16 included (FedAvg averages bfloat16 in float32)
        assert dtype in grid.wire[rnd] and "float32" not in grid.wire[rnd] - {dtype}
    # the BatchNorm counter and statistics were carried, never negated: still positive counts and variances
    after = to_weights(seen[3])
    assert after["bn.num_batches_tracked"] > 0 and np.all(after["bn.running_var"] > 0)
    # the departed partition was forgotten: its accuracy fell in the unlearning round
    assert user.forget_accuracy(seen[3], dtype, 0, NODES) < user.forget_accuracy(seen[2], dtype, 0, NODES)


def test_fractional_weights_aggregate_as_stock():
    extra = {"weight-scale": 0.37}
    bare = start(fedavg(), extra=extra).arrays
    wrapped = Unlearning(fedavg(), "puf")
    got = start(wrapped, extra=extra).arrays
    for k, v in bare.items():
        np.testing.assert_array_equal(got[k].numpy(), v.numpy())
    assert not wrapped.strikes


def test_attributes_are_the_wrapped_strategys():
    inner = FedAvg(fraction_train=0.5, min_available_nodes=2)
    w = Unlearning(inner, "puf")
    assert w.fraction_train == 0.5 and w.weighted_by_key == "num-examples"
    w.fraction_train = 0.25  # set on the wrapped strategy, and it takes effect
    assert inner.fraction_train == 0.25
    w.min_available_nodes = 3  # raised after wrapping: kept when the wrapper adjusts the minimums
    w.leave_out(12345)
    w._adjust_minimums()
    assert inner.min_available_nodes == 2  # one node gone
    w.min_available_nodes = 5
    w._adjust_minimums()
    assert inner.min_available_nodes == 4
    with pytest.raises(AttributeError):
        _ = w.no_such_setting
    assert isinstance(w, FedAvg)  # around FedAvg's own rule, the wrapper is a FedAvg (Flower's DP accepts it)
    w.exclude(777)  # the former name of leave_out
    assert {12345, 777} <= w.departed and not w.excluded


def test_replies_reach_the_users_metric_aggregation_with_their_extra_records():
    seen: list[list[str]] = []

    def aggregate(records: list[RecordDict], key: str) -> MetricRecord:
        seen.append(sorted(records[0].keys()))
        return MetricRecord({"mine": 1.0})

    strategy = Unlearning(FedAvg(min_available_nodes=NODES, train_metrics_aggr_fn=aggregate), "puf")
    result = start(strategy, rounds=2)
    assert seen and all("extra" in keys for keys in seen)  # the reply's ConfigRecord came through
    assert result.train_metrics_clientapp[2]["mine"] == 1.0


def test_a_reply_with_other_metric_keys_costs_its_node_the_round_and_the_app_format_is_the_strategys():
    strategy = Unlearning(fedavg(), "puf")
    grid = InProcessGrid(app_with_identity(), NODES, {"dtype": "float32"})
    arrays = user.to_record(user.make_model("float32"), "float32")
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    odd = replies[1]
    odd.content["metrics"] = MetricRecord({**dict(odd.content["metrics"]), "sneaky": 1.0})
    out, metrics = strategy.aggregate_train(1, replies)
    assert out is not None and metrics["clients"] == NODES - 1
    assert "metric keys" in strategy.last_round_problems[odd.metadata.src_node_id]
    # every reply in the app's own format the strategy refuses (two ArrayRecords): the strategy's own error
    msgs = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    for r in replies:
        r.content["more"] = r.content["arrays"]
    with pytest.raises(Exception, match="exactly one ArrayRecord"):
        strategy.aggregate_train(2, replies)


def test_calls_without_configure_are_ordinary_rounds_of_the_wrapped_strategy():
    bare, wrapped = FedAvg(), Unlearning(FedAvg(), "puf")
    reply = []
    for n, w in ((1, 1.0), (3, 3.0)):
        content = RecordDict({"arrays": ArrayRecord([np.array(w)]), "metrics": MetricRecord({"num-examples": n})})
        reply.append(Message(content, reply_to=Message(RecordDict(), 1000 + n, "train")))
    a, _ = bare.aggregate_train(1, reply)
    b, _ = wrapped.aggregate_train(1, reply)
    assert a is not None and b is not None
    np.testing.assert_array_equal(next(iter(a.values())).numpy(), next(iter(b.values())).numpy())
    assert next(iter(b.values())).shape == ()


def test_a_missing_identify_handler_stops_the_run_in_round_one_naming_the_helper():
    from flwr.clientapp import ClientApp

    plain = ClientApp()
    plain.train()(user.train)
    plain.evaluate()(user.evaluate)
    strategy = Unlearning(fedavg(), "puf")
    strategy.request_unlearning(0, round=3)
    grid = InProcessGrid(plain, NODES, {"dtype": "float32"})
    with pytest.raises(SetupError, match=r"add_identity\(app\)") as err:
        strategy.start(grid=grid, initial_arrays=user.to_record(user.make_model("float32"), "float32"), num_rounds=4)
    assert "\n" not in str(err.value)
    assert "train" not in grid.sent  # before any training


def test_a_request_after_the_last_round_is_refused_before_any_training():
    strategy = Unlearning(fedavg(), "puf")
    strategy.request_unlearning(0, round=9)
    grid = InProcessGrid(app_with_identity(), NODES, {"dtype": "float32"})
    with pytest.raises(SetupError, match="after the last round"):
        strategy.start(grid=grid, initial_arrays=user.to_record(user.make_model("float32"), "float32"), num_rounds=4)
    assert grid.sent == []


# -- differential privacy -------------------------------------------------------------------------
def dp_server(inner, **kw):
    return DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=1.0, **kw)


def test_unlearning_sees_through_dp_to_the_node_minimums_and_reports_the_clipped_step():
    inner = dp_server(FedAvg(min_available_nodes=NODES), num_sampled_clients=NODES)
    strategy = Unlearning(inner, "puf", calibrate=False)
    strategy.request_unlearning(0, round=2)
    start(strategy, rounds=4)  # would wait for a 4th node forever if the minimums behind DP stayed at 4
    dp = strategy.unlearning_report["dp"]
    assert dp["clipping"] == "server" and dp["clipping-norm"] == 1.0 and 0 < dp["kept-fraction"] < 1
    assert strategy.strategy.num_sampled_clients == NODES - 1  # DP's cohort size follows the departure


class RecordingAdam(FedAdam):
    """FedAdam that records its first moment as each aggregation starts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.moments: dict[int, bool] = {}

    def aggregate_train(self, server_round, replies):
        self.moments[server_round] = bool(self.m_t)
        return super().aggregate_train(server_round, replies)


def test_under_dp_a_robust_aggregator_gets_the_additive_step_and_a_server_optimizer_its_momentum_reset():
    trimmed = Unlearning(dp_server(FedTrimmedAvg(beta=0.25, min_available_nodes=NODES), num_sampled_clients=NODES))
    assert trimmed._composition() == "additive"
    adam = RecordingAdam(eta=0.01, eta_l=0.1, min_available_nodes=NODES)
    strategy = Unlearning(dp_server(adam, num_sampled_clients=NODES), "puf", calibrate=False)
    strategy.request_unlearning(0, round=3)
    start(strategy, rounds=4)
    # FedAdam behind DP: momentum built before the request is dropped for the unlearning round only
    assert strategy.departed and adam.moments == {1: False, 2: True, 3: False, 4: True}


def accountant():
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(
        PrivacyConfig(1e-5, NODES, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )


@pytest.mark.parametrize(
    "dp_class", [DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping]
)
def test_dp_around_the_wrapper_runs_with_flowers_accountant(dp_class):
    acc = accountant()
    wrapper = Unlearning(fedavg(), "puf", calibrate=False)
    strategy = dp_class(wrapper, noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=NODES, accountant=acc)
    wrapper.request_unlearning(0, round=2)
    start(strategy, rounds=3, extra={"weight": 1})
    assert wrapper.departed and acc.get_privacy_spent().num_releases == 3  # every release accounted
    dp = wrapper.unlearning_report["dp"]
    assert dp["accountant"] and dp["step-norm"] * dp["kept-fraction"] <= 1.0 + 1e-9  # one clipped update
    assert strategy.num_sampled_clients == NODES - 1  # the departure lowered DP's cohort too


def test_the_wrapper_around_dp_with_an_accountant_serves_a_departure():
    acc = accountant()
    inner = DifferentialPrivacyServerSideFixedClipping(
        fedavg(), noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=NODES, accountant=acc
    )
    strategy = Unlearning(inner, "puf", calibrate=False)
    strategy.request_unlearning(0, round=2)
    start(strategy, rounds=3, extra={"weight": 1})
    assert strategy.departed and acc.get_privacy_spent().num_releases == 3
    with pytest.raises(ValueError, match="accountant"):
        Unlearning(inner, "sragu")  # only the departing clients train in its round: refused up front


def test_adaptive_dp_inside_is_seen_through():
    inner = DifferentialPrivacyServerSideAdaptiveClipping(fedavg(), noise_multiplier=0.0, num_sampled_clients=NODES)
    w = Unlearning(inner, "puf")
    from fed_unlearn.flower import inner as I

    found = I.describe(w.strategy)
    assert found.aggregation == "mean" and found.dp_clipping == "server" and found.clipping_norm == pytest.approx(0.1)
