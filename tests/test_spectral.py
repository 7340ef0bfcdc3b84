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


def exhaustive_fit(values):
    """The textbook scan: every candidate x_min, the KS distance over its whole tail."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    x = x[x > 0]
    n, logx, best = len(x), np.log(x), None
    for i in range(n):
        if (i > 0 and x[i] == x[i - 1]) or x[i] == x[-1]:
            continue
        m = n - i
        alpha = 1.0 + m / (logx[i:].sum() - m * logx[i])
        fit_cdf = 1.0 - np.exp((1.0 - alpha) * (logx[i:] - logx[i]))
        d = float(np.abs(fit_cdf - np.arange(m) / m).max())
        if best is None or d < best[0] - 1e-12:
            best = (d, alpha, x[i])
    return best


@pytest.mark.parametrize("case", range(8))
def test_fast_scan_finds_the_exhaustive_scans_fit(case):
    rng = np.random.default_rng(100 + case)
    n = int(rng.integers(30, 3000))
    kind = case % 4
    if kind == 0:  # Marchenko-Pastur bulk (a random layer)
        w = rng.normal(size=(n, max(10, n // 3)))
        values = np.linalg.eigvalsh(w.T @ w / n)
    elif kind == 1:
        values = pareto(rng.uniform(1.5, 6.0), n, seed=case)
    elif kind == 2:  # bulk + heavy tail
        values = np.r_[rng.uniform(0.01, 1.0, n), pareto(2.5, n // 4, seed=case)]
    else:  # ties (rounded values) and a few identical maxima
        values = np.r_[np.round(pareto(3.0, n, seed=case), 2), [50.0] * 3]
    fit, (d, alpha, xmin) = fit_power_law(values), exhaustive_fit(values)
    assert fit.xmin == xmin
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.ks_distance == pytest.approx(d, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("precision", ["double", "single"])
def test_eigenvalues_are_squared_singular_values(precision):
    tol = {"double": dict(rtol=1e-9), "single": dict(rtol=1e-4, atol=1e-5)}[precision]
    w = np.random.default_rng(3).normal(size=(7, 12))
    np.testing.assert_allclose(eigenvalues(w, precision), np.sort(np.linalg.svd(w, compute_uv=False) ** 2), **tol)
    conv = np.random.default_rng(4).normal(size=(8, 5, 3, 3))
    pooled = np.sort(
        np.concatenate([np.linalg.svd(conv[:, :, i, j], compute_uv=False) ** 2 for i in range(3) for j in range(3)])
    )
    np.testing.assert_allclose(eigenvalues(conv, precision), pooled, **tol)
    assert len(eigenvalues(np.zeros((20, 20)), precision)) == 0  # all below the 1e-5 floor
    with pytest.raises(ValueError, match="precision"):
        eigenvalues(w, "half")


def test_analysis_does_not_depend_on_workers_and_matches_double_precision(monkeypatch):
    import fed_unlearn.spectral as spectral

    monkeypatch.setattr(spectral, "PARALLEL_MIN_COST", 0.0)  # the thread pool even for this small model
    rng = np.random.default_rng(6)
    weights = {f"l{k}.weight": rng.standard_t(df=3 + k, size=(300, 200 + 10 * k)) for k in range(4)}
    weights["conv.weight"] = rng.normal(size=(64, 48, 3, 3))
    one, two = analyze(weights, workers=1), analyze(weights, workers=2)
    assert one == two
    for s in one:
        exact = fit_power_law(eigenvalues(weights[f"{s.layer}.weight"], "double"))
        assert abs(s.alpha - exact.alpha) < 0.05


def test_a_tail_reaching_far_below_the_top_is_fitted_in_double_precision():
    # a pure power law over eight decades: the fitted tail starts ~1e-8 of lambda_max, where
    # single-precision eigenvalues are noise; the analysis must redo the layer in double
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(400, 400)))
    sigma = np.sqrt(np.logspace(-4, 4, 400))
    w = q * sigma  # singular values sigma exactly
    (s,) = analyze({"w.weight": w})
    exact = fit_power_law(eigenvalues(w, "double"))
    assert s.xmin < 1e-3 * 1e4
    assert s.alpha == pytest.approx(exact.alpha, abs=1e-9) and s.num_eigenvalues == len(eigenvalues(w, "double"))


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
    with np.errstate(all="raise"):  # a layer fitted with alpha in the hundreds (FastClip) is no error
        assert gate(400.0) == pytest.approx(0.1)


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


def test_gram_matrices_hold_wtw_of_the_smaller_side_in_their_lower_triangle():
    """syrk products: the lower triangle is W^T W (rows >= cols) or W W^T, per kernel position of a conv."""
    import torch

    from fed_unlearn.spectral import gram_matrices

    rng = np.random.default_rng(3)
    tall, wide = rng.standard_normal((7, 4)), rng.standard_normal((3, 5))
    conv = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    for w, want in ((tall, [tall.T @ tall]), (wide, [wide @ wide.T])):
        got = gram_matrices(w, "double").numpy()
        assert got.dtype == np.float64 and got.shape == (1, *want[0].shape)
        np.testing.assert_allclose(np.tril(got[0]), np.tril(want[0]), rtol=1e-12)
    got = gram_matrices(conv, "single").numpy()
    assert got.dtype == np.float32 and got.shape == (9, 2, 2)
    m = conv[:, :, 1, 2].astype(np.float64)
    np.testing.assert_allclose(np.tril(got[5]), np.tril(m.T @ m), rtol=1e-5)
    ev = np.sort(np.linalg.eigvalsh(m.T @ m))
    np.testing.assert_allclose(np.sort(torch.linalg.eigvalsh(gram_matrices(conv, "double")[5]).numpy()), ev)
