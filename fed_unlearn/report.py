"""What an experiment leaves behind: ``results.json``, ``accuracy.png`` and a Markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

#: Rows of the comparison table: (metric key, label). Order = the README table's order.
TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("test-acc", "test accuracy (retained clients' held-out data)"),
    ("retain-acc", "retain accuracy (retained clients' train data)"),
    ("forget-acc", "forget accuracy (departing client's train data)"),
    ("forget-heldout-acc", "departing client's held-out accuracy"),
    ("mia-auc", "loss-threshold MIA AUC on the departing client"),
    ("kl-forget", "KL(gold ‖ model) on the forget set"),
    ("disagree-forget", "prediction disagreement with gold, forget set"),
    ("kl-test", "KL(gold ‖ model) on retained held-out data"),
    ("disagree-test", "prediction disagreement with gold, retained held-out"),
)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(models: Mapping[str, Mapping[str, float]], columns: Sequence[str] = ("original", "unlearned", "gold")) -> str:
    """Markdown table, one row per metric of :data:`TABLE_ROWS`, one column per model."""
    cols = [c for c in columns if c in models]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, label in TABLE_ROWS:
        if any(key in models[c] for c in cols):
            lines.append(f"| {label} | " + " | ".join(_fmt(models[c].get(key)) for c in cols) + " |")
    return "\n".join(lines)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = (("test-acc", "retained clients (held-out)", "tab:blue"), ("forget-acc", "forget set (departing client)", "tab:red"))
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
        ax.annotate("unlearning round", (departure_round, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8)
    ax.set_xlabel("server round")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
