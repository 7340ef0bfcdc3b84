"""Benchmark: seconds per full-model spectral analysis, against WeightWatcher if installed.

    python -m simulations.bench_spectral [--repeats 3]

For each model (the project's MLP and CNN, torchvision's ResNet-18, random init) it
prints the median time of :func:`fed_unlearn.spectral.analyze` and, when the optional
``weightwatcher`` package is importable, WeightWatcher's time on the same model, the
time ratio, and the largest |alpha difference| over the layers both fit with the
same estimator (>= 50 eigenvalues; WeightWatcher fits smaller layers differently).
For the largest model it then times the analysis on one thread against its exact floor on
one thread: LAPACK's float32 eigenvalues of the same Gram matrices (formed beforehand) plus
the power-law fits (repeats interleaved), and prints on one line WeightWatcher's time, ours,
the floor and both ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch


def _weightwatcher(ww: Any, model: Any) -> Any:
    return ww.WeightWatcher(model=model).analyze()


def _fits(fit: Callable[[np.ndarray], Any], evs: list[np.ndarray]) -> list[Any]:
    return [fit(np.sort(ev.ravel().astype(np.float64))) for ev in evs]


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times: list[float] = []
    out: Any = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torchvision

    from fed_unlearn.models import build_model
    from fed_unlearn.spectral import analyze, fit_power_law, gram_matrices, one_torch_thread

    try:
        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    except ImportError:
        ww = None
    torch.manual_seed(0)
    models = {
        "mlp (784-200-100-10)": build_model("mlp", (1, 28, 28), 10, seed=0),
        "cnn (2 conv + 2 fc)": build_model("cnn", (1, 28, 28), 10, seed=0),
        "resnet18 (torchvision)": torchvision.models.resnet18(weights=None),
    }
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    header = f"{'model':<24} {'layers':>6} {'fed-unlearn s':>14}"
    if ww is not None:
        header += f" {'weightwatcher s':>16} {'speed-up':>9} {'max |d alpha|':>14}"
    print(header)
    for name, model in models.items():
        state = model.state_dict()
        t_ours, ours = _median_time(partial(analyze, state), args.repeats)
        line = f"{name:<24} {len(ours):>6} {t_ours:>14.3f}"
        if ww is not None:
            t_ww, details = _median_time(partial(_weightwatcher, ww, model), args.repeats)
            theirs = sorted(a for a, n in zip(details["alpha"], details["num_evals"], strict=False) if n >= 50)
            mine = sorted(s.alpha for s in ours if s.num_eigenvalues >= 50)
            same_layers = len(mine) == len(theirs) and mine
            diff = max(abs(a - b) for a, b in zip(mine, theirs, strict=True)) if same_layers else float("nan")
            line += f" {t_ww:>16.3f} {t_ww / t_ours:>8.1f}x {diff:>14.2e}"
        print(line)
    # against the exact floor, on one thread: LAPACK's float32 eigenvalues (torch's, as the analysis uses) of the Gram
    # matrices the analysis decomposes (formed beforehand, not timed) plus the power-law fits
    name, model = list(models.items())[-1]
    state = model.state_dict()
    mats = [w.numpy() for k, w in state.items() if k.endswith("weight") and w.ndim in (2, 4)]
    grams = [gram_matrices(w, "single") for w in mats]
    times: dict[str, list[float]] = {"ours": [], "eig": [], "fit": []}
    with one_torch_thread():
        analyze(state, None, 1)  # warm
        for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits all three alike
            t_one, _ = _median_time(partial(analyze, state, None, 1), 1)
            t_e, evs = _median_time(lambda: [torch.linalg.eigvalsh(g).numpy() for g in grams], 1)
            t_f, _ = _median_time(partial(_fits, fit_power_law, evs), 1)
            for key, value in (("ours", t_one), ("eig", t_e), ("fit", t_f)):
                times[key].append(value)
    t_ours1, t_eig, t_fit = (statistics.median(times[k]) for k in ("ours", "eig", "fit"))
    floor = t_eig + t_fit
    line = f"{name}: "
    if ww is not None:
        line += f"weightwatcher {t_ww:.3f} s, fed-unlearn {t_ours:.3f} s ({t_ww / t_ours:.1f}x faster); "
    line += (
        f"one thread: fed-unlearn {t_ours1:.3f} s, exact floor {floor:.3f} s (LAPACK eigenvalues {t_eig:.3f} s"
        f" + power-law fits {t_fit:.3f} s), {t_ours1 / floor:.2f}x the floor (target <= 1.2x)"
    )
    print(line)
    if ww is None:
        print("(weightwatcher not installed: pip install weightwatcher for the cross-check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
