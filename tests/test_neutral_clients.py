"""Unlearning in apps without torch: scikit-learn and numpy clients (tests/sklearn_app.py).

A scikit-learn app calibrates the step with a framework-neutral ``predict_fn``; without
any client help the default step leaves no lasting shift against a federation where the
departing client simply stopped.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fed_unlearn.flower import InProcessGrid, Unlearning, to_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sklearn_app as user  # noqa: E402

TIER = "integration"  # see tests/conftest.py

NODES, ROUNDS, DEPART = 4, 6, 3


def federation(app, method, seed=0, initial=None, **kw):
    random.seed(seed)
    grid = InProcessGrid(app, NODES, {"seed": seed})
    strategy = Unlearning(FedAvg(min_available_nodes=NODES), method, **kw)
    strategy.request_unlearning(0, round=DEPART)
    start = initial if initial is not None else user.params(user.model())
    result = strategy.start(grid=grid, initial_arrays=start, num_rounds=ROUNDS)
    return strategy, result


def final_metrics(arrays: ArrayRecord, seed: int) -> dict[str, float]:
    m = user.model(arrays, seed)
    (fx, fy), _ = user.partition(0, NODES, seed)
    tests = [user.partition(p, NODES, seed)[1] for p in range(1, NODES)]
    x, y = np.concatenate([t[0] for t in tests]), np.concatenate([t[1] for t in tests])
    return {"test-acc": float(m.score(x, y)), "forget-acc": float(m.score(fx, fy))}


def test_a_scikit_learn_app_calibrates_the_step_on_its_own_data_without_torch():
    strategy, result = federation(user.calibrating_app, "puf")
    cal = strategy.unlearning_report["calibration"]
    assert cal["used"] and cal["rule"] == "forget-set" and "pre-request" in cal  # measured on the client
    assert 0.0 <= cal["scale"] <= 1.0
    handlers = next(iter(strategy.capabilities.values()))["handlers"]
    assert "query.calibrate" in handlers and "train.unlearn" not in handlers  # no fit_fn: nothing that trains
    assert final_metrics(result.arrays, 0)["test-acc"] > 0.8


@pytest.mark.e2e  # 6 federations x 3 seeds: the slow tier
def test_without_client_help_the_default_step_leaves_no_lasting_shift():
    """Plain scikit-learn clients (no calibrate handler): the step the remaining clients' evaluation allows."""
    runs: dict[str, list[dict[str, float]]] = {"puf": [], "fine-tune": []}
    for seed in (0, 1, 2):
        runs["puf"].append(final_metrics(federation(user.app, "puf", seed)[1].arrays, seed))
        runs["fine-tune"].append(final_metrics(federation(user.app, "fine-tune", seed)[1].arrays, seed))
    for key in ("test-acc", "forget-acc"):
        puf = np.array([r[key] for r in runs["puf"]])
        stopped = np.array([r[key] for r in runs["fine-tune"]])
        spread = max(float(np.std(stopped)), 0.01)
        assert abs(puf.mean() - stopped.mean()) <= spread, (key, puf, stopped)


def test_a_numpy_app_that_reports_no_loss_gets_no_step_and_says_so():
    initial = ArrayRecord([np.ones((1, 1))])
    strategy, result = federation(user.numpy_app, "puf", initial=initial)
    cal = strategy.unlearning_report["calibration"]
    assert cal["rule"] == "no-evidence" and cal["scale"] == 0.0
    _, stopped = federation(user.numpy_app, "fine-tune", initial=initial)
    got, want = next(iter(to_weights(result.arrays).values())), next(iter(to_weights(stopped.arrays).values()))
    np.testing.assert_allclose(got, want, rtol=1e-12)  # where the client simply stopped: no lasting shift
    # the uncalibrated reference step shifts the model for good (the toy's training only adds noise)
    _, full = federation(user.numpy_app, "puf", initial=initial, calibrate=False)
    assert float(next(iter(to_weights(full.arrays).values())).item()) < float(want.item()) - 0.5


def test_qfedavg_gets_the_step_added_to_its_own_rule():
    from flwr.serverapp.strategy import QFedAvg

    seen: dict[int, ArrayRecord] = {}
    qfedavg = QFedAvg(client_learning_rate=0.1, train_loss_key="train_logloss", min_available_nodes=NODES)
    strategy = Unlearning(qfedavg, "puf", calibrate=False)
    assert strategy._composition() == "additive"
    strategy.request_unlearning(0, round=3)
    random.seed(0)
    grid = InProcessGrid(user.app, NODES, {"seed": 0})
    strategy.start(
        grid=grid,
        initial_arrays=user.params(user.model()),
        num_rounds=3,
        evaluate_fn=lambda rnd, arrays: seen.__setitem__(rnd, arrays),
    )

    def moved(a, b):
        wa, wb = to_weights(a), to_weights(b)
        return float(np.sqrt(sum(np.sum((wa[k] - wb[k]) ** 2) for k in wa)))

    # q-FedAvg's rule normalises a reply by its size: as one more reply the step would all but vanish
    assert strategy.departed and moved(seen[3], seen[2]) > moved(seen[2], seen[1])
