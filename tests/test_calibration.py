"""Choosing the scale of the unlearning step: pure math with known answers."""

import pytest

from fed_unlearn.calibration import choose_scale, pooled, target_for

S = (0.0, 0.25, 0.5, 0.75, 1.0)


def test_loss_match_interpolates_where_the_forget_loss_crosses_the_held_out_loss():
    # forget loss 0.1 + 0.8 c, held-out loss 0.5: crossing at c = 0.5 exactly
    cal = choose_scale(S, [0.1 + 0.8 * c for c in S], [0.5] * 5, [1.0] * 5)
    assert cal.scale == pytest.approx(0.5) and cal.reached and cal.target == "loss-match"
    # crossing between candidates: 0.1 + 0.8 c = 0.3 at c = 0.25 ... held-out 0.35 -> c = 0.3125
    assert choose_scale(S, [0.1 + 0.8 * c for c in S], [0.35] * 5, [1.0] * 5).scale == pytest.approx(0.3125)


def test_nothing_memorised_means_no_step_and_an_unreached_target_means_the_full_step():
    nothing = choose_scale(S, [0.6] * 5, [0.5] * 5, [1.0] * 5)
    assert nothing.scale == 0.0 and nothing.reached
    never = choose_scale(S, [0.1] * 5, [0.5] * 5, [1.0] * 5)
    assert never.scale == 1.0 and not never.reached and never.gaps[0] == pytest.approx(-0.4)


def test_accuracy_floor_for_a_class():
    assert target_for("class") == "accuracy-floor" and target_for("client") == target_for("samples") == "loss-match"
    cal = choose_scale(S, [0.0] * 5, [0.0] * 5, [0.9, 0.5, 0.1, 0.0, 0.0], "accuracy-floor", floor=0.02)
    # accuracy 0.1 at c = 0.5, 0.0 at 0.75: 0.02 is reached at 0.5 + 0.25 * 0.08 / 0.1
    assert cal.scale == pytest.approx(0.5 + 0.25 * 0.8) and cal.reached


def test_pooled_means_are_example_weighted_and_bad_inputs_are_refused():
    a = {"forget-loss-sum": [1.0, 3.0], "forget-correct": [2.0, 1.0], "heldout-loss-sum": [2.0, 2.0],
         "forget-n": [2.0], "heldout-n": [4.0]}
    b = {"forget-loss-sum": [2.0, 3.0], "forget-correct": [2.0, 0.0], "heldout-loss-sum": [0.0, 4.0],
         "forget-n": [2.0], "heldout-n": [1.0]}
    m = pooled([a, b])
    assert m["forget-loss"] == [0.75, 1.5] and m["heldout-loss"] == [0.4, 1.2] and m["forget-acc"] == [1.0, 0.25]
    with pytest.raises(ValueError, match="increase from 0"):
        choose_scale((0.5, 1.0), [0, 0], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="unknown calibration target"):
        choose_scale(S, [0] * 5, [0] * 5, [0] * 5, "gold")
