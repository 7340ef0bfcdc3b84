"""Deletion requests: each selection picks the right samples on constructed data (pure math)."""

import numpy as np
import pytest
import torch
from torch import nn

from fed_unlearn.deletion import (
    DeletionRequest,
    forget_mask,
    margins,
    mask_digest,
    mean_grad,
    per_example_grads,
    request_from_run_config,
    selection_scores,
)

TIER = "unit"  # see tests/conftest.py


def fixed_linear(weight: np.ndarray) -> nn.Module:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight))
    return lin


# 6 samples, 3 classes; the model's logits are x @ W^T = x itself (identity weights)
X = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [1, 0.9, 0], [0, 0, 1], [2, 0, 0]], np.float32)
Y = np.array([0, 1, 2, 1, 0, 0])  # sample 3 barely wrong (margin -0.1), sample 4 clearly wrong
MODEL = fixed_linear(np.eye(3, dtype=np.float32))


def test_client_and_class_scenarios():
    assert forget_mask(DeletionRequest("client"), 0, X, Y, seed=0).all()
    np.testing.assert_array_equal(forget_mask(DeletionRequest("class", forget_class=0), 1, X, Y, seed=0), Y == 0)
    assert (
        DeletionRequest("class", forget_class=2).removed_classes == (2,)
        and DeletionRequest("samples").removed_classes == ()
    )
    assert DeletionRequest("client").clients_leave and not DeletionRequest("samples").clients_leave


def test_random_selection_size_seed_and_client():
    req = DeletionRequest("samples", selection="random", fraction=0.25)
    x, y = np.zeros((40, 1), np.float32), np.zeros(40, np.int64)
    m = forget_mask(req, 3, x, y, seed=0)
    assert m.sum() == 10
    np.testing.assert_array_equal(m, forget_mask(req, 3, x, y, seed=0))  # deterministic
    assert not np.array_equal(m, forget_mask(req, 4, x, y, seed=0))  # differs per client
    assert not np.array_equal(m, forget_mask(req, 3, x, y, seed=1))  # and per seed
    tiny = DeletionRequest("samples", fraction=0.01)
    assert forget_mask(tiny, 0, x, y, seed=0).sum() == 1  # at least one sample


def test_class_selection_takes_only_that_class():
    m = forget_mask(DeletionRequest("samples", selection="class", fraction=0.34, forget_class=0), 0, X, Y, seed=0)
    assert m.sum() == 2 and set(Y[m]) == {0}  # round(0.34 * 6) = 2 of the 3 class-0 samples
    all_of_it = forget_mask(
        DeletionRequest("samples", selection="class", fraction=0.9, forget_class=1), 0, X, Y, seed=0
    )
    np.testing.assert_array_equal(all_of_it, Y == 1)  # fewer than k of the class: all of them


def test_high_loss_and_low_margin_pick_the_known_samples():
    np.testing.assert_allclose(margins(X.astype(np.float64), Y), [3, 3, 3, -0.1, -1, 2], atol=1e-6)
    req = DeletionRequest("samples", selection="low-margin", fraction=2 / 6)
    np.testing.assert_array_equal(np.flatnonzero(forget_mask(req, 0, X, Y, 0, model=MODEL)), [3, 4])
    req = DeletionRequest("samples", selection="high-loss", fraction=1 / 6)
    np.testing.assert_array_equal(
        np.flatnonzero(forget_mask(req, 0, X, Y, 0, model=MODEL)), [4]
    )  # loss of a clearly wrong one
    with pytest.raises(ValueError, match="needs the model"):
        forget_mask(req, 0, X, Y, 0)


def test_per_example_gradients_match_a_loop_of_backward_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    g = per_example_grads(model, X, Y, batch_size=4)
    for i in range(len(X)):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(X[i : i + 1])), torch.from_numpy(Y[i : i + 1])).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy()
        np.testing.assert_allclose(g[i], ref, rtol=1e-5, atol=1e-7)
    scores = selection_scores("high-grad-norm", model, X, Y)
    np.testing.assert_allclose(scores, np.linalg.norm(g, axis=1))
    req = DeletionRequest("samples", selection="high-grad-norm", fraction=0.5)
    np.testing.assert_array_equal(
        forget_mask(req, 0, X, Y, 0, model=model), np.isin(np.arange(6), np.argsort(-scores)[:3])
    )


def test_influence_is_gradient_alignment_with_the_heldout_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 3))
    hx, hy = X[:3], Y[:3]
    g = per_example_grads(model, X, Y)
    h = mean_grad(model, hx, hy)
    model.zero_grad()
    nn.functional.cross_entropy(model(torch.from_numpy(hx)), torch.from_numpy(hy)).backward()
    np.testing.assert_allclose(
        h, torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy(), rtol=1e-6
    )
    scores = selection_scores("influence", model, X, Y, heldout=(hx, hy))
    np.testing.assert_allclose(scores, g @ h)
    req = DeletionRequest("samples", selection="influence", fraction=1 / 6)
    assert np.flatnonzero(forget_mask(req, 0, X, Y, 0, model=model, heldout=(hx, hy))).tolist() == [
        int(np.argmax(g @ h))
    ]
    with pytest.raises(ValueError, match="held-out"):
        selection_scores("influence", model, X, Y)


def test_bad_requests_are_refused_and_digests_identify_masks():
    with pytest.raises(ValueError, match="unlearn.scenario"):
        DeletionRequest("everything")
    with pytest.raises(ValueError, match="unlearn.selection"):
        DeletionRequest("samples", selection="oldest")
    with pytest.raises(ValueError, match="unlearn.fraction"):
        DeletionRequest("samples", fraction=1.0)
    with pytest.raises(ValueError, match="'unlearn.fraction' must be a number"):
        request_from_run_config({"unlearn.scenario": "samples", "unlearn.fraction": "half"})
    assert request_from_run_config({"unlearn.scenario": "class", "unlearn.class": 3}).removed_classes == (3,)
    m = np.array([True, False, True])
    assert mask_digest(m) == mask_digest(m.copy()) and mask_digest(m) != mask_digest(~m)
    assert mask_digest(np.array([True])) != mask_digest(np.array([True, False]))  # length counts
