"""Spectral diagnostics and the stability gate on known answers (pure math)."""

import importlib.util

import numpy as np
import pytest

from fed_unlearn.spectral import StabilityGate, analyze, eigenvalues, fit_power_law, layer_of, motion_share

TIER = "unit"  # see tests/conftest.py


def pareto(alpha, n, xmin=1.0, seed=0):
    return xmin * (1.0 - np.random.default_rng(seed).random(n)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [1.8, 2.5, 3.5, 5.0])
def test_fit_recovers_a_known_pareto_exponent(alpha):
    fit = fit_power_law(pareto(alpha, 4000, xmin=0.7, seed=int(alpha * 10)))
    # MLE standard error is (alpha-1)/sqrt(n) ~ 0.02-0.07 here; allow 4 sigma plus x_min choice noise
    assert abs(fit.alpha - alpha) < 4 * fit.sigma + 0.05
    assert fit.xmin == pytest.approx(0.7, rel=0.2)
    assert fit.ks_distance < 0.05


def test_fit_finds_the_tail_of_a_mixture():
    rng = np.random.default_rng(1)
    bulk = rng.uniform(0.01, 1.0, 3000)  # not a power law
    tail = pareto(3.0, 1500, xmin=1.0, seed=2)
    fit = fit_power_law(np.concatenate([bulk, tail]))
    assert abs(fit.alpha - 3.0) < 0.3 and fit.xmin >= 0.9


def test_hill_estimator_hand_computed():
    # x = (1, 2, 4): with x_min = 2 the tail is (2, 4): alpha = 1 + 2 / (ln1 + ln2)
    fit = fit_power_law(np.array([1.0, 2.0, 4.0]))
    candidates = {1.0: 1 + 3 / (np.log(2) + np.log(4)), 2.0: 1 + 2 / np.log(2)}
    assert fit.alpha == pytest.approx(candidates[fit.xmin])


def test_eigenvalues_are_squared_singular_values():
    w = np.random.default_rng(3).normal(size=(7, 12))
    np.testing.assert_allclose(eigenvalues(w), np.sort(np.linalg.svd(w, compute_uv=False) ** 2), rtol=1e-9)
    conv = np.random.default_rng(4).normal(size=(8, 5, 3, 3))
    pooled = np.sort(
        np.concatenate([np.linalg.svd(conv[:, :, i, j], compute_uv=False) ** 2 for i in range(3) for j in range(3)])
    )
    np.testing.assert_allclose(eigenvalues(conv), pooled, rtol=1e-9)
    assert len(eigenvalues(np.zeros((20, 20)))) == 0  # all below the 1e-5 floor


def test_heavy_tailed_matrix_gets_smaller_exponent_than_gaussian():
    rng = np.random.default_rng(5)
    spectra = analyze(
        {
            "heavy.weight": rng.standard_t(df=2.5, size=(600, 300)),
            "gauss.weight": rng.normal(size=(600, 300)),
            "gauss.bias": rng.normal(size=300),
            "tiny.weight": rng.normal(size=(4, 4)),
        }
    )
    by = {s.layer: s for s in spectra}
    assert set(by) == {"heavy", "gauss", "tiny"}  # biases are not layers
    assert by["heavy"].alpha < by["gauss"].alpha - 2
    assert np.isnan(by["tiny"].alpha) and by["tiny"].nu == 1.0  # < 10 eigenvalues: no fit


@pytest.mark.skipif(
    importlib.util.find_spec("weightwatcher") is None, reason="weightwatcher not installed (optional cross-check)"
)
def test_matches_weightwatcher_on_a_conv_net():
    import logging

    import weightwatcher as ww

    from fed_unlearn.models import build_model

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    details = ww.WeightWatcher(model=model).analyze()
    # WeightWatcher switches to another fit for small layers ("SMALL N PL FIT"): compare >= 50 eigenvalues
    theirs = sorted(a for a, n in zip(details["alpha"], details["num_evals"], strict=False) if n >= 50)
    ours = sorted(s.alpha for s in analyze(model.state_dict()) if s.num_eigenvalues >= 50)
    assert len(ours) == len(theirs) == 2
    np.testing.assert_allclose(ours, theirs, atol=0.05)


# ------------------------------------------------------------------ gate
def test_gate_is_bounded_monotone_and_smooth():
    gate = StabilityGate(alpha_low=2.0, alpha_high=6.0, tau=0.5, nu_min=0.1)
    a = np.linspace(0.0, 12.0, 2401)
    nu = gate(a)
    assert nu.min() >= 0.1 and nu.max() <= 1.0
    assert gate(4.0) == pytest.approx(1.0)
    assert np.all(np.diff(nu[a <= 4.0]) >= -1e-12) and np.all(np.diff(nu[a >= 4.0]) <= 1e-12)
    assert np.max(np.abs(np.diff(nu))) < 0.01  # no jumps on a 0.005 grid
    assert gate(3.0) > 0.85 and gate(5.0) > 0.85  # well-trained band ~1
    assert gate(0.5) < 0.15 and gate(10.0) < 0.15  # brittle / random-like layers damped
    assert gate(float("nan")) == 1.0


@pytest.mark.parametrize(
    "kw", [{"alpha_low": 6.0, "alpha_high": 2.0}, {"tau": 0.0}, {"nu_min": 1.0}, {"nu_unfit": 0.05}]
)
def test_gate_rejects_impossible_settings(kw):
    with pytest.raises(ValueError):
        StabilityGate(**kw)


def test_motion_share_by_layer():
    share = motion_share({"a.weight": np.array([3.0]), "a.bias": np.array([4.0]), "b.weight": np.array([0.0, 0.0])})
    assert share == {"a": 1.0, "b": 0.0}
    assert layer_of("features.0.weight") == "features.0" and layer_of("w") == "w"


def test_cli_prints_the_layer_table(tmp_path, capsys):
    import torch

    from fed_unlearn.models import build_model
    from fed_unlearn.spectral import main

    assert main(["--model", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "net.1" in out and "(200, 784)" in out and "alpha" in out and "3 layers analysed" in out
    path = tmp_path / "model.pt"
    torch.save(build_model("cnn", (1, 28, 28), 10, seed=1).state_dict(), path)
    assert main([str(path)]) == 0
    assert "classifier.1" in capsys.readouterr().out
