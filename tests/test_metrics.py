"""Metrics on known inputs, checked against references (scipy, scikit-learn)."""

import numpy as np
import pytest
from scipy.stats import entropy

from fed_unlearn.evaluation import summarise
from fed_unlearn.metrics import accuracy, cross_entropy, disagreement, kl_divergence, loss_mia_auc

TIER = "unit"  # see tests/conftest.py


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


def test_summarise_adds_parts_over_clients():
    def ev(parts, auc=None):
        out = {}
        for part, (n, c) in parts.items():
            out.update({f"{part}-n": n, f"{part}-correct": c, f"{part}-loss-sum": n * 0.1})
        if auc is not None:
            out["mia-auc"] = auc
        return out

    # client 0 left (everything is forget), clients 1, 2 stay (retain + test); client 1 also deletes samples
    evals = {
        0: ev({"forget": (10, 10), "retain": (0, 0), "test": (0, 0), "fheld": (5, 4)}, 0.7),
        1: ev({"forget": (20, 15), "retain": (20, 15), "test": (10, 6), "fheld": (10, 6)}, 0.5),
        2: ev({"forget": (0, 0), "retain": (30, 15), "test": (10, 9), "fheld": (0, 0)}),
    }
    s = summarise(evals)
    assert s["forget-acc"] == pytest.approx(25 / 30) and s["forget-heldout-acc"] == pytest.approx(10 / 15)
    assert s["retain-acc"] == pytest.approx(30 / 50) and s["test-acc"] == pytest.approx(15 / 20)
    assert s["mia-auc"] == pytest.approx((10 * 0.7 + 20 * 0.5) / 30)  # weighted by forget-set size
    assert "kl-forget" not in s and "mia-nn-auc" not in s


def test_split_parts_and_measure_client_known_answers():
    import torch

    from fed_unlearn.data import ArrayDataset
    from fed_unlearn.evaluation import measure_client, split_parts

    class Fixed(torch.nn.Module):  # predicts class = round(x[0]) with confidence
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].round().long(), 3).double() * 5.0

    xs = np.array([[0.0], [1.0], [2.0], [1.0]], np.float32)
    train = ArrayDataset(xs, np.array([0, 1, 2, 2]), 3, "t")  # the last sample is misclassified
    heldout = ArrayDataset(xs[:3], np.array([0, 1, 1]), 3, "h")  # the last held-out one too
    mask = np.array([False, True, True, False])
    parts = split_parts(train, heldout, mask, removed_classes=(0,))
    assert list(parts["forget"][1]) == [1, 2] and list(parts["retain"][1]) == [0, 3]
    assert list(parts["test"][1]) == [1, 2]  # held-out minus removed class 0
    assert list(parts["fheld"][1]) == [1, 2]  # held-out samples of classes {1, 2} in the forget set
    m = measure_client(Fixed(), train, heldout, forget=mask, reference=Fixed(), mia=True)
    assert (m["forget-n"], m["forget-correct"], m["retain-n"], m["retain-correct"]) == (2, 2, 2, 1)
    assert m["forget-kl-sum"] == 0.0 and m["forget-disagree-sum"] == 0.0 and m["forget-tv-sum"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        split_parts(train, heldout, np.array([True]))


def test_tv_distance_known_answers():
    from fed_unlearn.metrics import tv_distance

    a = np.log(np.array([[0.5, 0.5], [1.0, 1e-300]]))
    b = np.log(np.array([[0.5, 0.5], [1e-300, 1.0]]))
    assert tv_distance(a, a) == 0.0
    assert tv_distance(a, b) == pytest.approx(0.5)  # (0 + 1) / 2
    assert tv_distance(a, b) == pytest.approx(tv_distance(b, a))


def test_mia_nn_separates_a_model_that_only_suppresses_the_class():
    from fed_unlearn.metrics import mia_nn_auc, remaining_class_probs

    # removed class 0; the neighbouring class is 1. Members (trained on) still put their
    # mass on class 1 much more than unseen class-0 samples do -> perfectly separated.
    members = np.log(np.array([[1e-9, 0.9, 0.1]] * 4))
    nonmembers = np.log(np.array([[1e-9, 0.6, 0.4]] * 4))
    assert mia_nn_auc(members, nonmembers, (0,)) == 1.0
    assert mia_nn_auc(nonmembers, nonmembers, (0,)) == 0.5
    q, kept = remaining_class_probs(np.log(np.array([[0.5, 0.25, 0.25]])), (0,))
    np.testing.assert_allclose(q, [[0.5, 0.5]]) and list(kept) == [1, 2]
    with pytest.raises(ValueError, match="every class"):
        remaining_class_probs(members, (0, 1, 2))


def test_relearn_count_on_a_constructed_case():
    """A model that already predicts the target needs 0 steps; one that must learn needs > 0, capped."""
    import torch

    from fed_unlearn.training import TrainSettings, relearn_steps

    x = np.eye(4, dtype=np.float32)
    y = np.arange(4)
    lin = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4) * 5)
    s = TrainSettings(epochs=1, batch_size=4, lr=0.5, momentum=0.0)
    assert relearn_steps(lin, x, y, 1.0, s, max_steps=10, seed=0).steps == 0
    with torch.no_grad():
        lin.weight.copy_(torch.roll(torch.eye(4), 1, dims=0) * 5)  # every prediction wrong
    res = relearn_steps(lin, x, y, 1.0, s, max_steps=200, seed=0)
    assert res.reached and res.start_accuracy == 0.0 and res.steps > 0
    # full-batch SGD on this linear model: learned after the same number of steps every time
    with torch.no_grad():
        lin.weight.copy_(torch.roll(torch.eye(4), 1, dims=0) * 5)
    assert relearn_steps(lin, x, y, 1.0, s, max_steps=200, seed=1).steps == res.steps
    with torch.no_grad():
        lin.weight.copy_(torch.roll(torch.eye(4), 1, dims=0) * 5)
    capped = relearn_steps(lin, x, y, 1.0, s, max_steps=1, seed=0)
    assert not capped.reached and capped.steps == 1


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
        return {
            "report": {"original": {**rep, "average-gap": 0.02}, "unlearned": rep, "gold": {**rep, "average-gap": 0.0}},
            "recovery": {"rounds-to-gold": 1 if seed_val > 0.8 else None},
            "client-compute": {"fraction-of-gold-steps": 0.5},
        }

    stats = seed_statistics({"puf": [res(0.9, 0.01), res(0.7, 0.03)], "sragu": [res(0.9, 0.02), res(0.7, 0.02)]})
    assert list(stats) == ["original", "puf", "sragu", "gold"]
    mean, std, n = stats["puf"]["average-gap"]
    assert (mean, n) == (pytest.approx(0.02), 2) and std == pytest.approx(np.std([0.01, 0.03], ddof=1))
    assert stats["gold"]["average-gap"] == (0.0, 0.0, 2)
    assert stats["puf"]["recovery-rounds"] == (1.0, 0.0, 1)  # a run that never recovered is not averaged in
    table = statistics_table(stats)
    assert "| Average Gap to gold (retain, forget, test acc, MIA) | 0.0200 ± 0.0000 | 0.0200 ± 0.0141 |" in table


def test_inside_the_gold_seed_spread_is_within_one_gold_standard_deviation():
    from fed_unlearn.report import inside_gold_spread, spread_table

    stats = {
        "gold": {"forget-acc": (0.90, 0.02, 3), "test-acc": (0.95, 0.0, 3), "mia-auc": (0.50, 0.01, 3)},
        "puf": {"forget-acc": (0.915, 0.05, 3), "test-acc": (0.95, 0.01, 3), "mia-auc": (0.53, 0.01, 3)},
        "original": {"forget-acc": (0.98, 0.0, 3), "test-acc": (0.96, 0.0, 3), "mia-auc": (0.52, 0.0, 3)},
    }
    assert inside_gold_spread(stats, "puf") == {"test-acc": True, "forget-acc": True, "mia-auc": False}
    table = spread_table({"client": stats})
    assert "**mia-auc**" in table and "0 of 1" in table  # one method cell, outside on a core metric


def test_a_distance_to_the_gold_is_inside_when_no_further_than_the_gold_twin():
    from fed_unlearn.report import inside_gold_spread, overview_table, ranking_table, seed_statistics, spread_table

    def res(kl_puf, kl_twin):
        rep = {"test-acc": 0.9, "average-gap": 0.01}
        return {
            "report": {
                "original": {**rep, "kl-forget": 1.0},
                "unlearned": {**rep, "kl-forget": kl_puf},
                "gold": {**rep, "kl-forget": 0.0},
                "gold-twin": {**rep, "kl-forget": kl_twin},
            },
            "recovery": {"rounds-to-gold": 1},
            "client-compute": {"fraction-of-gold-steps": 0.5},
        }

    # the twin lands at KL 0.10 ± 0.02 from the gold: 0.11 is inside, 0.13 outside
    inside = seed_statistics({"puf": [res(0.11, 0.08), res(0.11, 0.12)]})
    assert list(inside) == ["original", "puf", "gold", "gold-twin"]
    assert inside_gold_spread(inside, "puf") == {"test-acc": True, "kl-forget": True}
    outside = seed_statistics({"puf": [res(0.13, 0.08), res(0.13, 0.12)]})
    assert inside_gold_spread(outside, "puf")["kl-forget"] is False
    table = spread_table({"client": outside})
    assert "kl-forget" in table and "0 of 1" in table and "gold twin" in table  # the twin is no method cell
    assert "gold-twin" not in ranking_table({"client": outside})
    assert overview_table({"client": outside}).splitlines()[-2].startswith("| gold-twin |")
    assert "gold-twin" not in overview_table({"client": outside}, "rmia-auc")  # never audited: no empty row
    # without a twin the distances are not judged (the gold's own are 0 by definition)
    assert "kl-forget" not in inside_gold_spread({k: v for k, v in outside.items() if k != "gold-twin"}, "puf")


def test_a_clients_measurements_import_no_scikit_learn_metrics():
    """Every client computes these AUCs (evaluation, calibration); scikit-learn's metrics cost a process >1 s."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import numpy as np\n"
        "from fed_unlearn.data.datasets import ArrayDataset\n"
        "from fed_unlearn.evaluation import measure_client\n"
        "from fed_unlearn.models import build_model\n"
        "rng = np.random.default_rng(0)\n"
        "ds = ArrayDataset(rng.random((40, 1, 4, 4), dtype=np.float32), rng.integers(0, 3, 40), 3, 'toy')\n"
        "out = measure_client(build_model('mlp', (1, 4, 4), 3, 0), ds, ds, rng.random(40) < 0.5, mia=True)\n"
        "assert 0 <= out['mia-auc'] <= 1, out\n"
        "bad = sorted(m for m in sys.modules if m.startswith('sklearn'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
