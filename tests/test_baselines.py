"""Baselines (fine-tune, NoT, gradient ascent) on hand-checkable cases (pure math)."""

import numpy as np
import pytest
import torch
from torch import nn

from fed_unlearn.aggregation import ClientUpdate
from fed_unlearn.unlearning import make_method
from fed_unlearn.unlearning.base import apply_departing_motion
from fed_unlearn.unlearning.gradient_ascent import GradientAscentConfig, gradient_ascent
from fed_unlearn.unlearning.negation import negate, negated_layers

G = {"net.1.weight": np.ones((2, 3), np.float32), "net.1.bias": np.full(2, 2.0, np.float32),
     "net.3.weight": np.full((1, 2), 3.0, np.float32), "net.3.bias": np.zeros(1, np.float32)}


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
    for p, p0, g in zip(model.parameters(), w0, grads):
        np.testing.assert_allclose((p.detach() - p0).numpy(), (0.5 * g).numpy(), atol=1e-6)
    after = float(nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))
    assert after > float(loss)


def test_gradient_ascent_early_stop_at_target():
    model, x, y = small_model_and_data()
    steps = gradient_ascent(model, x, y, GradientAscentConfig(lr=0.5, epochs=50, batch_size=8, target_ratio=1.0),
                            seed=0, reference_loss=1.5)
    assert steps < 50 * 5


@pytest.mark.parametrize("rc", [{"gradient-ascent.lr": -1.0}, {"gradient-ascent.epochs": 0}])
def test_gradient_ascent_bad_settings(rc):
    with pytest.raises(ValueError):
        make_method("gradient-ascent", rc)
