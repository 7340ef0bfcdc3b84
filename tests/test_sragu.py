"""SRAGU's update, stopping rules and spectral PUF on hand-checkable cases (pure math)."""

import numpy as np
import pytest
import torch
from torch import nn

from fed_unlearn.aggregation import ClientUpdate
from fed_unlearn.unlearning import make_method
from fed_unlearn.unlearning.puf import puf_update
from fed_unlearn.unlearning.sragu import SRAGUConfig, agu_sensitivity, spectral_puf_update, sragu_unlearn

TIER = "unit"  # see tests/conftest.py


def twin_model(seed=0):
    """Two identical linear layers in parallel (same init, same input), averaged."""
    torch.manual_seed(seed)

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)
            self.b = nn.Linear(6, 3)
            with torch.no_grad():
                self.b.weight.copy_(self.a.weight)
                self.b.bias.copy_(self.a.bias)

        def forward(self, x):
            return 0.5 * (self.a(x) + self.b(x))

    return Twin()


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)


def moved(model, before):
    return {n: float((p.detach() - before[n]).norm()) for n, p in model.named_parameters()}


def test_damped_layer_moves_less_than_identical_stable_layer():
    model, (x, y) = twin_model(), data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SRAGUConfig(max_steps=20, drift_tol=0.0, target_ratio=0.0, lr=0.01)
    res = sragu_unlearn(model, x, y, {"a": 1.0, "b": 0.1}, cfg, seed=0)
    d = moved(model, before)
    assert res.stop_reason == "cap" and res.steps == 20
    # identical layers, identical gradients: motion scales with nu exactly
    assert d["b.weight"] == pytest.approx(0.1 * d["a.weight"], rel=1e-4)
    assert d["a.weight"] > 0


def test_first_step_is_the_formula():
    model, (x, y) = twin_model(), data(32)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    gmax = max(float(g.abs().max()) for g in grads)
    cfg = SRAGUConfig(max_steps=1, batch_size=32, lr=0.2, drift_tol=0.0, target_ratio=0.0)
    sragu_unlearn(model, x, y, {"a": 0.5, "b": 1.0}, cfg, seed=0)
    for (name, p), g in zip(model.named_parameters(), grads, strict=False):
        nu = 0.5 if name.startswith("a.") else 1.0
        np.testing.assert_allclose((p.detach() - w0[name]).numpy(), (0.2 * nu * g / gmax).numpy(), atol=1e-6)


def test_forget_loss_rises():
    model, (x, y) = twin_model(), data()
    res = sragu_unlearn(model, x, y, {}, SRAGUConfig(max_steps=30, drift_tol=0.0, target_ratio=0.0, lr=0.05), seed=1)
    assert res.forget_loss_end > res.forget_loss_start + 0.1


def test_drift_stop_triggers():
    model, (x, y) = twin_model(), data()
    # decaying rate: eta_t = 0.01 / (1 + 10 t) -> drift falls below the tolerance quickly
    cfg = SRAGUConfig(max_steps=500, lr=0.01, lr_decay=10.0, drift_tol=2e-4, target_ratio=0.0)
    res = sragu_unlearn(model, x, y, {}, cfg, seed=0)
    assert res.stop_reason == "drift" and res.steps < 500 and res.last_drift < 2e-4


def test_divergence_stop_uses_heldout_loss():
    model, (x, y) = twin_model(), data()
    hx, hy = data(32, seed=9)
    res = sragu_unlearn(
        model, x, y, {}, SRAGUConfig(max_steps=500, lr=0.05, drift_tol=0.0, target_ratio=1.0), seed=0, heldout=(hx, hy)
    )
    assert res.stop_reason == "divergence" and res.steps < 500 and res.steps % 5 == 0
    with torch.no_grad():  # stopped where the forget set's loss caught up with the held-out loss
        held = nn.functional.cross_entropy(model(torch.from_numpy(hx)), torch.from_numpy(hy))
    assert res.forget_loss_end >= float(held) and np.isfinite(res.reference_loss)


@pytest.mark.parametrize("nu", [{"a": 1.5}, {"a": float("nan")}, {"b": -0.1}])
def test_bad_stability_weights_are_refused_and_model_unchanged(nu):
    model, (x, y) = twin_model(), data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="stability weights"):
        sragu_unlearn(model, x, y, nu, SRAGUConfig(), seed=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_agu_sensitivity_normalised_over_model():
    s = agu_sensitivity([torch.tensor([1.0, -4.0]), torch.tensor([2.0])])
    np.testing.assert_allclose(torch.cat(s).numpy(), [0.25, 1.0, 0.5])


G = {"l1.weight": np.zeros((2, 2)), "l1.bias": np.zeros(2), "l2.weight": np.zeros((1, 2))}


def up(cid, val, n):
    return ClientUpdate(cid, {k: np.full(v.shape, val) for k, v in G.items()}, n)


def test_sragu_aggregate_adds_departing_motion():
    m = make_method("sragu")
    out = m.aggregate(G, [up(1, 5.0, 10)], [up(2, 1.0, 1), up(3, -0.25, 1)])
    assert all(np.allclose(v, 0.75) for v in out.values())  # remaining did not train: ignored
    m2 = make_method("sragu", {"sragu.remaining-train": True})
    out2 = m2.aggregate(G, [up(1, 2.0, 1), up(4, 4.0, 3)], [up(2, 1.0, 1)])
    assert all(np.allclose(v, 1.0 + 3.5) for v in out2.values())  # 1 + (2*1 + 4*3)/4


def test_spectral_puf_with_unit_nu_is_puf_and_scales_per_layer():
    rem, dep = [up(1, 1.0, 1)], [up(2, 2.0, 1)]
    plain = puf_update(G, rem, dep, eta=2.0)
    same = spectral_puf_update(G, rem, dep, 2.0, nu={"l1": 1.0, "l2": 1.0})
    for k in G:
        np.testing.assert_allclose(same[k], plain[k])
    damped = spectral_puf_update(G, rem, dep, 2.0, nu={"l1": 1.0, "l2": 0.25})
    # l1: 0 + 1/2*1 - 2*1/2*2 = -1.5 ; l2: 1/2*1 - 2*1/2*(0.25*2) = 0
    np.testing.assert_allclose(damped["l1.weight"], -1.5)
    np.testing.assert_allclose(damped["l1.bias"], -1.5)
    np.testing.assert_allclose(damped["l2.weight"], 0.0)


def test_sragu_sends_stability_weights_computed_from_the_global_model():
    rng = np.random.default_rng(0)
    g = {
        "h.weight": rng.standard_t(df=2.5, size=(600, 300)),
        "h.bias": np.zeros(600),
        "o.weight": rng.normal(size=(600, 300)),
    }
    cfg = make_method("sragu").departing_config(g)
    nu = dict(zip(cfg["sragu.layers"], cfg["sragu.nu"], strict=False))
    assert set(nu) == {"h", "o"} and all(0.1 <= v <= 1.0 for v in nu.values())
    assert nu["o"] < nu["h"]  # the random-like (Gaussian) layer is damped more


def test_the_stop_is_not_triggered_by_one_noisy_minibatch():
    """A first minibatch with a mislabelled sample has a loss above the held-out loss; the whole forget set does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 3))
    (x, y), (hx, hy) = data(32), data(64, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(500):  # overfit the forget set: tiny loss on it, a larger one on unseen data
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    first = np.random.default_rng(0).permutation(32)[:4]  # the first minibatch of batch 4, seed 0
    y = y.copy()
    with torch.no_grad():  # one of its samples gets the label the model finds least likely
        y[first[0]] = int(model(torch.from_numpy(x[first[:1]])).argmin(1))
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        batch_loss = float(ce(model(torch.from_numpy(x[first])), torch.from_numpy(y[first])))
        whole = float(ce(model(torch.from_numpy(x)), torch.from_numpy(y)))
        held = float(ce(model(torch.from_numpy(hx)), torch.from_numpy(hy)))
    assert batch_loss > held > whole  # one minibatch says "done", the whole set does not
    cfg = SRAGUConfig(max_steps=12, batch_size=4, lr=1e-7, lr_decay=0.0, drift_tol=0.0, target_ratio=1.0, check_every=5)
    res = sragu_unlearn(model, x, y, {}, cfg, seed=0, heldout=(hx, hy))
    assert res.stop_reason == "cap" and res.steps == 12


def test_a_class_is_unlearned_until_its_accuracy_reaches_the_floor():
    model, (x, y) = twin_model(), data(64)
    keep = y == 1
    res = sragu_unlearn(
        model,
        x[keep],
        y[keep],
        {},
        SRAGUConfig(max_steps=400, lr=0.05, drift_tol=0.0),
        seed=0,
        target="accuracy-floor",
        floor=0.05,
    )
    acc = float(np.mean(model(torch.from_numpy(x[keep])).argmax(1).numpy() == 1))
    assert res.stop_reason == "floor" and acc <= 0.05 and res.steps % 5 == 0


def test_agu_is_sragu_with_unit_weights():
    g = {
        "a.weight": np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32),
        "a.bias": np.zeros(40, np.float32),
    }
    cfg = make_method("agu").departing_config(g)
    assert cfg["unlearn-method"] == "agu" and cfg["sragu.layers"] == ["a"] and cfg["sragu.nu"] == [1.0]
    assert type(make_method("agu")).client_routine is type(make_method("sragu")).client_routine
