"""What an experiment leaves behind: ``results.json``, ``accuracy.png`` and a Markdown table."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Rows of the comparison table: (metric key, label). Order = the README table's order.
TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("test-acc", "test accuracy (held-out data of the clients that stay)"),
    ("retain-acc", "retain accuracy (retained training data)"),
    ("forget-acc", "forget accuracy (the deleted training data)"),
    ("forget-heldout-acc", "held-out accuracy of the forgetting clients, forgotten classes"),
    ("mia-auc", "loss-threshold MIA AUC (forget set vs held-out)"),
    ("mia-entropy-auc", "modified-entropy MIA AUC (forget set vs held-out)"),
    ("mia-nn-auc", "MIA-NN AUC, neighbouring-class probabilities (class deletion)"),
    ("kl-forget", "KL(gold ‖ model) on the forget set"),
    ("tv-forget", "total-variation distance to gold on the forget set"),
    ("disagree-forget", "prediction disagreement with gold, forget set"),
    ("kl-test", "KL(gold ‖ model) on held-out test data"),
    ("disagree-test", "prediction disagreement with gold, held-out test data"),
    ("rmia-auc", "RMIA AUC, reference-calibrated (forget set vs held-out)"),
    ("rmia-tpr@1%", "RMIA TPR at 1% FPR"),
    ("lira-auc", "offline LiRA AUC"),
    ("lira-tpr@1%", "offline LiRA TPR at 1% FPR"),
    ("rmia-vs-gold-auc", "RMIA telling the model from the gold on the forget set (0.5 = cannot)"),
    ("relearn-steps", "relearn time: SGD steps to regain the original's forget accuracy"),
    ("relearn-vs-gold", "relearn time relative to the gold's"),
    ("average-gap", "Average Gap to gold (retain, forget, test acc, MIA)"),
    ("l2-to-gold", "L2 distance to gold in weight space"),
    ("l2-to-original", "L2 distance to the original in weight space"),
)


#: Metrics judged by their distance to the gold's value (the gold's is the target).
GAP_METRICS = (
    "test-acc",
    "retain-acc",
    "forget-acc",
    "forget-heldout-acc",
    "mia-auc",
    "mia-entropy-auc",
    "mia-nn-auc",
    "rmia-auc",
    "rmia-tpr@1%",
    "lira-auc",
    "lira-tpr@1%",
)
#: The columns that are references, not methods: the gold and its twin (a retraining with other seeds).
REFERENCES = ("gold", "gold-twin")
#: The distances to the gold whose spread the twin measures (function space; in weight space two
#: retrainings from different initial models are far apart whatever they compute).
TWIN_METRICS = ("kl-forget", "tv-forget", "disagree-forget", "kl-test", "disagree-test")
#: Metrics that already are distances to the gold (0 = the gold).
DISTANCE_METRICS = (
    "kl-forget",
    "tv-forget",
    "disagree-forget",
    "kl-test",
    "disagree-test",
    "average-gap",
    "l2-to-gold",
)
VERDICT_METRICS = GAP_METRICS + DISTANCE_METRICS


def distance_to_gold(model: Mapping[str, float], gold: Mapping[str, float], key: str) -> float:
    """How far a model's figure is from the gold's: ``|m - g|``, or the figure itself for distance metrics."""
    v = model.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float("nan")
    if key in DISTANCE_METRICS:
        return float(v)
    g = gold.get(key)
    return float("nan") if g is None or (isinstance(g, float) and math.isnan(g)) else abs(float(v) - float(g))


def further_than_original(
    report: Mapping[str, Mapping[str, float]], model: str = "unlearned", tolerance: float = 1e-9
) -> list[str]:
    """The metrics on which ``model`` ends further from the gold than the original was (one seed)."""
    gold, orig, m = report["gold"], report["original"], report[model]
    out = []
    for key in VERDICT_METRICS:
        dm, do = distance_to_gold(m, gold, key), distance_to_gold(orig, gold, key)
        if math.isfinite(dm) and math.isfinite(do) and dm > do + tolerance:
            out.append(key)
    return out


def verdict_line(further: Sequence[str]) -> str:
    """The words a report says about a method that ends further from the gold (empty when it does not)."""
    return ("further from gold than the original on: " + ", ".join(further)) if further else ""


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))  # counts (steps, rounds)
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(
    models: Mapping[str, Mapping[str, float]], columns: Sequence[str] = ("original", "unlearned", "gold")
) -> str:
    """Markdown table, one row per metric of :data:`TABLE_ROWS`, one column per model.

    With ``original`` and ``gold`` among the models, a last row names, per model, the metrics
    on which it ends further from the gold than the original ("–": none).
    """
    cols = [c for c in columns if c in models]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, label in TABLE_ROWS:
        if any(key in models[c] for c in cols):
            lines.append(f"| {label} | " + " | ".join(_fmt(models[c].get(key)) for c in cols) + " |")
    if "original" in models and "gold" in models:
        cells = [
            ", ".join(further_than_original(models, c)) or "–" if c not in ("original", *REFERENCES) else ""
            for c in cols
        ]
        lines.append("| **further from gold than the original on** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def current_results(folder: str | Path) -> Path | None:
    """The ``results.json`` under ``folder`` produced by the code as it is now (``None``: absent or stale).

    A result written by other code (another fingerprint, :func:`fed_unlearn.gold_cache.code_fingerprint`)
    is stale: finished runs are reused only while the code that produced them is unchanged.
    """
    from .gold_cache import code_fingerprint

    for f in sorted(Path(folder).glob("*/results.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            if json.loads(f.read_text()).get("code") == code_fingerprint():
                return f
        except (OSError, ValueError):
            continue
    return None


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2))
    return path


def _figure(nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Any, Any]:
    """A matplotlib figure and its axes (``Figure.subplots``), without pyplot's global figure manager.

    The figure is rendered by the Agg canvas when saved, whatever backend is configured: no
    backend to select, no figure left open in pyplot's global state (nor its imports) for a
    report written in a client or a ServerApp process.
    """
    from matplotlib.figure import Figure

    subplot_kw = {k: kw.pop(k) for k in ("sharex", "sharey") if k in kw}
    fig = Figure(**kw)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def _save(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG (creating the folder)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy(
    path: str | Path,
    history: Mapping[int, Mapping[str, float]],
    gold_history: Mapping[int, Mapping[str, float]] | None,
    departure_round: int | None,
    title: str = "",
) -> Path:
    """Per-round accuracy on retained (test) and forget data; gold dashed (its rounds, then its final level).

    Parameters
    ----------
    history, gold_history : mapping round -> summary metrics
        As produced by :func:`fed_unlearn.evaluation.summarise` each round.
    departure_round : int, optional
        Drawn as a vertical line (the unlearning round).
    """

    fig, ax = _figure(figsize=(7, 4.2))
    series = (
        ("test-acc", "retained clients (held-out)", "tab:blue"),
        ("forget-acc", "forget set (deleted data)", "tab:red"),
    )
    for key, label, color in series:
        rounds = sorted(r for r in history if key in history[r])
        ax.plot(rounds, [history[r][key] for r in rounds], marker="o", ms=3, color=color, label=label)
        if gold_history:
            g = sorted(r for r in gold_history if key in gold_history[r])
            ax.plot(g, [gold_history[r][key] for r in g], ls="--", color=color, alpha=0.5)
            if g:  # the gold's final model is the target of the whole run
                ax.axhline(gold_history[g[-1]][key], ls="--", color=color, alpha=0.8, lw=1, label=f"gold: {label}")
    if departure_round is not None:
        ax.axvline(departure_round, color="k", ls=":", lw=1)
        ax.annotate(
            "unlearning round",
            (departure_round, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xlabel("server round")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_roc(path: str | Path, curves: Mapping[str, Mapping[str, Sequence[float]]], title: str = "") -> Path:
    """ROC curves ``model -> {fpr, tpr}`` on log-log axes (the low-FPR corner is what matters)."""

    fig, ax = _figure(figsize=(5.2, 4.6))
    colors = {"original": "tab:red", "unlearned": "tab:blue", "gold": "tab:green"}
    others = iter([_color(i) for i in range(20)] * 3)
    for name, c in curves.items():
        fpr, tpr = np.asarray(c["fpr"], dtype=float), np.maximum(np.asarray(c["tpr"], dtype=float), 1e-3)
        ax.plot(fpr, tpr, label=name, color=colors.get(name) or next(others), lw=2 if name in colors else 1.2)
    ax.plot([1e-3, 1], [1e-3, 1], ls=":", color="grey", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table for several methods' ``results.json`` of the same experiment.

    Columns: the original model (from the first method; identical for all, same seeds),
    each method's unlearned model, the gold model. Extra rows: recovery rounds and the
    client-compute of unlearning + recovery as a fraction of the gold's.
    """
    names = list(results)
    first = results[names[0]]["report"]
    models = {
        "original": first["original"],
        **{m: results[m]["report"]["unlearned"] for m in names},
        "gold": first["gold"],
    }
    table = markdown_table(models, columns=["original", *names, "gold"])
    extra = [
        "| recovery rounds to gold accuracy | – | "
        + " | ".join(_fmt(results[m]["recovery"]["rounds-to-gold"]) for m in names)
        + " | – |",
        "| client-compute, fraction of gold retraining | – | "
        + " | ".join(_fmt(results[m]["client-compute"]["fraction-of-gold-steps"]) for m in names)
        + " | 1.0000 |",
    ]
    return table + "\n" + "\n".join(extra)


def layer_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Per layer: exponent alpha, stability weight nu and each method's share of the unlearning motion."""
    names = [m for m in results if results[m].get("unlearning")]
    if not names:
        return ""
    base = {row["layer"]: row for row in results[names[0]]["unlearning"]["layers"]}
    lines = [
        "| layer | shape | alpha | nu | " + " | ".join(f"motion share ({m})" for m in names) + " |",
        "|---|---|---:|---:|" + "---:|" * len(names),
    ]
    for layer, info in base.items():
        shares = []
        for m in names:
            row: Mapping[str, Any] = next((r for r in results[m]["unlearning"]["layers"] if r["layer"] == layer), {})
            shares.append(_fmt(row.get("motion-share")))
        lines.append(
            f"| {layer} | {tuple(info.get('shape', ()))} | {_fmt(info.get('alpha'))} | {_fmt(info.get('nu'))} | "
            + " | ".join(shares)
            + " |"
        )
    return "\n".join(lines)


def plot_comparison(path: str | Path, results: Mapping[str, Mapping[str, Any]], title: str = "") -> Path:
    """Per-round retained-test and forget accuracy of every method, gold as dashed levels."""

    fig, axes = _figure(1, 2, figsize=(11, 4.2), sharex=True)
    first = next(iter(results.values()))
    gold_hist = {int(r): h for r, h in first["gold-history"].items()}
    d = first["config"]["unlearn.round"]
    for ax, key, label in (
        (axes[0], "test-acc", "held-out test accuracy"),
        (axes[1], "forget-acc", "forget-set accuracy (deleted data)"),
    ):
        for i, (name, res) in enumerate(results.items()):
            hist = {int(r): h for r, h in res["history"].items()}
            rounds = sorted(r for r in hist if key in hist[r])
            ax.plot(rounds, [hist[r][key] for r in rounds], marker="o", ms=3, color=f"C{i}", label=name)
        if gold_hist:
            ax.axhline(gold_hist[max(gold_hist)][key], color="k", ls="--", lw=1, label="gold (final)")
        ax.axvline(d, color="k", ls=":", lw=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("server round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


#: Metrics summarised over seeds by the harness (report keys of :func:`fed_unlearn.evaluation.summarise` & co.).
HARNESS_METRICS = tuple(k for k, _ in TABLE_ROWS)


#: Extra per-method rows of the harness: (key, label, getter on one results.json).
EXTRA_ROWS: tuple[tuple[str, str, Any], ...] = (
    ("unlearning-rounds", "unlearning rounds", lambda r: r["recovery"].get("unlearning-rounds")),
    ("recovery-rounds", "recovery rounds to gold accuracy", lambda r: r["recovery"]["rounds-to-gold"]),
    (
        "compute-fraction",
        "client-compute, fraction of gold retraining",
        lambda r: r["client-compute"]["fraction-of-gold-steps"],
    ),
    ("history-mb", "server-side per-client history, MB", lambda r: r.get("server-history-bytes", 0) / 1e6),
)

Stats = Mapping[str, Mapping[str, "tuple[float, float, int]"]]


def seed_statistics(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Mean, sample standard deviation and count over seeds, per model column and metric.

    Parameters
    ----------
    runs : mapping method -> list of ``results.json`` dicts (one per seed)

    Returns
    -------
    dict
        ``{column: {metric: (mean, std, n)}}`` with columns ``original``, each method, ``gold``
        and, when every run measured it, ``gold-twin`` (original, gold and twin taken from the
        first method's runs: they do not depend on the method). Extra metrics per method:
        :data:`EXTRA_ROWS`.
    """
    import numpy as np

    def stats(values: Sequence[float]) -> tuple[float, float, int]:
        v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
        if len(v) == 0:
            return (float("nan"), float("nan"), 0)
        return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v)))

    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    first = next(iter(runs.values()))
    twin = (("gold-twin", first),) if first and all("gold-twin" in r["report"] for r in first) else ()
    for column, source in (("original", first), *((m, r) for m, r in runs.items()), ("gold", first), *twin):
        model = "unlearned" if column not in ("original", *REFERENCES) else column
        out[column] = {k: stats([r["report"][model].get(k) for r in source]) for k in HARNESS_METRICS}
        if model == "unlearned":
            for key, _, get in EXTRA_ROWS:
                out[column][key] = stats([get(r) for r in source])
    return out


def _cell(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    return "–" if n == 0 else f"{mean:.4f} ± {std:.4f}"


def statistics_table(stats: Stats) -> str:
    """Markdown table of ``mean ± std`` per metric (rows) and column (models)."""
    cols = list(stats)
    labels = dict(TABLE_ROWS) | {k: label for k, label, _ in EXTRA_ROWS}
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, label in labels.items():
        if not any(stats[c].get(key, (0, 0, 0))[2] for c in cols):
            continue
        lines.append(
            f"| {label} | " + " | ".join(_cell(stats[c].get(key, (float("nan"), float("nan"), 0))) for c in cols) + " |"
        )
    return "\n".join(lines)


def overview_table(stats: Mapping[str, Stats], key: str = "average-gap") -> str:
    """Markdown table: one row per model column, one column per scenario, cells ``mean ± std`` of ``key``."""
    scenarios = list(stats)
    cols: list[str] = []
    for st in stats.values():
        cols += [c for c in st if c not in cols and c not in REFERENCES]
    # the twin only where it was measured on ``key`` (it is never audited); the gold always
    twin = any(st.get("gold-twin", {}).get(key, (0, 0, 0))[2] for st in stats.values())
    cols += [c for c in ("gold-twin", "gold") if (twin or c == "gold") and any(c in st for st in stats.values())]
    lines = ["| model | " + " | ".join(scenarios) + " |", "|---|" + "---:|" * len(scenarios)]
    for c in cols:
        lines.append(
            f"| {c} | "
            + " | ".join(
                _cell(stats[sc][c][key]) if c in stats[sc] and key in stats[sc][c] else "–" for sc in scenarios
            )
            + " |"
        )
    return "\n".join(lines)


def write_statistics_csv(path: str | Path, stats: Mapping[str, Stats]) -> Path:
    """``scenario,model,metric,mean,std,n`` rows."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["scenario", "model", "metric", "mean", "std", "n"])
        for scenario, st in stats.items():
            for column, metrics in st.items():
                for key, (mean, std, n) in metrics.items():
                    w.writerow([scenario, column, key, mean, std, n])
    return path


def _color(i: int) -> Any:
    """The i-th method's colour (20 distinct ones; the original is grey)."""
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def _bars(ax: Any, stats: Stats, cols: Sequence[str], key: str, label: str, gold_line: bool) -> None:
    means = [stats[c][key][0] for c in cols]
    stds = [stats[c][key][1] for c in cols]
    ax.bar(
        range(len(cols)),
        means,
        yerr=stds,
        capsize=3,
        color=["0.6" if c == "original" else _color(i - 1) for i, c in enumerate(cols)],
    )
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    if gold_line:
        import math

        g = stats["gold"][key][0]
        ax.axhline(g, color="k", ls="--", lw=1, label=f"gold {g:.3f}")
        vals = [m for m in means if not math.isnan(m)] + [g]
        lo = min(m - s for m, s in zip(means, stds, strict=False) if not math.isnan(m)) if means else g
        ax.set_ylim(min(lo, g) - 0.02, max(vals) + max(stds + [0]) + 0.02)
        ax.legend(fontsize=8)


def plot_harness_scenario(
    path: str | Path, stats: Stats, seed0: Mapping[str, Mapping[str, Any]], title: str = ""
) -> Path:
    """One scenario: per-round test and forget accuracy (seed 0), Average Gap bars, MIA AUC bars vs gold."""
    import matplotlib.ticker

    fig, axes = _figure(2, 2, figsize=(12, 8))
    first = next(iter(seed0.values()))
    gold_hist = {int(r): h for r, h in first["gold-history"].items()}
    d = first["config"]["unlearn.round"]
    for ax, key, label in (
        (axes[0, 0], "test-acc", "held-out test accuracy (seed 0)"),
        (axes[0, 1], "forget-acc", "forget-set accuracy (seed 0)"),
    ):
        for i, (name, res) in enumerate(seed0.items()):
            hist = {int(r): h for r, h in res["history"].items()}
            rounds = sorted(r for r in hist if key in hist[r])
            ax.plot(rounds, [hist[r][key] for r in rounds], marker="o", ms=2, color=_color(i), label=name)
        if gold_hist and key in gold_hist[max(gold_hist)]:
            ax.axhline(gold_hist[max(gold_hist)][key], color="k", ls="--", lw=1, label="gold (final)")
        ax.axvline(d, color="k", ls=":", lw=1)
        ax.annotate(
            "request / unlearning",
            (d, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(3, 0),
            textcoords="offset points",
            fontsize=7,
        )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("server round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="best", ncol=2)
    methods = [c for c in stats if c not in ("original", *REFERENCES)]
    _bars(axes[1, 0], stats, ["original", *methods], "average-gap", "Average Gap to gold (lower is better)", False)
    mia = "mia-nn-auc" if stats["gold"].get("mia-nn-auc", (0, 0, 0))[2] else "mia-auc"
    _bars(axes[1, 1], stats, ["original", *methods], mia, f"{mia} (target: the gold's)", True)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_harness_overview(path: str | Path, stats: Mapping[str, Stats], title: str = "") -> Path:
    """Average Gap per method, one group of bars per scenario."""
    import numpy as np

    scenarios = list(stats)
    cols: list[str] = []
    for st in stats.values():
        cols += [c for c in st if c not in cols and c not in REFERENCES]
    fig, ax = _figure(figsize=(max(8, 1.2 * len(cols) * len(scenarios) / 3), 4.5))
    width = 0.8 / len(scenarios)
    x = np.arange(len(cols))
    for j, sc in enumerate(scenarios):
        means = [stats[sc][c]["average-gap"][0] if c in stats[sc] else np.nan for c in cols]
        stds = [stats[sc][c]["average-gap"][1] if c in stats[sc] else 0.0 for c in cols]
        ax.bar(x + (j - (len(scenarios) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=sc)
    ax.set_xticks(x, cols, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Average Gap to gold")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def seed_verdicts(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[str]]:
    """Per method, the metrics on which it ends further from the gold than the original, beyond the seed spread.

    For every seed the paired difference ``d(method, gold) - d(original, gold)`` is taken
    (:func:`distance_to_gold`); a metric is named when the mean difference is positive and
    larger than one standard deviation of the differences (with one seed: when positive).
    """
    import numpy as np

    out: dict[str, list[str]] = {}
    for method, results in runs.items():
        named = []
        for key in VERDICT_METRICS:
            diffs = []
            for r in results:
                rep = r["report"]
                dm, do = (
                    distance_to_gold(rep["unlearned"], rep["gold"], key),
                    distance_to_gold(rep["original"], rep["gold"], key),
                )
                if math.isfinite(dm) and math.isfinite(do):
                    diffs.append(dm - do)
            if not diffs:
                continue
            d = np.asarray(diffs)
            spread = float(d.std(ddof=1)) if len(d) > 1 else 0.0
            if d.mean() > 1e-9 and d.mean() > spread:
                named.append(key)
        out[method] = named
    return out


#: The metrics a model is judged on against the gold's seed spread (absolute values; the distances are 0 for it).
SPREAD_METRICS = GAP_METRICS + ("relearn-steps",)
#: The core ones: utility, forgetting and the loss attack.
CORE_METRICS = ("test-acc", "retain-acc", "forget-acc", "mia-auc")


def inside_gold_spread(stats: Stats, column: str, keys: Sequence[str] = SPREAD_METRICS) -> dict[str, bool]:
    """Per metric (of ``keys`` measured for both), whether ``column``'s mean over seeds is within one std of the gold's.

    ``|mean(column) - mean(gold)| <= std(gold)``: the method cannot be told from a retrained
    model by this metric at the seed-to-seed variation of retraining itself. With a
    ``gold-twin`` column, also the distances of :data:`TWIN_METRICS` (0 for the gold by
    definition): inside when ``mean(column) <= mean(twin) + std(twin)``, no further from the
    gold than a retraining with other seeds.
    """
    out: dict[str, bool] = {}
    gold, model, twin = stats.get("gold", {}), stats.get(column, {}), stats.get("gold-twin", {})
    for key in keys:
        if key not in gold or key not in model or not gold[key][2] or not model[key][2]:
            continue
        (gm, gs, _), (mm, _, _) = gold[key], model[key]
        if math.isfinite(gm) and math.isfinite(mm):
            out[key] = abs(mm - gm) <= max(gs, 1e-12)
    for key in TWIN_METRICS if twin else ():
        if key not in model or key not in twin or not model[key][2] or not twin[key][2]:
            continue
        (tm, ts, _), (mm, _, _) = twin[key], model[key]
        if math.isfinite(tm) and math.isfinite(mm):
            out[key] = mm <= tm + ts
    return out


def spread_table(stats: Mapping[str, Stats]) -> str:
    """Markdown: per scenario and method, the metrics outside the gold's seed spread (core ones first), and counts."""
    scenarios = list(stats)
    cols: list[str] = []
    for st in stats.values():
        cols += [c for c in st if c not in cols and c not in REFERENCES]
    lines = ["| model | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    inside_all = inside_core = cells = 0
    for c in cols:
        row = []
        for sc in scenarios:
            if c not in stats[sc]:
                row.append("")
                continue
            verdict = inside_gold_spread(stats[sc], c)
            outside = [k for k in verdict if not verdict[k]]
            core_out = [k for k in CORE_METRICS if k in outside]
            if c != "original":
                cells += 1
                inside_all += not outside
                inside_core += not core_out
            if not outside:
                row.append("**inside on all**")
            else:
                rest = [k for k in outside if k not in core_out]
                row.append(", ".join([f"**{k}**" for k in core_out] + rest))
        lines.append(f"| {c} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        f"Method cells inside the gold's seed spread on every metric: **{inside_all} of {cells}**; on the core "
        f"metrics ({', '.join(CORE_METRICS)}): **{inside_core} of {cells}**. A cell lists the metrics where the "
        "method's mean over seeds is further from the gold's mean than the gold's own standard deviation (core "
        "metrics in bold)"
        + (
            f"; and those of {', '.join(TWIN_METRICS)} (distances to the gold) on which it is further from the "
            "gold than the gold twin, a retraining with other seeds, plus one standard deviation."
            if any("gold-twin" in st for st in stats.values())
            else "."
        )
    )
    return "\n".join(lines)


#: The measures a harness ranking uses together (one headline must not hide the others).
RANKING_KEYS = ("average-gap", "kl-forget", "disagree-forget", "disagree-test")


def ranking_table(stats: Mapping[str, Stats], keys: Sequence[str] = RANKING_KEYS) -> str:
    """Methods ranked by their mean rank over scenarios and ``keys`` (lower = closer to the gold).

    The original is ranked with them: a method ranked below it is, on average, further from
    the gold than doing nothing.
    """
    import numpy as np

    ranks: dict[str, list[float]] = {}
    for st in stats.values():
        cols = [c for c in st if c not in REFERENCES]
        for key in keys:
            vals = {c: st[c][key][0] for c in cols if key in st[c] and np.isfinite(st[c][key][0])}
            for i, c in enumerate(sorted(vals, key=lambda c: vals[c])):
                ranks.setdefault(c, []).append(float(i + 1))
    rows = sorted(ranks, key=lambda c: float(np.mean(ranks[c])))
    lines = [f"| model | mean rank ({', '.join(keys)}, every scenario) | ranked |", "|---|---:|---:|"]
    lines += [f"| {c} | {np.mean(ranks[c]):.2f} | {len(ranks[c])} |" for c in rows]
    return "\n".join(lines)
