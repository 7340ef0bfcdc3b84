"""Baselines (retrain, fine-tune, NoT, gradient ascent, FedEraser, PGA, IEU) on hand-checkable cases (pure math)."""

import numpy as np
import pytest
import torch
from torch import nn

from fed_unlearn.aggregation import ClientUpdate
from fed_unlearn.unlearning import make_method
from fed_unlearn.unlearning.base import apply_departing_motion
from fed_unlearn.unlearning.gradient_ascent import GradientAscentConfig, gradient_ascent
from fed_unlearn.unlearning.negation import negate, negated_layers

TIER = "unit"  # see tests/conftest.py

G = {
    "net.1.weight": np.ones((2, 3), np.float32),
    "net.1.bias": np.full(2, 2.0, np.float32),
    "net.3.weight": np.full((1, 2), 3.0, np.float32),
    "net.3.bias": np.zeros(1, np.float32),
}


def up(cid, val, n):
    return ClientUpdate(cid, {k: np.full(v.shape, val, np.float32) for k, v in G.items()}, n)


def test_fine_tune_is_fedavg_of_remaining_and_ignores_departing():
    m = make_method("fine-tune")
    assert m.remaining_clients_train and not m.departing_clients_train
    out = m.aggregate(G, [up(1, 1.0, 1), up(2, 4.0, 2)], [up(3, 100.0, 5)])
    assert all(np.allclose(v, 3.0) for v in out.values())


def test_not_negates_the_first_layer_by_default():
    assert negated_layers(G, "") == ["net.1"]
    out = make_method("not").prepare_global(G)
    np.testing.assert_array_equal(out["net.1.weight"], -G["net.1.weight"])
    np.testing.assert_array_equal(out["net.1.bias"], -G["net.1.bias"])
    np.testing.assert_array_equal(out["net.3.weight"], G["net.3.weight"])
    both = negate(G, negated_layers(G, "net.1, net.3"))
    assert all(np.array_equal(both[k], -G[k]) for k in G)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['conv9'\]"):
        make_method("not", {"not.layers": "conv9"}).prepare_global(G)


def test_apply_departing_motion_hand_computed():
    out = apply_departing_motion(G, [up(1, 0.0, 1), up(2, 3.0, 3)], [up(5, 2.0, 1)])
    # net.3.bias: 0 + (2 - 0) + (1*0 + 3*3)/4 = 4.25
    np.testing.assert_allclose(out["net.3.bias"], 4.25)
    # net.1.weight: 1 + (2 - 1) + (1*(0-1) + 3*(3-1))/4 = 3.25
    np.testing.assert_allclose(out["net.1.weight"], 3.25)


def small_model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    return model, x, (x[:, 0] > 0).astype(np.int64)


def test_gradient_ascent_first_step_and_loss_rises():
    model, x, y = small_model_and_data()
    w0 = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    steps = gradient_ascent(model, x, y, GradientAscentConfig(lr=0.5, batch_size=40), seed=0)
    assert steps == 1
    for p, p0, g in zip(model.parameters(), w0, grads, strict=False):
        np.testing.assert_allclose((p.detach() - p0).numpy(), (0.5 * g).numpy(), atol=1e-6)
    after = float(nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).detach())
    assert after > float(loss.detach())


def test_gradient_ascent_early_stop_at_target():
    cfg = GradientAscentConfig(lr=0.5, epochs=50, batch_size=8, target_ratio=1.0)  # cap: 50 epochs x 5 batches

    def run(reference: float) -> tuple[int, float]:
        model, x, y = small_model_and_data()
        steps = gradient_ascent(model, x, y, cfg, seed=0, reference_loss=reference)
        return steps, float(nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).detach())

    start = run(0.0)  # a target every minibatch meets: one step
    low, high = run(1.5), run(3.0)
    assert start[0] == 1
    assert 1 < low[0] < high[0] < 250, (low, high)  # stops before the cap, later for a higher target
    assert low[1] > 1.0 and high[1] > low[1]  # and the loss it stopped at is of the target's order
    assert run(float("nan"))[0] == 250  # no reference: plain ascent to the cap


@pytest.mark.parametrize("rc", [{"gradient-ascent.lr": -1.0}, {"gradient-ascent.epochs": 0}])
def test_gradient_ascent_bad_settings(rc):
    with pytest.raises(ValueError):
        make_method("gradient-ascent", rc)


def test_apply_departing_motion_joint_request_is_the_weighted_mean():
    # one request spread over two clients: c_u = m_u / M = 1/4, 3/4 -> net.3.bias 0 + (1*2 + 3*6)/4 = 5
    out = apply_departing_motion(G, [], [up(5, 2.0, 1), up(6, 6.0, 3)], joint=True)
    np.testing.assert_allclose(out["net.3.bias"], 5.0)
    sep = apply_departing_motion(G, [], [up(5, 2.0, 1), up(6, 6.0, 3)])  # separate requests add up: 2 + 6
    np.testing.assert_allclose(sep["net.3.bias"], 8.0)


# -- retrain ------------------------------------------------------------------------------
def test_retrain_restarts_from_the_initial_model_and_replays_the_gold_seeds():
    m = make_method("retrain")
    assert m.remaining_clients_train and not m.departing_clients_train
    w0 = {k: v * 0 for k, v in G.items()}
    m.observe(1, w0, [up(0, 1.0, 1)])
    m.observe(2, G, [up(0, 1.0, 1)])
    assert m.num_rounds == 2 and m.rounds_needed(5) == 5
    assert all(np.array_equal(m.prepare_global(G)[k], w0[k]) for k in G)  # step 0: the initial model
    assert m.remaining_config() == {"seed-round": 1}
    out = m.aggregate(w0, [up(1, 1.0, 1), up(2, 4.0, 2)], [])
    assert all(np.allclose(v, 3.0) for v in out.values())
    assert m.remaining_config() == {"seed-round": 2} and m.prepare_global(out) is out
    with pytest.raises(RuntimeError, match="initial model"):
        make_method("retrain").prepare_global(G)


# -- FedEraser ------------------------------------------------------------------------------
def test_federaser_calibrated_step_keeps_old_length_and_new_direction():
    from fed_unlearn.unlearning.federaser import calibrated_step

    old = {"a": np.array([3.0, 4.0]), "b": np.array([1.0]), "z": np.array([2.0, 0.0])}
    new = {"a": np.array([0.0, -2.0]), "b": np.array([-5.0]), "z": np.zeros(2)}
    step = calibrated_step(old, new)
    np.testing.assert_allclose(step["a"], [0.0, -5.0])  # ||old|| = 5 along (0, -1)
    np.testing.assert_allclose(step["b"], [-1.0])
    np.testing.assert_allclose(step["z"], [0.0, 0.0])  # no calibrated direction: no step


def test_federaser_stores_history_and_reconstructs_by_hand():
    from fed_unlearn.unlearning.federaser import FedEraser, FedEraserConfig

    w = {"a": np.array([0.0, 0.0], np.float32)}

    def u(cid, vals, n):
        return ClientUpdate(cid, {"a": np.array(vals, np.float32)}, n)

    m = FedEraser(FedEraserConfig(interval=1, calibration_ratio=0.5))
    # round 1 from w0 = 0: client updates (1,0) n=1, (0,2) n=1, (9,9) n=2 (client 2 will leave)
    m.observe(1, w, [u(0, [1, 0], 1), u(1, [0, 2], 1), u(2, [9, 9], 2)])
    w2 = {"a": np.array([5.0, 5.0], np.float32)}
    # round 2 from (5,5): updates relative to it: (3,0), (0,4) for the clients that stay
    m.observe(2, w2, [u(0, [8, 5], 1), u(1, [5, 9], 1), u(2, [0, 0], 2)])
    # 2 checkpoints x (start model + 3 client updates) x 2 float32 values = 64 bytes
    assert m.history_bytes() == 2 * (1 + 3) * 2 * 4
    assert m.rounds_needed(2) == 1 and make_method("federaser", {"federaser.interval": 2}).rounds_needed(5) == 2
    m.begin([2], leave=True)
    assert m.num_rounds == 1 and m.remaining_clients_train
    start = m.prepare_global(w2)
    np.testing.assert_allclose(start["a"], [0.5, 1.0])  # w0 + mean((1,0), (0,2)) without client 2
    assert m.remaining_config() == {"local-epochs-ratio": 0.5}
    # calibration from (0.5, 1): both clients move by (0, +1) -> direction (0, 1);
    # old U_2 = mean((3,0),(0,4)) = (1.5, 2), length 2.5
    out = m.aggregate(start, [u(0, [0.5, 2.0], 1), u(1, [0.5, 2.0], 1)], [])
    np.testing.assert_allclose(out["a"], [0.5, 3.5])
    assert m.checkpoints == [] and m.history_bytes() == 64  # history dropped, peak reported


def test_federaser_needs_history():
    m = make_method("federaser")
    with pytest.raises(RuntimeError, match="no stored rounds"):
        m.begin([0], leave=True)
    with pytest.raises(ValueError):
        make_method("federaser", {"federaser.calibration-ratio": 0.0})


# -- projected gradient ascent -----------------------------------------------------------------
def test_pga_reference_is_the_other_clients_average():
    from fed_unlearn.unlearning.projected_ga import reference_weights

    # clients: u with n=1 at 4, others (n=3) average 0 -> FedAvg w = 1
    ref = reference_weights({"a": np.array([1.0])}, {"a": np.array([4.0])}, total_examples=4, own_examples=1)
    np.testing.assert_allclose(ref["a"], [0.0])
    with pytest.raises(ValueError, match="N > n_u"):
        reference_weights({"a": np.array([1.0])}, {"a": np.array([4.0])}, total_examples=2, own_examples=2)


def test_pga_projection_and_ascent_stay_in_the_ball():
    from fed_unlearn.unlearning.projected_ga import PGAConfig, flat_params, project, projected_ascent, radius

    model, x, y = small_model_and_data()
    ref = flat_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    d0 = float(torch.norm(flat_params(model) - ref))
    assert project(model, ref, 0.5 * d0)
    moved = flat_params(model) - ref
    assert float(torch.norm(moved)) == pytest.approx(0.5 * d0, rel=1e-5)
    np.testing.assert_allclose((moved / torch.norm(moved)).numpy(), np.full(len(ref), 1 / np.sqrt(len(ref))), rtol=1e-4)
    assert not project(model, ref, d0)  # inside: untouched

    model, x, y = small_model_and_data()
    cfg = PGAConfig(lr=0.5, epochs=20, batch_size=8, stop_accuracy=0.0)
    ref = flat_params(model)
    delta = radius(model, cfg, seed=0)
    assert delta > 0 and radius(model, cfg, seed=0) == delta  # seeded
    out = projected_ascent(model, x, y, cfg, delta=0.05, seed=0)
    assert out["projections"] > 0 and float(torch.norm(flat_params(model) - ref)) <= 0.05 + 1e-6


def test_pga_stops_at_the_accuracy_threshold():
    from fed_unlearn.unlearning.projected_ga import PGAConfig, projected_ascent

    model, x, y = small_model_and_data()
    out = projected_ascent(
        model, x, y, PGAConfig(lr=0.5, epochs=50, batch_size=8, stop_accuracy=0.3), delta=1e9, seed=0
    )
    assert out["forget-acc-end"] <= 0.3 and out["train-steps"] < 50 * 5


# -- IEU --------------------------------------------------------------------------------------
def test_ieu_step_is_decayed_ascent_then_relative_noise():
    from fed_unlearn.unlearning.ieu import IEUConfig, add_relative_noise, ieu_unlearn

    model, x, y = small_model_and_data()
    w0 = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert ieu_unlearn(model, x, y, IEUConfig(lr=0.5, batch_size=40, weight_decay=0.2, noise=0.0), seed=0) == 1
    for p, p0, g in zip(model.parameters(), w0, grads, strict=False):
        np.testing.assert_allclose(p.detach().numpy(), ((1 - 0.5 * 0.2) * p0 + 0.5 * g).numpy(), atol=1e-6)
    big = nn.Linear(200, 100)
    before = [p.detach().clone() for p in big.parameters()]
    add_relative_noise(big, 0.1, seed=3)
    for p, b in zip(big.parameters(), before, strict=False):
        rms = float(torch.sqrt(torch.mean(b.double() ** 2)))
        assert float(torch.std((p.detach() - b).double())) == pytest.approx(0.1 * rms, rel=0.1)
    again = nn.Linear(200, 100)
    again.load_state_dict(dict(zip(["weight", "bias"], before, strict=False)))
    add_relative_noise(again, 0.1, seed=3)
    assert torch.equal(again.weight, big.weight)  # seeded
    with pytest.raises(ValueError, match="decay factor"):
        make_method("ieu", {"ieu.lr": 1.0, "ieu.weight-decay": 2.0})


def test_an_ascent_that_diverges_stops_at_its_last_finite_iterate():
    # plain ascent through ReLU layers grows the weights geometrically until the activations overflow
    # (inf - inf: NaN gradients); the loop ends there and the model keeps its last finite iterate
    _, x, y = small_model_and_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    steps = gradient_ascent(model, x, y, GradientAscentConfig(lr=1.0, epochs=50, batch_size=8), seed=0)
    assert 1 <= steps < 250
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert max(float(p.abs().max()) for p in model.parameters()) > 1e10  # it did ascend, as far as it could
