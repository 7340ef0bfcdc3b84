"""The calibrated membership-inference attacks: known answers, a planted memorisation, a control."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fed_unlearn import attacks as A
from fed_unlearn.metrics import cross_entropy, mia_auc

TIER = "unit"  # see tests/conftest.py


def test_reference_masks_put_every_sample_in_exactly_half_and_are_seeded():
    m = A.reference_masks(500, 8, seed=3)
    assert m.shape == (8, 500) and np.all(m.sum(axis=0) == 4)
    assert np.array_equal(m, A.reference_masks(500, 8, seed=3)) and not np.array_equal(m, A.reference_masks(500, 8, 4))
    assert 0.4 < m[0].mean() < 0.6  # each model sees about half
    with pytest.raises(ValueError, match="even"):
        A.reference_masks(10, 3, 0)


def test_logit_confidence_is_log_odds_of_the_true_class():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = np.exp(2) / (np.exp(2) + 2)
    np.testing.assert_allclose(A.logit_confidence(logits, np.array([0, 1])), [np.log(p / (1 - p)), np.log(0.5)])
    big = np.array([[800.0, 0.0]])  # stable where p_y rounds to 1
    assert A.logit_confidence(big, np.array([0]))[0] == pytest.approx(800.0)


def test_tpr_at_fpr_places_the_threshold_on_the_nonmembers_and_states_its_interval():
    non = np.arange(1000, dtype=float)  # 1 % FPR: at most 10 non-members above the threshold 989
    mem = np.array([995.0, 990.0, 989.0, 500.0])
    r = A.tpr_at_fpr(mem, non, 0.01)
    assert r.supported and r.tpr == 0.5 and r.members == 4 and r.nonmembers == 1000
    assert r.low == pytest.approx(0.0676, abs=1e-3) and r.high == pytest.approx(0.9324, abs=1e-3)
    assert not A.tpr_at_fpr(mem, non[:500], 0.001).supported  # 0.1 % of 500 non-members: no threshold
    # the threshold's own rate is uncertain: 10 of 1000 above it, up to 1.8 %; 1 of 120, up to 4.6 %
    assert r.fpr_high == pytest.approx(0.0183, abs=5e-4)
    assert A.tpr_at_fpr(mem, np.arange(120.0), 0.01).fpr_high == pytest.approx(0.0456, abs=5e-4)
    assert A.clopper_pearson(0, 10) == (0.0, pytest.approx(0.3085, abs=1e-4))


def test_roc_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    m, n = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 60).astype(float)
    ref = roc_auc_score(np.r_[np.ones(40), np.zeros(60)], np.r_[m, n])
    assert mia_auc(m, n) == pytest.approx(ref, abs=1e-12)
    # continuous scores, unequal sizes, and the degenerate cases
    m, n = rng.normal(0.3, 1, 257), rng.normal(0, 1, 1000)
    assert mia_auc(m, n) == pytest.approx(roc_auc_score(np.r_[np.ones(257), np.zeros(1000)], np.r_[m, n]), abs=1e-12)
    assert mia_auc(np.full(3, 2.0), np.full(5, 2.0)) == 0.5
    assert np.isnan(mia_auc(np.array([]), n))


def test_rmia_counts_population_samples_below_the_ratio():
    # two references that never saw anything: Pr = ((1 + a) p_ref + (1 - a)) / 2 with a = 0 -> (p_ref + 1) / 2
    ref = np.full((2, 1), 0.5)
    pop_t, pop_ref = np.array([0.3, 0.6, 0.9]), np.full((2, 3), 0.5)
    s = A.rmia_offline(np.array([0.75]), ref, np.ones((2, 1), bool), pop_t, pop_ref, a=0.0)
    assert s[0] == pytest.approx(2 / 3)  # r(x) = 1.0 beats r(z) = 0.4, 0.8, not 1.2
    loo = A.rmia_offline(pop_t, pop_ref, np.ones((2, 3), bool), pop_t, pop_ref, a=0.0, exclude_self=True)
    np.testing.assert_allclose(loo, [0.0, 0.5, 1.0])


def planted_world(seed: int = 0):
    """High-dimensional logistic regression: it interpolates, so 20 flipped labels are memorised."""
    rng = np.random.default_rng(seed)
    d, n, nh, planted = 300, 200, 2000, 20
    w = rng.normal(size=d)
    x, xh = rng.normal(size=(n, d)), rng.normal(size=(nh, d))
    y, yh = (x @ w > 0).astype(int), (xh @ w > 0).astype(int)
    y[:planted] = 1 - y[:planted]

    def fit(mask):
        m = LogisticRegression(C=1e4, max_iter=5000).fit(x[mask], y[mask])
        return lambda v: np.stack([-m.decision_function(v) / 2, m.decision_function(v) / 2], 1)

    masks = A.reference_masks(n, 8, seed=1)
    return x, y, xh, yh, planted, fit(np.ones(n, bool)), [fit(mk) for mk in masks], masks


def test_a_planted_memorisation_is_found_at_low_fpr_where_the_loss_attack_sees_nothing():
    x, y, xh, yh, planted, target, refs, masks = planted_world()
    out, all_out = ~masks, np.ones((len(refs), len(xh)), bool)
    lira_m = A.lira_offline(
        A.logit_confidence(target(x), y), np.stack([A.logit_confidence(r(x), y) for r in refs]), out
    )[:planted]
    lira_n = A.lira_offline(
        A.logit_confidence(target(xh), yh), np.stack([A.logit_confidence(r(xh), yh) for r in refs]), all_out
    )
    p_x, p_h = A.true_class_probability(target(x), y), A.true_class_probability(target(xh), yh)
    ref_x = np.stack([A.true_class_probability(r(x), y) for r in refs])
    ref_h = np.stack([A.true_class_probability(r(xh), yh) for r in refs])
    rmia_m = A.rmia_offline(p_x, ref_x, out, p_h, ref_h)[:planted]
    rmia_n = A.rmia_offline(p_h, ref_h, all_out, p_h, ref_h, exclude_self=True)
    loss = A.tpr_at_fpr(-cross_entropy(target(x), y)[:planted], -cross_entropy(target(xh), yh), 0.01)
    rmia, lira = A.tpr_at_fpr(rmia_m, rmia_n, 0.01), A.tpr_at_fpr(lira_m, lira_n, 0.01)
    assert loss.tpr == 0.0 and loss.high < 0.2  # the threshold attack finds none of the 20
    assert rmia.low > 0.5 and lira.low > loss.high / 4 and lira.tpr >= 0.2  # the calibrated ones find them
    assert mia_auc(rmia_m, rmia_n) > 0.9 and mia_auc(lira_m, lira_n) > 0.9


def test_a_target_that_never_saw_the_samples_gives_tpr_close_to_fpr():
    x, y, xh, yh, _, _, refs, masks = planted_world()
    target, others = refs[0], refs[1:]
    out = ~masks[1:]
    members = ~masks[0]  # "members" the target never trained on
    scores = A.lira_offline(
        A.logit_confidence(target(x), y), np.stack([A.logit_confidence(r(x), y) for r in others]), out
    )[members]
    held = A.lira_offline(
        A.logit_confidence(target(xh), yh),
        np.stack([A.logit_confidence(r(xh), yh) for r in others]),
        np.ones((len(others), len(xh)), bool),
    )
    r = A.tpr_at_fpr(scores, held, 0.01)
    assert r.low <= 0.01 <= r.high and r.members > 80


def test_client_reference_masks_are_per_client_and_seeded():
    a, b = A.client_reference_masks(300, 4, seed=0, client_id=1), A.client_reference_masks(300, 4, 0, 2)
    assert np.array_equal(a, A.client_reference_masks(300, 4, 0, 1)) and not np.array_equal(a, b)
    assert np.all(a.sum(axis=0) == 2)


def test_attack_scores_bundle_the_attacks_on_a_clients_samples():
    x, y, xh, yh, planted, target, refs, masks = planted_world()
    s = A.attack_scores(
        target(x), target(xh), np.stack([r(x) for r in refs]), np.stack([r(xh) for r in refs]), y, yh, ~masks
    )
    ref_x = np.stack([A.true_class_probability(r(x), y) for r in refs])
    ref_h = np.stack([A.true_class_probability(r(xh), yh) for r in refs])
    p_x, p_h = A.true_class_probability(target(x), y), A.true_class_probability(target(xh), yh)
    np.testing.assert_allclose(s["rmia-forget"], A.rmia_offline(p_x, ref_x, ~masks, p_h, ref_h))
    np.testing.assert_allclose(s["loss-forget"], -cross_entropy(target(x), y))
    assert len(s["lira-forget"]) == len(x) and len(s["lira-heldout"]) == len(xh)
    # pooled over both sets, LiRA still ranks the planted samples above the held-out ones
    assert mia_auc(s["lira-forget"][:planted], s["lira-heldout"]) > 0.9


def test_leakage_summary_reads_each_attack_and_compares_with_the_gold():
    rng = np.random.default_rng(0)
    held = rng.normal(size=1000)
    same = {f"{a}-{p}": rng.normal(size=1000) for a in A.ATTACKS for p in ("forget", "heldout")}
    leaky = {**same, "rmia-forget": held + 10.0, "rmia-heldout": held}
    out = A.leakage_summary({"unlearned": leaky, "gold": same})
    u, g = out["unlearned"], out["gold"]
    assert u["rmia-auc"] == 1.0 and u["rmia-tpr@1%"] == 1.0 and u["rmia-tpr@0.1%"] == 1.0
    assert 0.45 < g["rmia-auc"] < 0.55 and g["rmia-tpr@1%-low"] <= 0.01 <= g["rmia-tpr@1%-high"]
    assert u["rmia-vs-gold-auc"] == 1.0 and u["lira-vs-gold-auc"] == 0.5  # identical LiRA scores
    assert "rmia-vs-gold-auc" not in g and u["members"] == 1000 and u["nonmembers"] == 1000


def test_the_erasure_verdict_reads_the_tpr_bound_against_the_gold_or_chance_and_the_thresholds_uncertainty():
    def fig(tpr, low, high, fpr_high, members=500, nonmembers=1000):
        return {
            "rmia-tpr@1%": tpr,
            "rmia-tpr@1%-low": low,
            "rmia-tpr@1%-high": high,
            "rmia-tpr@1%-fpr-high": fpr_high,
            "members": members,
            "nonmembers": nonmembers,
        }

    ok, text = A.erasure_verdict(fig(0.012, 0.005, 0.025, 0.018))
    assert ok is True and text.startswith("consistent with erasure") and "chance" in text
    bad, text = A.erasure_verdict(fig(0.20, 0.16, 0.24, 0.018))
    assert bad is False and text.startswith("NOT CONSISTENT WITH ERASURE") and "500 training samples" in text
    # few non-members: the threshold's own FPR may be up to 4.6 %, so a 4 % lower bound proves nothing
    assert A.erasure_verdict(fig(0.06, 0.04, 0.08, 0.046, nonmembers=120))[0] is True
    # against the gold: the gold itself finds 15 %, so 16 % with lower bound 12 % is consistent
    assert A.erasure_verdict(fig(0.16, 0.12, 0.2, 0.018), gold={"rmia-tpr@1%": 0.15})[0] is True
    assert A.erasure_verdict(fig(float("nan"), float("nan"), float("nan"), float("nan"), nonmembers=50))[0] is None


def test_roc_on_grid_interpolates_and_leaves_unmeasured_rates_out():
    rng = np.random.default_rng(1)
    scores = {"m": {"rmia-forget": rng.normal(1, 1, 300), "rmia-heldout": rng.normal(0, 1, 100)}}
    c = A.roc_on_grid(scores, "rmia", points=31)["m"]
    fpr, tpr = np.array(c["fpr"]), np.array(c["tpr"])
    assert fpr[0] == pytest.approx(1e-3) and fpr[-1] == pytest.approx(1.0) and tpr[-1] == pytest.approx(1.0)
    assert np.all(np.isnan(tpr[fpr < 0.01])) and not np.any(np.isnan(tpr[fpr >= 0.01]))
    assert np.all(np.diff(tpr[fpr >= 0.01]) >= 0)  # a ROC curve never falls
