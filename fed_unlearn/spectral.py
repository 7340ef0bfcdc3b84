"""Heavy-tailed spectral diagnostics of weight matrices (WeightWatcher-style), and the stability gate.

Per layer (Martin & Mahoney, "Implicit self-regularization in deep neural networks",
JMLR 2021; the WeightWatcher recipe):

1. **Matrices.** A Linear weight ``(out, in)`` is one matrix. A conv kernel
   ``(out, in, kh, kw)`` is split into its ``kh*kw`` matrices ``W[:, :, i, j]`` (one per
   kernel position) whose eigenvalues are pooled — WeightWatcher's default, chosen here
   over the ``(out, in*kh*kw)`` reshape because each slice is a genuine linear map
   between channels. Layers are the state-dict entries named ``*weight`` with 2 or 4
   dimensions, so a bare state dict (the server's global model) is enough.
2. **Empirical spectral density.** Each matrix is oriented with rows ``N >= cols M``; the
   eigenvalues of ``X = W^T W`` are the squared singular values ``lambda = sigma(W)^2``.
   :func:`analyze` computes them in single precision and redoes a layer in double when its
   tail reaches below ``1e-3 * lambda_max``.
   (The ``1/N`` normalisation of the correlation matrix rescales every eigenvalue by the
   same factor: the exponent ``alpha`` is unchanged, ``x_min`` is reported on the
   ``sigma^2`` scale, as WeightWatcher does.) Eigenvalues ``<= 1e-5`` are dropped; layers
   with fewer than 10 eigenvalues are skipped (``alpha = nan``).
3. **Power-law fit of the tail** (Clauset, Shalizi & Newman, SIAM Review 2009): with the
   eigenvalues sorted ``x_1 <= ... <= x_n``, for every candidate ``x_min = x_i`` (all
   distinct values but the largest) the continuous MLE (Hill estimator)
   ``alpha_i = 1 + m_i / sum_{j >= i} ln(x_j / x_i)``, ``m_i = n - i + 1``, and the
   Kolmogorov-Smirnov distance ``D_i = max_{j >= i} |F_emp(x_j) - F_i(x_j)|`` between
   the tail's empirical CDF ``F_emp(x_j) = (j - i) / m_i`` (the ``powerlaw`` package's
   convention, so WeightWatcher's fits are reproduced) and the fitted
   ``F_i(x) = 1 - (x / x_i)^(1 - alpha_i)``. The fit keeps the ``x_min`` with the smallest
   ``D``; its standard error is ``sigma = (alpha - 1) / sqrt(m)``. Vectorised in numpy;
   distances are bracketed on a coarse grid first and computed in full only for the
   candidates that can still win (the exhaustive scan's result, see :func:`fit_power_law`).

Reading: ``alpha < 2`` over-trained / very heavy-tailed, ``2 <= alpha <= 6`` well-trained,
``alpha > 6`` under-trained (close to random).

**Stability gate.** A smooth bounded map from ``alpha`` to the stability weight

    g(alpha) = s((alpha - a_lo) / tau) * s((a_hi - alpha) / tau),   s = logistic sigmoid
    nu(alpha) = nu_min + (1 - nu_min) * g(alpha) / g((a_lo + a_hi) / 2)

``nu`` is ``C-infinity``, lies in ``[nu_min, 1]``, equals 1 at the centre of the
well-trained band ``[a_lo, a_hi]`` (~1 inside it for ``tau`` small against the band),
increases below the centre and decreases above it, and tends to ``nu_min`` for
brittle/over-fit (``alpha << a_lo``) or random-like (``alpha >> a_hi``) layers. A layer
without a fit (too few eigenvalues) gets ``nu_unfit`` (default 1: no evidence to damp it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import blas

EIGEN_FLOOR = 1e-5
MIN_EIGENVALUES = 10


@dataclass(frozen=True)
class PowerLawFit:
    """A continuous power-law fit ``p(x) ~ x^-alpha`` for ``x >= x_min``.

    Attributes
    ----------
    alpha : float
        Exponent (MLE at the chosen ``x_min``).
    xmin : float
        Start of the tail.
    ks_distance : float
        Kolmogorov-Smirnov distance of the fit (fit quality: smaller is better).
    sigma : float
        Standard error ``(alpha - 1) / sqrt(n_tail)``.
    n_tail : int
        Eigenvalues in the tail.
    """

    alpha: float
    xmin: float
    ks_distance: float
    sigma: float
    n_tail: int


def _tail_cdfs(logx: np.ndarray, i: np.ndarray, a: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical and fitted tail CDFs at points ``j`` (columns) for candidates ``i`` (rows, exponents ``a``).

    Both are 0 at and before a candidate's ``x_min``; the empirical CDF is the ``powerlaw``
    package's (used by WeightWatcher): ``arange(m) / m``.
    """
    n, inside = len(logx), j >= i
    emp = np.where(inside, (j - i) / (n - i).astype(np.float64), 0.0)
    # points before x_min are clipped to 0 so that exp cannot overflow
    fit = np.where(inside, 1.0 - np.exp((1.0 - a) * np.maximum(logx[j] - logx[i], 0.0)), 0.0)
    return emp, fit


def fit_power_law(values: np.ndarray, block: int = 512) -> PowerLawFit:
    """Fit a power law to the tail of ``values`` choosing ``x_min`` by minimum KS distance.

    The result is the exhaustive scan's (every candidate, every tail point), found in
    about ``O(n^1.5)`` instead of ``O(n^2)``: each candidate's KS distance is first
    bracketed on a grid of every ``s``-th point (both CDFs are monotone, so between two
    grid points the gap can exceed neither the grid values nor the CDFs' rise), and only
    candidates whose lower bound does not exceed the best upper bound are evaluated on
    every point.

    Parameters
    ----------
    values : np.ndarray
        Positive samples (eigenvalues); non-positive ones are ignored.
    block : int
        Candidates bracketed at once (memory ``~ block * 2 sqrt(n)`` floats; the exact
        distances are computed 64 candidates at a time, ``~ 64 * n`` floats).

    Raises
    ------
    ValueError
        With fewer than 2 distinct positive values.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    x = x[x > 0]
    n = len(x)
    # candidates: first index of every distinct value except the largest
    starts = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    starts = starts[x[starts] < x[-1]]
    if len(starts) == 0:
        raise ValueError("need at least 2 distinct positive values to fit a power law")
    logx = np.log(x)
    suffix = np.cumsum(logx[::-1])[::-1]  # suffix[i] = sum_{j>=i} ln x_j
    m = n - starts
    alphas = 1.0 + m / (suffix[starts] - m * logx[starts])
    # 1. bracket every candidate's distance on the grid (the last point always on it)
    stride = max(1, math.isqrt(n) // 2)
    grid = np.unique(np.r_[np.arange(0, n, stride), n - 1])
    lower = np.empty(len(starts))
    upper = np.empty(len(starts))
    for lo in range(0, len(starts), block):
        emp, fit = _tail_cdfs(logx, starts[lo : lo + block, None], alphas[lo : lo + block, None], grid[None, :])
        lower[lo : lo + block] = np.abs(emp - fit).max(axis=1)
        # between grid neighbours p < q: emp - fit <= emp(q) - fit(p), fit - emp <= fit(q) - emp(p)
        gap = np.maximum(emp[:, 1:] - fit[:, :-1], fit[:, 1:] - emp[:, :-1])
        upper[lo : lo + block] = np.maximum(gap.max(axis=1, initial=0.0), lower[lo : lo + block])
    # 2. exact distances, most promising candidates first, until no lower bound can beat the best
    exact = np.full(len(starts), np.inf)
    order = np.argsort(lower, kind="stable")
    best = upper.min()
    for lo in range(0, len(order), 64):  # small chunks: the loop stops as soon as the bounds allow
        k = order[lo : lo + 64]
        k = k[lower[k] <= best + 1e-9]  # the margin absorbs rounding in the bounds
        if len(k) == 0:
            break
        i = starts[k, None]
        # only points at or after the chunk's smallest x_min matter
        emp, fit = _tail_cdfs(logx, i, alphas[k, None], np.arange(int(i.min()), n)[None, :])
        exact[k] = np.abs(emp - fit).max(axis=1)
        best = min(best, float(exact[k].min()))
    idx = int(np.argmin(exact))  # first minimum: the same x_min as a scan in candidate order
    alpha, n_tail = float(alphas[idx]), int(m[idx])
    return PowerLawFit(alpha, float(x[starts[idx]]), float(exact[idx]), (alpha - 1.0) / math.sqrt(n_tail), n_tail)


def eigenvalues(weight: np.ndarray, precision: str = "double") -> np.ndarray:
    """Pooled eigenvalues ``sigma^2`` of a layer's matrices, those ``<= 1e-5`` dropped, sorted.

    Parameters
    ----------
    weight : np.ndarray
        A 2-D (Linear) or 4-D (conv) weight.
    precision : {"double", "single"}
        Arithmetic of the Gram matrices and their eigenvalues. Single precision is about
        twice as fast; its eigenvalues carry an absolute error of order
        ``1e-6 * lambda_max``, negligible in a tail that starts above ``1e-3 * lambda_max``
        (:func:`analyze` checks this and redoes a layer in double otherwise).
    """
    # eigvalsh of the Gram matrices, batched over kernel positions: the squared singular
    # values, several times faster than an SVD; the precision lost on eigenvalues far
    # below lambda_max does not reach the tail that is fitted.
    ev = np.sort(torch.linalg.eigvalsh(gram_matrices(weight, precision)).reshape(-1).numpy().astype(np.float64))
    return ev[ev > EIGEN_FLOOR]


def gram_matrices(weight: np.ndarray, precision: str = "double") -> torch.Tensor:
    """The Gram matrices ``W^T W`` (``W`` with rows >= cols) a layer's eigenvalues come from, batched.

    A Linear weight is one matrix; a conv weight ``(out, in, kh, kw)`` is ``kh * kw``
    matrices ``(out, in)``, one per kernel position. Only the **lower triangle** of each is
    filled (a BLAS ``syrk``: half the multiply-adds of a full product), which is all that
    ``torch.linalg.eigvalsh`` reads.
    """
    if precision not in ("double", "single"):
        raise ValueError(f"precision must be 'double' or 'single', got {precision!r}")
    dtype = np.float64 if precision == "double" else np.float32
    w = np.asarray(weight)
    if w.ndim == 4:  # (out, in, kh, kw) -> kh*kw matrices (out, in)
        mats = np.ascontiguousarray(w.transpose(2, 3, 0, 1), dtype=dtype).reshape(-1, w.shape[0], w.shape[1])
    elif w.ndim == 2:
        mats = np.ascontiguousarray(w, dtype=dtype)[None]
    else:
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(w.shape)}")
    rows, cols = mats.shape[1:]
    syrk = blas.dsyrk if precision == "double" else blas.ssyrk
    out = np.empty((len(mats), min(rows, cols), min(rows, cols)), dtype)
    for k, m in enumerate(mats):
        # m.T is m's Fortran view (no copy): syrk(a) = a a^T is m^T m; with trans=1, a^T a = m m^T.
        # The upper triangle of its (Fortran) result is the lower one of out[k] (C order).
        out[k] = syrk(1.0, m.T, trans=0 if rows >= cols else 1).T
    return torch.from_numpy(out)


@dataclass(frozen=True)
class StabilityGate:
    """The smooth bounded map ``alpha -> nu`` of the module docstring.

    Attributes
    ----------
    alpha_low, alpha_high : float
        The well-trained band (default 2 and 6, WeightWatcher's reading).
    tau : float
        Softness of the band edges (> 0).
    nu_min : float
        Floor of the weight, in ``[0, 1)``.
    nu_unfit : float
        Weight of layers without a fit, in ``[nu_min, 1]``.
    """

    alpha_low: float = 2.0
    alpha_high: float = 6.0
    tau: float = 0.5
    nu_min: float = 0.1
    nu_unfit: float = 1.0

    def __post_init__(self) -> None:
        if not self.alpha_low < self.alpha_high:
            raise ValueError(f"gate band needs alpha_low < alpha_high, got {self.alpha_low}, {self.alpha_high}")
        if not self.tau > 0:
            raise ValueError(f"gate tau must be > 0, got {self.tau}")
        if not 0 <= self.nu_min < 1:
            raise ValueError(f"nu_min must be in [0, 1), got {self.nu_min}")
        if not self.nu_min <= self.nu_unfit <= 1:
            raise ValueError(f"nu_unfit must be in [nu_min, 1], got {self.nu_unfit}")

    def _g(self, alpha: np.ndarray) -> np.ndarray:
        # logistic sigmoid as 0.5 (1 + tanh(z / 2)): the same function, no overflow for alpha in the hundreds
        lo = 0.5 * (1.0 + np.tanh((alpha - self.alpha_low) / (2.0 * self.tau)))
        hi = 0.5 * (1.0 + np.tanh((self.alpha_high - alpha) / (2.0 * self.tau)))
        return lo * hi

    def __call__(self, alpha: float | np.ndarray) -> float | np.ndarray:
        """Stability weight(s) ``nu`` for exponent(s) ``alpha`` (``nan`` -> ``nu_unfit``)."""
        a = np.asarray(alpha, dtype=np.float64)
        centre = self._g(np.array((self.alpha_low + self.alpha_high) / 2.0))
        nu = self.nu_min + (1.0 - self.nu_min) * self._g(np.where(np.isnan(a), 0.0, a)) / centre
        nu = np.where(np.isnan(a), self.nu_unfit, np.clip(nu, self.nu_min, 1.0))
        return float(nu) if np.ndim(alpha) == 0 else nu


@dataclass(frozen=True)
class LayerSpectrum:
    """Diagnostics of one layer."""

    layer: str
    shape: tuple[int, ...]
    num_eigenvalues: int
    alpha: float
    xmin: float
    ks_distance: float
    sigma: float
    nu: float


def layer_of(param_name: str) -> str:
    """Layer a parameter belongs to: its name without the last component (``net.0.weight`` -> ``net.0``)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


@contextlib.contextmanager
def one_torch_thread(blas: bool = True) -> Iterator[None]:
    """Run the block with one torch intra-op thread (and, with ``blas``, one in scipy's BLAS), restoring them.

    Limiting scipy's BLAS costs a few milliseconds (a scan of the loaded libraries), so the
    analysis does it only where layers are analysed concurrently.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if blas:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1, user_api="blas"):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(threads)


# a tail starting this far below lambda_max is fitted on double-precision eigenvalues
SINGLE_PRECISION_RANGE = 1e-3


# below this much work (multiply-adds of the eigenproblems) a thread pool costs more than it saves
PARALLEL_MIN_COST = 5e7


def _cost(arr: np.ndarray) -> float:
    """Rough work of a layer's eigenproblems: matrices x rows x cols^2 (cols = the smaller side)."""
    rows, cols = sorted(arr.shape[:2], reverse=True)
    return float(np.prod(arr.shape[2:], dtype=np.float64)) * rows * cols * cols


def _fit_or_nan(ev: np.ndarray) -> PowerLawFit:
    if len(ev) < MIN_EIGENVALUES or len(np.unique(ev)) < 2:
        return PowerLawFit(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    return fit_power_law(ev)


def _layer_spectrum(name: str, arr: np.ndarray, gate: StabilityGate) -> LayerSpectrum:
    ev = eigenvalues(arr, "single")
    fit = _fit_or_nan(ev)
    # single precision is trusted only well above its error (tail start, or the 1e-5 floor's count)
    reach = fit.xmin if fit.n_tail else (ev[0] if len(ev) else np.inf)
    if len(ev) and reach < ev[-1] * SINGLE_PRECISION_RANGE:
        ev = eigenvalues(arr, "double")
        fit = _fit_or_nan(ev)
    nu = float(gate(fit.alpha))
    return LayerSpectrum(layer_of(name), tuple(arr.shape), len(ev), fit.alpha, fit.xmin, fit.ks_distance, fit.sigma, nu)


def analyze(
    weights: Mapping[str, np.ndarray], gate: StabilityGate | None = None, workers: int | None = None
) -> list[LayerSpectrum]:
    """Spectral diagnostics and stability weights of every weight layer of a state dict.

    Eigenvalues are computed in single precision; a layer whose fitted tail reaches
    below ``1e-3 * lambda_max`` (where single precision's error would matter) is redone
    in double. Layers are analysed concurrently, one BLAS thread each, when the model is
    big enough for that to pay.

    Parameters
    ----------
    weights : Mapping[str, array]
        A state dict (numpy arrays or torch tensors).
    gate : StabilityGate, optional
        Maps ``alpha`` to ``nu`` (default :class:`StabilityGate()`).
    workers : int, optional
        Layers analysed at once (default: torch's intra-op thread count). Results do not
        depend on it.
    """
    gate = gate or StabilityGate()
    layers = []
    for name, w in weights.items():
        arr = w.detach().cpu().numpy() if hasattr(w, "detach") else np.asarray(w)
        if name.endswith("weight") and arr.ndim in (2, 4):
            layers.append((name, arr))
    workers = max(1, min(workers or torch.get_num_threads(), len(layers)))
    # one BLAS thread per layer: the same arithmetic (and numbers) for any number of workers,
    # and a batch of small eigenproblems scales better across layers than inside LAPACK
    if workers == 1 or sum(_cost(arr) for _, arr in layers) < PARALLEL_MIN_COST:
        with one_torch_thread(blas=False):
            return [_layer_spectrum(name, arr, gate) for name, arr in layers]
    with one_torch_thread():
        # largest layers first so that no worker is left with a big one at the end
        order = sorted(range(len(layers)), key=lambda k: -_cost(layers[k][1]))
        with ThreadPoolExecutor(workers) as pool:
            done = dict(zip(order, pool.map(lambda k: _layer_spectrum(*layers[k], gate), order), strict=True))
        return [done[k] for k in range(len(layers))]


def layer_weights(spectra: Iterable[LayerSpectrum]) -> dict[str, float]:
    """``{layer: nu}`` of an analysis."""
    return {s.layer: s.nu for s in spectra}


def motion_share(delta: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-layer share of an update's motion, ``||delta_l|| / ||delta||`` (layers = name prefixes)."""
    sq: dict[str, float] = {}
    for name, d in delta.items():
        sq[layer_of(name)] = sq.get(layer_of(name), 0.0) + float(np.sum(np.asarray(d, np.float64) ** 2))
    total = math.sqrt(sum(sq.values()))
    return {k: (math.sqrt(v) / total if total > 0 else 0.0) for k, v in sq.items()}


def format_table(spectra: Iterable[LayerSpectrum]) -> str:
    """Fixed-width per-layer table: layer, shape, #eigenvalues, alpha, x_min, KS distance, nu."""
    rows = [f"{'layer':<28} {'shape':<18} {'#ev':>6} {'alpha':>7} {'x_min':>10} {'KS D':>7} {'nu':>6}"]
    for s in spectra:
        rows.append(
            f"{s.layer:<28} {str(s.shape):<18} {s.num_eigenvalues:>6} {s.alpha:>7.3f} {s.xmin:>10.4g} "
            f"{s.ks_distance:>7.4f} {s.nu:>6.3f}"
        )
    return "\n".join(rows)


def _load_state_dict(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":  # e.g. a gold federation from the cache
        meta = path.with_name("meta.json")
        with np.load(path) as npz:
            if meta.is_file():
                import json

                names = json.loads(meta.read_text())["array_names"]
                return {n: npz[f"a{i}"] for i, n in enumerate(names)}
            return {k: npz[k] for k in npz.files}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    return {k: v.numpy() for k, v in state.items() if hasattr(v, "numpy")}


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m fed_unlearn.spectral CHECKPOINT`` or ``--model mlp|cnn|resnet18``."""
    ap = argparse.ArgumentParser(description="Per-layer heavy-tailed spectral diagnostics of a model")
    ap.add_argument("checkpoint", nargs="?", help="a torch state_dict (.pt) or a gold cache weights.npz")
    ap.add_argument("--model", help="analyse a freshly initialised model instead: mlp, cnn or resnet18")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha-low", type=float, default=2.0)
    ap.add_argument("--alpha-high", type=float, default=6.0)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--nu-min", type=float, default=0.1)
    args = ap.parse_args(argv)
    if bool(args.checkpoint) == bool(args.model):
        ap.error("give a checkpoint or --model")
    if args.checkpoint:
        weights = _load_state_dict(Path(args.checkpoint))
    elif args.model == "resnet18":
        import torchvision

        torch.manual_seed(args.seed)
        weights = {k: v.numpy() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    else:
        from .models import build_model, get_weights

        weights = get_weights(build_model(args.model, (1, 28, 28), 10, seed=args.seed))
    t0 = time.perf_counter()
    spectra = analyze(weights, StabilityGate(args.alpha_low, args.alpha_high, args.tau, args.nu_min))
    print(format_table(spectra))
    print(f"\n{len(spectra)} layers analysed in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
