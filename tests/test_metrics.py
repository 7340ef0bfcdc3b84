"""Metrics on known inputs, checked against references (scipy, scikit-learn)."""

import numpy as np
import pytest
from scipy.stats import entropy

from fed_unlearn.evaluation import summarise
from fed_unlearn.metrics import accuracy, cross_entropy, disagreement, kl_divergence, loss_mia_auc


def test_kl_of_identical_distributions_is_zero():
    logits = np.random.default_rng(0).normal(size=(20, 5))
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax shift-invariant


def test_kl_matches_scipy_entropy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
    pa = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    pb = np.exp(b) / np.exp(b).sum(1, keepdims=True)
    ref = np.mean([entropy(pa[i], pb[i]) for i in range(8)])
    assert kl_divergence(a, b) == pytest.approx(ref, rel=1e-10)
    assert kl_divergence(a, b) != pytest.approx(kl_divergence(b, a))  # direction matters


def test_disagreement_and_accuracy():
    ref = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    other = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    assert disagreement(ref, ref) == 0.0
    assert disagreement(ref, other) == 0.5
    assert accuracy(ref, np.array([0, 1, 1, 1])) == 0.75


def test_cross_entropy_known_value():
    logits = np.log(np.array([[0.25, 0.75]]))
    assert cross_entropy(logits, np.array([1]))[0] == pytest.approx(-np.log(0.75))


def test_mia_auc_known_answers():
    assert loss_mia_auc(np.array([0.1, 0.2]), np.array([1.0, 2.0, 3.0])) == 1.0  # perfectly separated
    assert loss_mia_auc(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 0.0
    assert loss_mia_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5  # indistinguishable
    # one of four member/non-member pairs ordered the wrong way -> 3/4
    assert loss_mia_auc(np.array([0.1, 0.5]), np.array([0.4, 0.9])) == 0.75


def test_summarise_splits_by_role():
    def ev(n_tr, c_tr, n_ho, c_ho, auc):
        return {"train-n": n_tr, "train-correct": c_tr, "train-loss-sum": n_tr * 0.1, "heldout-n": n_ho,
                "heldout-correct": c_ho, "heldout-loss-sum": n_ho * 0.2, "mia-auc": auc}
    evals = {0: ev(10, 10, 5, 4, 0.7), 1: ev(20, 15, 10, 6, 0.5), 2: ev(30, 15, 10, 9, 0.5)}
    s = summarise(evals, departing=[0])
    assert s["forget-acc"] == 1.0 and s["forget-heldout-acc"] == 0.8
    assert s["retain-acc"] == pytest.approx(30 / 50) and s["test-acc"] == pytest.approx(15 / 20)
    assert s["mia-auc"] == 0.7 and "kl-forget" not in s
    two = summarise(evals, departing=[0, 1])
    assert two["mia-auc"] == pytest.approx((10 * 0.7 + 20 * 0.5) / 30)  # weighted by forget-set size


def test_weight_distance_and_average_gap():
    from fed_unlearn.metrics import average_gap, weight_distance

    a = {"w": np.zeros((2, 2)), "b": np.zeros(1)}
    b = {"w": np.full((2, 2), 1.5), "b": np.array([4.0])}
    assert weight_distance(a, a) == 0.0
    assert weight_distance(a, b) == pytest.approx(np.sqrt(4 * 1.5**2 + 16))
    with pytest.raises(ValueError):
        weight_distance(a, {"w": np.zeros((2, 2))})
    gold = {"retain-acc": 0.9, "forget-acc": 0.8, "test-acc": 0.85, "mia-auc": 0.5}
    assert average_gap(gold, gold) == 0.0
    model = {"retain-acc": 1.0, "forget-acc": 1.0, "test-acc": 0.85, "mia-auc": 0.6}
    assert average_gap(model, gold) == pytest.approx((0.1 + 0.2 + 0.0 + 0.1) / 4)


def test_modified_entropy_known_values_and_attack():
    from fed_unlearn.metrics import entropy_mia_auc, modified_entropy

    # p = (0.5, 0.5), y = 0: -(0.5) log 0.5 - 0.5 log 0.5 = log 2
    two = np.log(np.array([[0.5, 0.5]]))
    assert modified_entropy(two, np.array([0]))[0] == pytest.approx(np.log(2))
    # confidently right -> ~0; confidently wrong -> large (plain entropy would call both ~0)
    sure = np.log(np.array([[0.999, 0.001]]))
    assert modified_entropy(sure, np.array([0]))[0] < 0.01 < 5 < modified_entropy(sure, np.array([1]))[0]
    right = np.tile([[5.0, 0.0, 0.0]], (4, 1))
    members_y, nonmembers_y = np.zeros(4, int), np.array([1, 2, 1, 2])
    assert entropy_mia_auc(right, members_y, right, nonmembers_y) == 1.0  # members fit, non-members wrong
    assert entropy_mia_auc(right, members_y, right, members_y) == 0.5


def test_relearn_steps_known_answers():
    import torch
    from torch import nn

    from fed_unlearn.training import TrainSettings, relearn_steps

    x = np.ones((8, 1), np.float32)
    y = np.ones(8, np.int64)
    model = nn.Linear(1, 2)
    with torch.no_grad():  # predicts class 0 everywhere: logits (1, -1)
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model.bias.zero_()
    # one SGD step with lr 10 on CE: the gradient on (w0, w1) is (+0.88, -0.88) -> logits flip to class 1
    res = relearn_steps(model, x, y, 1.0, TrainSettings(lr=10.0, momentum=0.0, batch_size=8), max_steps=5, seed=0)
    assert (res.steps, res.reached, res.start_accuracy, res.final_accuracy) == (1, True, 0.0, 1.0)
    again = relearn_steps(model, x, y, 1.0, TrainSettings(), max_steps=5, seed=0)
    assert again.steps == 0 and again.reached  # already there
    never = relearn_steps(model, x, y, 1.01, TrainSettings(), max_steps=3, seed=0)
    assert never.steps == 3 and not never.reached


def test_seed_statistics_and_table():
    from fed_unlearn.report import seed_statistics, statistics_table

    def res(seed_val, unl):
        rep = {"test-acc": seed_val, "mia-auc": 0.5, "average-gap": unl}
        return {"report": {"original": {**rep, "average-gap": 0.02}, "unlearned": rep, "gold": {**rep, "average-gap": 0.0}},
                "recovery": {"rounds-to-gold": 1 if seed_val > 0.8 else None},
                "client-compute": {"fraction-of-gold-steps": 0.5}}
    stats = seed_statistics({"puf": [res(0.9, 0.01), res(0.7, 0.03)], "sragu": [res(0.9, 0.02), res(0.7, 0.02)]})
    assert list(stats) == ["original", "puf", "sragu", "gold"]
    mean, std, n = stats["puf"]["average-gap"]
    assert (mean, n) == (pytest.approx(0.02), 2) and std == pytest.approx(np.std([0.01, 0.03], ddof=1))
    assert stats["gold"]["average-gap"] == (0.0, 0.0, 2)
    assert stats["puf"]["recovery-rounds"] == (1.0, 0.0, 1)  # a run that never recovered is not averaged in
    table = statistics_table(stats)
    assert "| Average Gap to gold (retain, forget, test acc, MIA) | 0.0200 ± 0.0000 | 0.0200 ± 0.0141 |" in table
