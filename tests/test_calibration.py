"""Choosing the scale of the unlearning step: pure math with known answers."""

import numpy as np
import pytest

from fed_unlearn.calibration import Measurement, choose_scale, client_stats, extension_limit, pooled, target_for

TIER = "unit"  # see tests/conftest.py

S = (0.0, 0.25, 0.5, 0.75, 1.0)


def test_loss_match_interpolates_where_the_forget_loss_crosses_the_held_out_loss():
    # forget loss 0.1 + 0.8 c, held-out loss 0.5: crossing at c = 0.5 exactly
    cal = choose_scale(S, [0.1 + 0.8 * c for c in S], [0.5] * 5, [1.0] * 5)
    assert cal.scale == pytest.approx(0.5) and cal.reached and cal.target == "loss-match"
    # crossing between candidates: 0.1 + 0.8 c = 0.3 at c = 0.25 ... held-out 0.35 -> c = 0.3125
    assert choose_scale(S, [0.1 + 0.8 * c for c in S], [0.35] * 5, [1.0] * 5).scale == pytest.approx(0.3125)


def test_with_held_out_accuracy_the_loss_and_the_accuracy_must_both_look_unseen():
    # the mean loss matches at c = 0.5, but the forget set is still predicted better than
    # held-out data until c = 0.75 (accuracy 1 - 0.8 c against 0.4): the later scale wins
    acc = [1 - 0.8 * c for c in S]
    cal = choose_scale(S, [0.1 + 0.8 * c for c in S], [0.5] * 5, acc, heldout_acc=[0.4] * 5)
    assert cal.scale == pytest.approx(0.75) and cal.reached
    assert choose_scale(S, [0.1 + 0.8 * c for c in S], [0.5] * 5, acc, heldout_acc=[1.0] * 5).scale == 0.5
    with pytest.raises(ValueError, match="held-out accuracy"):
        choose_scale(S, [0.1] * 5, [0.5] * 5, acc, heldout_acc=[0.4] * 4)
    stats = {"forget-loss-sum": [1.0], "forget-correct": [2.0], "heldout-loss-sum": [1.0], "heldout-correct": [3.0]}
    assert pooled([{**stats, "forget-n": [4.0], "heldout-n": [4.0]}])["heldout-acc"] == [0.75]


def test_nothing_memorised_means_no_step_and_an_unreached_target_the_closest_candidate():
    nothing = choose_scale(S, [0.6] * 5, [0.5] * 5, [1.0] * 5)
    assert nothing.scale == 0.0 and nothing.reached
    short = choose_scale(S, [0.1, 0.2, 0.3, 0.35, 0.4], [0.5] * 5, [1.0] * 5)
    assert short.scale == 1.0 and not short.reached and short.gaps[0] == pytest.approx(-0.4)
    # the step raises the held-out loss faster than the forget loss: taking it only moves away
    worse = choose_scale(S, [0.30, 0.31, 0.32, 0.33, 0.34], [0.33, 0.35, 0.37, 0.39, 0.41], [1.0] * 5)
    assert worse.scale == 0.0 and not worse.reached


def test_memorisation_tests_the_mean_losses_and_reports_the_loss_attack():
    from fed_unlearn.calibration import mann_whitney_z, memorisation

    # the attack's AUC: one client, 100 + 100 samples, AUC 0.6: z = 0.1 * 10^4 / sqrt(10^4 * 201 / 12)
    z, auc = mann_whitney_z([0.6], [100], [100])
    assert z == pytest.approx(1000 / np.sqrt(1e4 * 201 / 12)) and auc == pytest.approx(0.6)
    z2, auc2 = mann_whitney_z([0.6, 0.5], [100, 300], [100, 100])  # strata add up, AUC weighted by pairs
    assert z2 == pytest.approx(1000 / np.sqrt(1e4 * 201 / 12 + 3e4 * 401 / 12))
    assert auc2 == pytest.approx((0.6 * 1e4 + 0.5 * 3e4) / 4e4)

    def stats(f, h, var, n, acc=0.5):
        return {
            "forget-loss-sum": [0.0],
            "forget-correct": [0.0],
            "heldout-loss-sum": [0.0],
            "forget-n": [n],
            "heldout-n": [n],
            "pre-forget-loss-sum": [f * n],
            "pre-forget-loss-sq": [(var + f * f) * n],
            "pre-forget-correct": [acc * n],
            "pre-heldout-loss-sum": [h * n],
            "pre-heldout-loss-sq": [(var + h * h) * n],
            "pre-auc": [0.55],
        }

    # mean losses 0.30 / 0.33, variance 0.09, 100 + 100 samples: se = sqrt(2 * 0.09 / 100) = 0.0424
    pre = pooled([stats(0.30, 0.33, 0.09, 100.0)])["pre"]
    assert pre["se"] == pytest.approx(0.0424264, rel=1e-4) and pre["auc"] == pytest.approx(0.55)
    noise = memorisation(pre, z=1.0)
    assert not noise.memorised and noise.statistic == pytest.approx(0.03 / 0.0424264, rel=1e-4)
    assert memorisation(pooled([stats(0.30, 0.33, 0.09, 1e4)])["pre"], z=1.0).memorised  # 7 standard errors
    assert not memorisation(pooled([stats(0.40, 0.33, 0.09, 1e4)])["pre"], z=0.0).memorised  # already unseen
    # a class: memorised while the model still predicts it
    assert memorisation(pre, "accuracy-floor", floor=0.02).memorised
    assert not memorisation(pooled([stats(0.3, 0.3, 0.1, 100.0, acc=0.01)])["pre"], "accuracy-floor").memorised


def test_accuracy_floor_for_a_class():
    assert target_for("class") == "accuracy-floor" and target_for("client") == target_for("samples") == "loss-match"
    cal = choose_scale(S, [0.0] * 5, [0.0] * 5, [0.9, 0.5, 0.1, 0.0, 0.0], "accuracy-floor", floor=0.02)
    # accuracy 0.1 at c = 0.5, 0.0 at 0.75: 0.02 is reached at 0.5 + 0.25 * 0.08 / 0.1
    assert cal.scale == pytest.approx(0.5 + 0.25 * 0.8) and cal.reached


def test_pooled_means_are_example_weighted_and_bad_inputs_are_refused():
    a = {
        "forget-loss-sum": [1.0, 3.0],
        "forget-correct": [2.0, 1.0],
        "heldout-loss-sum": [2.0, 2.0],
        "forget-n": [2.0],
        "heldout-n": [4.0],
    }
    b = {
        "forget-loss-sum": [2.0, 3.0],
        "forget-correct": [2.0, 0.0],
        "heldout-loss-sum": [0.0, 4.0],
        "forget-n": [2.0],
        "heldout-n": [1.0],
    }
    m = pooled([a, b])
    assert m["forget-loss"] == [0.75, 1.5] and m["heldout-loss"] == [0.4, 1.2] and m["forget-acc"] == [1.0, 0.25]
    with pytest.raises(ValueError, match="increase from 0"):
        choose_scale((0.5, 1.0), [0, 0], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="unknown calibration target"):
        choose_scale(S, [0] * 5, [0] * 5, [0] * 5, "gold")


def test_on_logistic_regression_fixed_ascent_overshoots_the_gold_and_the_calibrated_step_does_not():
    """Ascent Fails to Forget's setting: a convex model, an IID departing client; the verdict names the overshoot."""
    import numpy as np

    from fed_unlearn.aggregation import ClientUpdate, fedavg
    from fed_unlearn.metrics import cross_entropy, kl_divergence, weight_distance
    from fed_unlearn.models import build_model, get_weights, set_weights
    from fed_unlearn.report import further_than_original
    from fed_unlearn.training import TrainSettings, predict_logits, train_local
    from fed_unlearn.unlearning.puf import puf_update

    rng = np.random.default_rng(0)
    k, n, d = 4, 120, 10

    def blob(m):
        y = rng.integers(0, 2, m)
        return (rng.normal(size=(m, d)) + 0.6 * (2 * y - 1)[:, None]).astype(np.float32), y.astype(np.int64)

    clients, held = [blob(n) for _ in range(k)], blob(60)
    settings = TrainSettings(epochs=10, batch_size=8, lr=0.5, momentum=0.0)

    def local(w, c, rnd):
        m = build_model("linear", (d,), 2, 0)
        set_weights(m, w)
        train_local(m, *clients[c], settings, seed=1000 * rnd + c)
        return ClientUpdate(c, get_weights(m), n)

    def federation(ids, rounds=5):
        w = get_weights(build_model("linear", (d,), 2, 0))
        for r in range(1, rounds + 1):
            w = dict(fedavg([local(w, c, r) for c in ids]))
        return w

    def logits(w, x):
        m = build_model("linear", (d,), 2, 0)
        set_weights(m, w)
        return predict_logits(m, x)

    original, gold = federation(range(k)), federation(range(1, k))
    ups = [local(original, c, 6) for c in range(k)]
    fixed = puf_update(original, ups[1:], ups[:1], eta=2 * k)  # PUF's reference step
    base = dict(fedavg(ups[1:]))
    step = {key: fixed[key].astype(np.float64) - base[key] for key in base}
    scales = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    cands = [{key: (base[key] + c * step[key]).astype(np.float32) for key in base} for c in scales]
    fl = [float(np.mean(cross_entropy(logits(w, clients[0][0]), clients[0][1]))) for w in cands]
    hl = [float(np.mean(cross_entropy(logits(w, held[0]), held[1]))) for w in cands]
    fa = [float(np.mean(logits(w, clients[0][0]).argmax(1) == clients[0][1])) for w in cands]
    cal = choose_scale(scales, fl, hl, fa)
    calibrated = {key: (base[key] + cal.scale * step[key]).astype(np.float32) for key in base}
    gl = logits(gold, clients[0][0])

    def figures(w):
        return {"l2-to-gold": weight_distance(w, gold), "kl-forget": kl_divergence(gl, logits(w, clients[0][0]))}

    report = {"original": figures(original), "fixed": figures(fixed), "calibrated": figures(calibrated), "gold": {}}
    assert further_than_original(report, "fixed") == ["kl-forget", "l2-to-gold"]
    assert further_than_original(report, "calibrated") == []
    assert cal.scale < 0.5


def test_the_target_is_the_whole_loss_distribution_at_chance_not_one_mean():
    # mean losses cross at c = 0.5 but the attack's AUC only reaches chance at c = 0.75: the distribution decides
    loss = [0.1 + 0.8 * c for c in S]
    auc = [0.8, 0.7, 0.6, 0.5, 0.4]
    cal = choose_scale(S, loss, [0.5] * 5, [1.0] * 5, auc=auc)
    assert cal.scale == pytest.approx(0.75) and cal.reached
    # never past chance: the first candidate at or below 0.5 (interpolated), not the one furthest below
    assert choose_scale(S, loss, [0.5] * 5, [1.0] * 5, auc=[0.6, 0.45, 0.3, 0.2, 0.1]).scale == pytest.approx(
        0.25 * 0.1 / 0.15
    )


def test_pooled_auc_per_scale_is_the_stratified_mann_whitney_and_memorisation_needs_strong_evidence():
    from fed_unlearn.calibration import memorisation

    def client(auc, n, m, pre_auc, pre_fa, pre_ha):
        return {
            "forget-loss-sum": [0.0, 0.0],
            "forget-correct": [0.0, 0.0],
            "heldout-loss-sum": [0.0, 0.0],
            "forget-auc": auc,
            "forget-n": [n],
            "heldout-n": [m],
            "pre-forget-loss-sum": [0.3 * n],
            "pre-forget-loss-sq": [0.1 * n],
            "pre-forget-correct": [pre_fa * n],
            "pre-heldout-correct": [pre_ha * m],
            "pre-heldout-loss-sum": [0.35 * m],
            "pre-heldout-loss-sq": [0.13 * m],
            "pre-auc": [pre_auc],
        }

    m = pooled([client([0.6, 0.5], 100.0, 100.0, 0.6, 0.9, 0.8), client([0.5, 0.5], 300.0, 100.0, 0.5, 0.9, 0.8)])
    assert m["auc"][0] == pytest.approx((0.6 * 1e4 + 0.5 * 3e4) / 4e4) and m["auc"][1] == pytest.approx(0.5)
    assert m["auc-z"][1] == pytest.approx(0.0)
    pre = m["pre"]
    # accuracy 0.9 vs 0.8 on 400 + 200 samples: z = 0.1 / sqrt(p (1 - p) (1/400 + 1/200)), p = 2.6 / 3
    p = (0.9 * 400 + 0.8 * 200) / 600
    assert pre["acc-z"] == pytest.approx(0.1 / np.sqrt(p * (1 - p) * (1 / 400 + 1 / 200)))
    assert memorisation(pre, z=2.0).memorised and memorisation(pre, z=2.0).statistic == pytest.approx(pre["acc-z"])
    # what a well-fit convex model shows by sampling alone (UCI Adult: AUC 0.508, accuracy 1.2 points over
    # 1,200 held-out samples): about one standard error, not evidence
    adult = pooled([client([0.508, 0.508], 4800.0, 1200.0, 0.508, 0.850, 0.838)])["pre"]
    assert 0.5 < adult["auc-z"] < 2.0 and 0.5 < adult["acc-z"] < 2.0
    assert not memorisation(adult, z=2.0).memorised


def test_client_stats_pool_into_the_means_and_the_memorisation_figures():
    """Two clients' reports (sums and counts only) pool into the means over all their samples."""
    a = Measurement(np.array([0.1, 0.3]), 2, np.array([1.0, 2.0, 3.0]), 1)
    b = Measurement(np.array([0.2, 0.4]), 1, np.array([0.5, 0.5, 1.0]), 3)
    one = client_stats([a, b], pre_request=a, forget_n=2, heldout_n=3)
    two = client_stats([b, b], pre_request=b, forget_n=2, heldout_n=3)
    assert one["forget-auc"] == [1.0, 1.0]  # every forget loss below every held-out loss: fully member-like
    out = pooled([one, two])
    assert out["forget-loss"] == pytest.approx([(0.4 + 0.6) / 4, (0.6 + 0.6) / 4])
    assert out["heldout-loss"] == pytest.approx([(6.0 + 2.0) / 6, (2.0 + 2.0) / 6])
    assert out["forget-acc"] == pytest.approx([3 / 4, 2 / 4]) and out["heldout-acc"] == pytest.approx([4 / 6, 6 / 6])
    pre = out["pre"]
    assert pre["forget-loss"] == pytest.approx(1.0 / 4) and pre["heldout-loss"] == pytest.approx(8.0 / 6)
    assert pre["auc"] == pytest.approx(1.0) and pre["auc-z"] > 0


def test_other_held_out_samples_pool_over_the_clients_that_have_them():
    """Client one has 2 other held-out samples, client two none: the rest's means are client one's alone."""
    a = Measurement(np.array([0.1]), 1, np.array([1.0]), 1, rest_loss=np.array([0.2, 0.4]), rest_correct=2)
    b = Measurement(np.array([0.1]), 1, np.array([1.0]), 1, rest_loss=np.array([0.6, 0.8]), rest_correct=1)
    one = client_stats([a, b], None, forget_n=1, heldout_n=1)
    assert one["rest-loss-sum"] == pytest.approx([0.6, 1.4]) and one["rest-n"] == [2.0]
    two = client_stats([Measurement(np.array([0.1]), 1, np.array([1.0]), 1)] * 2, None, forget_n=1, heldout_n=1)
    assert "rest-n" not in two
    out = pooled([one, two])
    assert out["rest-loss"] == pytest.approx([0.3, 0.7]) and out["rest-acc"] == pytest.approx([1.0, 0.5])
    assert "rest-loss" not in pooled([two, two])


def test_a_step_beyond_the_method_own_goes_only_as_far_as_what_stays_allows():
    """Scales 0, 1, 2, 4, 8; tolerance 10 %: each guard's bound, the tightest wins, never below 1."""
    scales = [0.0, 1.0, 2.0, 4.0, 8.0]
    flat = [1.0, 1.0, 1.0, 1.0, 1.0]
    rising = [1.0, 1.02, 1.05, 1.15, 2.0]  # crosses 1.1 halfway between 2 and 4
    assert extension_limit(scales, [flat], 0.1) == 8.0
    assert extension_limit(scales, [flat, rising], 0.1) == pytest.approx(3.0)
    assert extension_limit(scales, [[1.0, 1.2]], 0.1) == 1.0  # the full step already costs 20 %: nothing longer
    assert extension_limit(scales, [[1.0, 1.0, 1.2]], 0.1) == pytest.approx(1.5)  # a walk stopped at 2
    assert extension_limit(scales, [], 0.1) == 1.0  # no evidence: no longer step
    with pytest.raises(ValueError, match="start 0, 1"):
        extension_limit([0.0, 0.5, 2.0], [flat[:3]], 0.1)
    with pytest.raises(ValueError, match="scales 0 and 1"):
        extension_limit(scales, [[1.0]], 0.1)


def test_a_class_the_clients_who_stay_do_not_hold_is_unsupported():
    from fed_unlearn.calibration import unsupported_classes

    # the clients who stay: 500 of class 0, 3 of class 1, none of class 2 (and no count at all of class 3);
    # the forget set: 100, 400, 50, 10. Floor 1 %: 3 / 403 < 0.01, 0 / 50, 0 / 10 are unsupported
    assert unsupported_classes([500, 3, 0], [100, 400, 50, 10], 0.01) == (1, 2, 3)
    assert unsupported_classes([500, 3, 0], [100, 400, 50, 10], 0.005) == (2, 3)  # 3 / 403 = 0.0074
    assert unsupported_classes([500, 3, 0], [100, 0, 50, 0], 0.01) == (2,)  # a class not forgotten is not asked
    assert unsupported_classes([500, 3, 0, 9], [100, 400, 50], 0.01) == (1, 2)  # longer counts: extra ignored
    assert unsupported_classes([500, 3, 0], [100, 400, 50], 0.0) == ()  # floor 0: the rule is off
    with pytest.raises(ValueError, match="support floor"):
        unsupported_classes([1], [1], 1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        unsupported_classes([-1.0], [1], 0.01)
    with pytest.raises(ValueError, match="finite and >= 0"):
        unsupported_classes([float("nan")], [1], 0.01)


def test_the_accuracy_on_unsupported_classes_joins_the_target_and_the_memorisation_test():
    from fed_unlearn.calibration import memorisation, unsupported_accuracy

    # per scale, correct counts of classes 0, 1, 2 (class sizes 10, 20, 30); classes 1 and 2 unsupported
    correct = [[10, 20, 30], [10, 10, 15], [10, 0, 0]]
    assert unsupported_accuracy(correct, [10, 20, 30], [1, 2]) == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="no forget sample"):
        unsupported_accuracy(correct, [10, 0, 0], [1, 2])
    scales = (0.0, 0.5, 1.0)
    # the losses look unseen from c = 0.5 on; the unsupported classes reach the 0.02 floor only at
    # 0.5 + 0.5 * (0.5 - 0.02) / 0.5 = 0.98
    loss = choose_scale(scales, [0.1, 0.5, 0.9], [0.5] * 3, [1.0] * 3)
    assert loss.scale == pytest.approx(0.5)
    both = choose_scale(scales, [0.1, 0.5, 0.9], [0.5] * 3, [1.0] * 3, unsupported_acc=[1.0, 0.5, 0.0])
    assert both.scale == pytest.approx(0.98) and both.reached
    with pytest.raises(ValueError, match="unsupported classes per scale"):
        choose_scale(scales, [0.1, 0.5, 0.9], [0.5] * 3, [1.0] * 3, unsupported_acc=[1.0, 0.5])
    # no evidence of memorisation by the losses, but the model predicts a class only the departing hold
    quiet = {
        "forget-loss": 0.5,
        "heldout-loss": 0.5,
        "forget-acc": 0.9,
        "se": 0.1,
        "auc": 0.5,
        "auc-z": 0.0,
        "acc-z": 0.0,
    }
    assert not memorisation(quiet, z=2.0).memorised
    assert memorisation({**quiet, "unsupported-acc": 0.9}, z=2.0).memorised
    assert not memorisation({**quiet, "unsupported-acc": 0.01}, z=2.0).memorised  # at the floor: forgotten
    with pytest.raises(ValueError, match="finite"):
        memorisation({**quiet, "unsupported-acc": float("nan")}, z=2.0)


def test_label_counts_add_up_per_class_and_the_unsupported_accuracy_joins_the_pooled_figures():
    from fed_unlearn.calibration import summed_counts, with_unsupported

    assert summed_counts([[1, 2], [3], [0, 0, 5]]) == [4.0, 2.0, 5.0] and summed_counts([]) == []
    measured = {"class-correct": [[4, 2], [4, 1]], "pre-class-correct": [4, 2], "pre": {}}
    with_unsupported(measured, [1], [4, 2])
    assert measured["unsupported-acc"] == [1.0, 0.5] and measured["pre"]["unsupported-acc"] == 1.0
    untouched = {"class-correct": [[4, 2]], "pre": {}}
    with_unsupported(untouched, [], [4, 2])  # no unsupported class: nothing added
    assert "unsupported-acc" not in untouched and untouched["pre"] == {}


def test_per_class_counts_pool_scale_major_over_clients():
    """Two clients, two scales, three classes: the pooled per-class correct counts add up per scale."""

    def m(correct: list[float]) -> Measurement:
        return Measurement(
            np.array([0.1, 0.2]), sum(correct), np.array([1.0]), 1, forget_class_correct=np.array(correct)
        )

    one = client_stats([m([2, 0, 0]), m([1, 0, 0])], m([2, 0, 0]), forget_n=2, heldout_n=1, forget_class_n=[2, 0, 0])
    two = client_stats([m([0, 1, 1]), m([0, 0, 1])], m([0, 1, 1]), forget_n=2, heldout_n=1, forget_class_n=[0, 1, 1])
    assert one["forget-class-correct"] == [2.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # scale-major
    out = pooled([one, two])
    assert out["class-n"] == [2.0, 1.0, 1.0]
    assert out["class-correct"] == [[2.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    assert out["pre-class-correct"] == [2.0, 1.0, 1.0]
    # a client without per-class counts: no per-class figures at all (a class is judged on every client's counts)
    bare = client_stats([m([0, 1, 1]), m([0, 0, 1])], None, forget_n=2, heldout_n=1)
    assert "forget-class-n" not in bare and "class-n" not in pooled([one, bare])
    with pytest.raises(ValueError, match="one row per scale"):
        pooled([one, {**two, "forget-class-correct": [0.0, 1.0]}])
