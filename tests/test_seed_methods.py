"""AMUN, FastClip, TRW, MPRU and augmentation on hand-checkable cases (pure math, no Flower)."""

import numpy as np
import pytest
import torch
from scipy.special import softmax
from torch import nn

from fed_unlearn.aggregation import ClientUpdate
from fed_unlearn.deletion import DeletionRequest
from fed_unlearn.unlearning import make_method

TIER = "unit"  # see tests/conftest.py


def trained_mlp(seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(64, 6)).astype(np.float32)
    y = (x[:, 0] > x[:, 1]).astype(np.int64) + 2 * (x[:, 2] > 0.5)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return model, x, y


# -- AMUN ----------------------------------------------------------------------------------
def test_pgd_stays_in_the_eps_ball_and_the_domain_and_flips_predictions():
    from fed_unlearn.unlearning.amun import AMUNConfig, adversarial_examples, pgd_l2

    model, x, y = trained_mlp()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    eps = torch.full((len(x),), 0.05, dtype=torch.float64)
    adv = pgd_l2(model, xt, yt, eps, steps=50)
    dist = (adv - xt).reshape(len(x), -1).norm(dim=1)
    assert float(dist.max()) <= 0.05 + 1e-5 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(adv), yt) > nn.functional.cross_entropy(model(xt), yt)
    x_adv, y_adv, used = adversarial_examples(model, x, y, AMUNConfig(epsilon=0.04))
    norms = np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)
    assert np.all(norms <= used + 1e-5)  # each within its own (doubled) radius
    assert np.mean(y_adv != y) == 1.0  # every prediction flipped
    with torch.no_grad():
        np.testing.assert_array_equal(model(torch.from_numpy(x_adv)).argmax(1).numpy(), y_adv)  # label = prediction
    assert set(np.round(used / 0.04).astype(int)) <= {1, 2, 4, 8, 16, 32, 64, 128, 256}  # eps only doubled


def test_amun_lowers_confidence_on_the_forget_set():
    from fed_unlearn.unlearning.amun import AMUNConfig, amun_unlearn

    model, x, y = trained_mlp()
    f = (x[:16], y[:16])
    with torch.no_grad():
        before = softmax(model(torch.from_numpy(f[0])).numpy(), axis=1)[np.arange(16), f[1]].mean()
    out = amun_unlearn(model, f, AMUNConfig(epochs=5, lr=0.05), seed=0)
    with torch.no_grad():
        after = softmax(model(torch.from_numpy(f[0])).numpy(), axis=1)[np.arange(16), f[1]].mean()
    assert out["adversarial-n"] == 16 and out["train-steps"] == 5 and after < before


def test_amun_aggregation_adds_the_motion_with_its_scale():
    g = {"w": np.zeros(2, np.float32)}
    rem = [ClientUpdate(1, {"w": np.array([1.0, 1.0], np.float32)}, 1)]
    dep = [ClientUpdate(0, {"w": np.array([0.0, 2.0], np.float32)}, 1)]
    np.testing.assert_allclose(make_method("amun").aggregate(g, rem, dep)["w"], [1.0, 3.0])
    np.testing.assert_allclose(make_method("amun", {"amun.scale": 0.5}).aggregate(g, rem, dep)["w"], [1.0, 2.0])


# -- FastClip ------------------------------------------------------------------------------
def test_svd_clip_bounds_the_spectral_norm_and_leaves_small_singular_values():
    from fed_unlearn.fastclip import clip_singular_values

    torch.manual_seed(0)
    w = torch.randn(7, 5)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    c = float(np.median(s))
    s2 = np.linalg.svd(clip_singular_values(w, c).numpy(), compute_uv=False)
    assert s2.max() == pytest.approx(c, rel=1e-5)
    np.testing.assert_allclose(s2[s < c], s[s < c], rtol=1e-5)  # untouched below the bound
    np.testing.assert_allclose(s2[s >= c], c, rtol=1e-5)


def test_conv_power_iteration_finds_the_operator_norm_of_the_actual_map():
    from fed_unlearn.fastclip import clip_model, conv_operator_norm, explicit_conv_matrix, spectral_norms

    torch.manual_seed(1)
    for conv, shape in (
        (nn.Conv2d(2, 3, 3, padding=1), (2, 6, 6)),
        (nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 7, 7)),
    ):
        exact = np.linalg.svd(explicit_conv_matrix(conv, shape), compute_uv=False)[0]
        assert conv_operator_norm(conv, shape) == pytest.approx(exact, rel=1e-6)
        # the kernel's own matrix is a different thing: the map's norm must be computed on the map
        kernel = np.linalg.svd(conv.weight.detach().reshape(conv.out_channels, -1).numpy(), compute_uv=False)[0]
        assert abs(kernel - exact) > 1e-3
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    clip_model(model, 0.5, (1, 5, 5))
    assert all(v <= 0.5 * (1 + 1e-5) for v in spectral_norms(model, (1, 5, 5)).values())


def test_training_with_fastclip_keeps_every_layer_bounded():
    from fed_unlearn.fastclip import spectral_norms
    from fed_unlearn.training import TrainSettings, train_local

    model, x, y = trained_mlp()
    train_local(model, x, y, TrainSettings(epochs=2, batch_size=16, lr=0.5), seed=0, clip_bound=1.0, clip_every=3)
    assert max(spectral_norms(model, (6,)).values()) <= 1.0 + 1e-5


# -- TRW -----------------------------------------------------------------------------------
def test_trw_target_sums_to_one_puts_no_mass_on_the_removed_class_and_tilts_toward_similar_classes():
    from fed_unlearn.unlearning.trw import similarity, tilted_target

    s = similarity([[6.0, 3.0, 1.0], [4.0, 1.0, 1.0]], [10, 6], removed=0)
    np.testing.assert_allclose(s, [0.0, 4 / 6, 2 / 6])  # mean probs (4/16, 2/16) renormalised
    logits = np.log(np.array([[0.6, 0.2, 0.2], [0.1, 0.3, 0.6]]))
    q = tilted_target(logits, s, 0, tau=1.0)
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    assert np.all(q[:, 0] == 0.0)
    np.testing.assert_allclose(q[0], [0.0, 2 / 3, 1 / 3])  # 0.2*(2/3) : 0.2*(1/3)
    np.testing.assert_allclose(
        tilted_target(logits, s, 0, tau=0.0)[1], [0.0, 1 / 3, 2 / 3]
    )  # tau 0: plain renormalisation
    with pytest.raises(ValueError):
        similarity([[1.0, 0.0, 0.0]], [1], removed=0)


def test_trw_runs_two_rounds_estimate_then_fedavg():
    m = make_method("trw")
    m.begin([1, 2], leave=False, request=DeletionRequest(scenario="class", forget_class=0))
    g = {"w": np.ones(2, np.float32)}
    assert m.num_rounds == 2 and m.departing_config(g)["trw-phase"] == "estimate"
    est = [
        ClientUpdate(1, g, 10, {"trw-prob-sum": [5.0, 3.0, 2.0]}),
        ClientUpdate(2, g, 10, {"trw-prob-sum": [5.0, 1.0, 4.0]}),
    ]
    out = m.aggregate(g, [], est)
    np.testing.assert_array_equal(out["w"], g["w"])  # no training in the first round
    np.testing.assert_allclose(m.similarity, [0.0, 0.4, 0.6])
    cfg = m.departing_config(g)
    assert cfg["trw-phase"] == "tilt" and cfg["trw-similarity"] == pytest.approx([0.0, 0.4, 0.6])
    out = m.aggregate(
        g,
        [],
        [ClientUpdate(1, {"w": np.zeros(2, np.float32)}, 1), ClientUpdate(2, {"w": np.full(2, 4.0, np.float32)}, 3)],
    )
    np.testing.assert_allclose(out["w"], 3.0)
    with pytest.raises(ValueError, match="class deletion request"):
        make_method("trw").begin([0], leave=True, request=DeletionRequest())
    assert make_method("trw").scenarios == ("class",)


# -- MPRU ----------------------------------------------------------------------------------
def test_mpru_zeroes_the_removed_class_and_keeps_the_order_of_the_others():
    from fed_unlearn.unlearning.mpru import redistribute

    p = softmax(np.random.default_rng(0).normal(size=(50, 5)), axis=1)
    q = redistribute(p, [2])
    assert np.all(q[:, 2] == 0) and np.allclose(q.sum(axis=1), 1)
    keep = [0, 1, 3, 4]
    np.testing.assert_array_equal(np.argsort(p[:, keep], axis=1), np.argsort(q[:, keep], axis=1))
    np.testing.assert_allclose(
        q[:, keep] / q[:, keep].sum(1, keepdims=True), p[:, keep] / p[:, keep].sum(1, keepdims=True)
    )


def test_mpru_as_an_output_layer_edit_is_exactly_the_filter():
    from fed_unlearn.models import get_weights, set_weights
    from fed_unlearn.unlearning.mpru import redistribute

    model, x, _ = trained_mlp()
    with torch.no_grad():
        p = softmax(model(torch.from_numpy(x)).double().numpy(), axis=1)
    m = make_method("mpru")
    m.begin([0], leave=False, request=DeletionRequest(scenario="class", forget_class=1))
    set_weights(model, m.prepare_global(get_weights(model)))
    with torch.no_grad():
        q = softmax(model(torch.from_numpy(x)).double().numpy(), axis=1)
    np.testing.assert_allclose(q, redistribute(p, [1]), atol=1e-6)
    assert not m.remaining_clients_train and not m.departing_clients_train
    bad = make_method("mpru")
    bad.begin([0], leave=False, request=DeletionRequest(scenario="class", forget_class=9))
    with pytest.raises(ValueError, match="do not exist"):
        bad.prepare_global(get_weights(model))


# -- augmentation --------------------------------------------------------------------------
def test_shift_augmentation_translates_and_everything_is_seeded():
    from fed_unlearn.augment import augment_batch

    x = torch.zeros(8, 1, 10, 10)
    x[:, :, 4:6, 4:6] = 1.0
    y = augment_batch(x, "shift", seed=0)
    assert torch.allclose(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # the blob moves, stays whole
    assert not torch.equal(y, x) and torch.equal(y, augment_batch(x, "shift", seed=0))
    # the largest shift scales with the image: 1 px on 8x8 (2 px would be a quarter of it), 2 px on 28x28
    for size, most in ((8, 1), (28, 2)):
        dot = torch.zeros(64, 1, size, size)
        dot[:, :, size // 2, size // 2] = 1.0
        moved = augment_batch(dot, "shift", seed=1)
        rows, cols = (moved[:, 0].amax(dim=d).argmax(dim=1) - size // 2 for d in (2, 1))
        assert int(rows.abs().max()) == most and int(cols.abs().max()) == most
    t = augment_batch(torch.rand(4, 1, 12, 12), "trivial", seed=5)
    assert t.shape == (4, 1, 12, 12) and float(t.min()) >= 0 and float(t.max()) <= 1
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_batch(x, "mixup", 0)
    with pytest.raises(ValueError, match="image batches"):
        augment_batch(torch.zeros(3, 4), "shift", 0)
