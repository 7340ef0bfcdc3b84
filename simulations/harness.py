"""The comparison harness: methods x deletion scenarios x seeds, summarised against the gold.

    python -m simulations.harness                       # every method x 4 scenarios x seeds 0 1 2 (in-process engine)
    python -m simulations.harness --engine ray          # the same grid through flwr run on Ray (same numbers, slower)
    python -m simulations.harness --methods puf sragu --scenarios client class --seeds 0 1
    python -m simulations.harness --methods fine-tune amun --run-config "unlearn.augment='trivial'" \\
        --name harness-trivial

Each cell (scenario, method, seed) is one experiment: by default the ServerApp and
ClientApp code on an in-process Grid; with ``--engine ray`` a ``flwr run`` simulation on
Flower's Ray engine through :mod:`simulations.run_experiment` (same numbers). Cells write
``<results-dir>/harness/<scenario>/<method>/seed<k>/*/results.json``; a rerun skips cells
whose results the current code wrote (resumable; a code change reruns them). The gold
federation of each (scenario, seed), and the original rounds before the request, are
trained once and shared by every method through the cache.

Outputs in ``<results-dir>/harness/``:

* ``harness.md``: the overview (Average Gap to gold per method and scenario) and, per
  scenario, mean ± std over seeds of every metric for the original, each method, the gold
  and the gold twin (a retraining with other seeds: how far from the gold retraining itself
  lands on KL and disagreement, the spread those distances are judged by);
* ``harness.csv`` / ``harness.json``: the same numbers, machine-readable;
* ``harness.png``: Average Gap per method, grouped by scenario;
* ``harness_<scenario>.png``: per-round forget and test accuracy (seed 0, unlearning round
  marked), Average Gap per method, and the scenario's membership-inference AUC against the gold's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from fed_unlearn.report import (
    current_results,
    overview_table,
    plot_harness_overview,
    plot_harness_scenario,
    plot_roc,
    ranking_table,
    seed_statistics,
    seed_verdicts,
    spread_table,
    statistics_table,
    write_json,
    write_statistics_csv,
)
from fed_unlearn.unlearning import METHODS

from .run_experiment import PROJECT_ROOT
from .run_experiment import main as run_one

#: Where the UCI Adult files are expected (the adult-linear scenario); ``FED_UNLEARN_ADULT_DIR`` overrides it.
ADULT_DIR = os.environ.get("FED_UNLEARN_ADULT_DIR", str(PROJECT_ROOT.parent / "shared" / "data" / "uci-adult"))

#: Named deletion scenarios: run-config overrides (``unlearn.departing`` is ignored for ``class``).
SCENARIOS: dict[str, str] = {
    "client": "unlearn.scenario='client' unlearn.departing='0'",
    "samples-random": "unlearn.scenario='samples' unlearn.selection='random' unlearn.departing='0'",
    "samples-high-loss": "unlearn.scenario='samples' unlearn.selection='high-loss' unlearn.departing='0'",
    "samples-low-margin": "unlearn.scenario='samples' unlearn.selection='low-margin' unlearn.departing='0'",
    "samples-high-grad-norm": "unlearn.scenario='samples' unlearn.selection='high-grad-norm' unlearn.departing='0'",
    "samples-influence": "unlearn.scenario='samples' unlearn.selection='influence' unlearn.departing='0'",
    "samples-class": "unlearn.scenario='samples' unlearn.selection='class' unlearn.departing='0'",
    "class": "unlearn.scenario='class'",
    # a non-IID federation (Dirichlet 0.2) whose departing client holds a skewed, distinctive share of the classes
    "noniid-client": "unlearn.scenario='client' unlearn.departing='0' partitioner='dirichlet' dirichlet-alpha=0.2",
    # client 0 alone holds class 0: what a model retrained without it cannot know at all
    "unique-class": "unlearn.scenario='client' unlearn.departing='0' partitioner='unique-class' unique-class=0",
    # 30 % of client 0's labels wrong, train and held-out alike: what a model memorises, not learns
    "noisy-client": "unlearn.scenario='client' unlearn.departing='0' label-noise=0.3 label-noise-clients='0'",
    # a strongly non-IID federation (Dirichlet 0.1): the departing client's classes are mostly its own
    "noniid-client-0.1": "unlearn.scenario='client' unlearn.departing='0' partitioner='dirichlet' dirichlet-alpha=0.1",
    # the PUF authors' protocol (Mora et al. 2025, their reference code's settings): 10 clients, Dirichlet 0.3,
    # one local epoch of plain SGD, lr 0.1, weight decay 1e-3, the CNN, 40 rounds before the request,
    # recovery until the retrained model's test accuracy (their protocol's oracle); run with --num-clients 10
    "puf-paper": (
        "unlearn.scenario='client' unlearn.departing='0' partitioner='dirichlet' dirichlet-alpha=0.3 model='cnn' "
        "local-epochs=1 lr=0.1 momentum=0.0 weight-decay=0.001 unlearn.round=41 num-server-rounds=50 "
        "unlearn.recovery='until-gold'"
    ),
    # logistic regression on UCI Adult: the convex setting where ascent can end further from the retrained model
    "adult-linear": (
        f"unlearn.scenario='client' unlearn.departing='0' dataset='uci-adult' data-dir='{ADULT_DIR}' "
        "model='linear' local-epochs=1 lr=0.05"
    ),
    # the same with 5 local epochs: the setting where a calibration that reads too much into weak evidence overshoots
    "adult-linear-5": (
        f"unlearn.scenario='client' unlearn.departing='0' dataset='uci-adult' data-dir='{ADULT_DIR}' "
        "model='linear' local-epochs=5 lr=0.05"
    ),
    # the hard deletions at a large fraction
    **{
        f"hard30-{sel}": (
            f"unlearn.scenario='samples' unlearn.selection='{sel}' unlearn.fraction=0.3 unlearn.departing='0'"
        )
        for sel in ("high-loss", "low-margin", "high-grad-norm", "influence")
    },
}
DEFAULT_SCENARIOS = ("client", "samples-random", "samples-high-loss", "class")
#: Scenarios whose protocol fixes the federation's size (others use --num-clients).
SCENARIO_CLIENTS = {"puf-paper": 10}


def deletion_scenario(name: str) -> str:
    """The deletion scenario (``client``, ``samples``, ``class``) of a harness scenario."""
    return re.search(r"unlearn\.scenario='(\w+)'", SCENARIOS[name]).group(1)  # type: ignore[union-attr]


def serves(method: str, scenario: str) -> bool:
    """Whether ``method`` serves the harness scenario (its registry entry lists the deletion scenarios)."""
    return (
        deletion_scenario(scenario) in METHODS[method].scenarios
        if scenario in SCENARIOS
        else scenario in METHODS[method].scenarios
    )


#: Keys the harness sets itself per cell.
OWNED_KEYS = ("seed=", "unlearn.method=", "unlearn.scenario=")


def progress(done: int, total: int, label: str, started: float) -> None:
    """One-line progress bar over the grid, with elapsed time and an estimate of what is left."""
    width = 30
    filled = int(width * done / total)
    elapsed = time.monotonic() - started
    eta = f", ~{elapsed / done * (total - done):.0f} s left" if 0 < done < total else ""
    print(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label} ({elapsed:.0f} s{eta})", flush=True)


def run_cell(engine: str, out: Path, num_clients: int, overrides: str, ray_address: str = "") -> int:
    """Run one experiment into ``out``; returns 0 on success."""
    if engine == "ray":
        cluster = ["--ray-address", ray_address] if ray_address else []
        return run_one(
            ["--num-clients", str(num_clients), "--results-dir", str(out), "--run-config", overrides, *cluster]
        )
    from .inprocess import run_inprocess

    try:
        run_inprocess(str(PROJECT_ROOT), num_clients, f"{overrides} results-dir='{out}'")
    except Exception as exc:  # noqa: BLE001  (report and stop the grid; finished cells stay)
        print(f"cell failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def leakage_section(stats: dict[str, Any], runs: dict[str, dict[str, list[dict[str, Any]]]], references: int) -> str:
    """The strong audit's overview: RMIA and LiRA at 1 % FPR, and RMIA telling each model from the gold."""
    first = next(r[0] for per in runs.values() for r in per.values() if r)
    fig = first.get("leakage", {}).get("figures", {}).get("gold", {})
    trained = [
        r["leakage"]["references"] for per in runs.values() for rs in per.values() for r in rs if r.get("leakage")
    ]
    wall = sum(t["wall-seconds"] for t in trained)
    count = sum(t["trained"] for t in trained)
    print(f"reference federations: {count} trained in this grid, {wall:.0f} s (apart from the unlearning cost)")
    parts = [
        f"## Leakage, strong audit ({references} reference federations per data setting and seed)",
        "Per-example attacks calibrated with reference models; members = the forget set, non-members = the "
        "forgetting clients' held-out samples of the same classes (first cell: "
        f"{int(fig.get('members', 0))} members, {int(fig.get('nonmembers', 0))} non-members). "
        "The gold's figure is the target.",
        f"### RMIA TPR at 1 % FPR\n\n{overview_table(stats, 'rmia-tpr@1%')}",
        f"### offline LiRA TPR at 1 % FPR\n\n{overview_table(stats, 'lira-tpr@1%')}",
        f"### RMIA AUC\n\n{overview_table(stats, 'rmia-auc')}",
        "### RMIA telling the model from the gold on the forget set (AUC; 0.5 = cannot)\n\n"
        + overview_table(stats, "rmia-vs-gold-auc"),
        f"Reference cost: {count} reference federations trained for this grid in {wall:.0f} s of wall time, "
        "apart from the unlearning cost (cached, shared by every method and deletion of a setting).",
    ]
    return "\n\n".join(parts)


def plot_harness_roc(path: Path, runs: dict[str, list[dict[str, Any]]], title: str) -> None:
    """RMIA ROC on log-log axes of the original, every method and the gold (first seed of one scenario)."""
    curves: dict[str, Any] = {}
    for method, rs in runs.items():
        roc = rs[0].get("leakage", {}).get("roc", {}).get("rmia") if rs else None
        if roc:
            curves.setdefault("original", roc["original"])
            curves[method] = roc["unlearned"]
            gold = roc["gold"]
    if curves:
        plot_roc(path, {**curves, "gold": gold}, title=title)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="registry names (default: all)")
    ap.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS), help=f"of {', '.join(SCENARIOS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--num-clients", type=int, default=5)
    ap.add_argument(
        "--engine",
        choices=("ray", "inprocess"),
        default="inprocess",
        help="ray: flwr run on the Ray simulation engine; inprocess: same apps, no SuperLink/Ray",
    )
    ap.add_argument("--run-config", default="", help="overrides shared by every cell")
    ap.add_argument("--ray-address", default="", help="with --engine ray: an existing Ray cluster's head (host:port)")
    ap.add_argument(
        "--audit-references",
        type=int,
        default=8,
        help="reference federations of the strong leakage audit per (data, seed) (even; 0 = off; default 8)",
    )
    ap.add_argument(
        "--gold-twin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a second gold per (scenario, seed) with other seeds: the spread of KL and disagreement to the gold",
    )
    ap.add_argument("--results-dir", default=str(PROJECT_ROOT / "results"))
    ap.add_argument("--name", default="harness", help="output folder under results-dir (the gold cache is shared)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    bad = sorted(set(args.scenarios) - set(SCENARIOS))
    if bad:
        ap.error(f"unknown scenario(s) {bad}; valid: {', '.join(SCENARIOS)}")
    if args.audit_references < 0 or args.audit_references % 2:
        ap.error(f"--audit-references must be 0 or even, got {args.audit_references}")
    if any(k in args.run_config for k in (*OWNED_KEYS, "audit.references=", "audit.gold-twin=")):
        ap.error(
            "seed, unlearn.method, unlearn.scenario, audit.references and audit.gold-twin are set by the harness; "
            "use --seeds, --methods, --scenarios, --audit-references, --gold-twin"
        )
    root = Path(args.results_dir).resolve()
    dest = root / args.name
    # scenario- and seed-major: the first method of each (scenario, seed) trains the gold, the others reuse it
    cells = [(sc, m, s) for sc in args.scenarios for s in args.seeds for m in args.methods if serves(m, sc)]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        sc: {m: [] for m in args.methods if serves(m, sc)} for sc in args.scenarios
    }
    started = time.monotonic()
    for i, (scenario, method, seed) in enumerate(cells):
        out = dest / scenario / method / f"seed{seed}"
        found = current_results(out)
        if found is None:
            progress(i, len(cells), f"running {scenario} / {method} / seed {seed}", started)
            rc = (
                f"seed={seed} unlearn.method='{method}' gold-cache-dir='{root / 'gold-cache'}' "
                f"audit.references={args.audit_references} audit.gold-twin={str(args.gold_twin).lower()} "
                f"{SCENARIOS[scenario]} {args.run_config}"
            ).strip()
            code = run_cell(args.engine, out, SCENARIO_CLIENTS.get(scenario, args.num_clients), rc, args.ray_address)
            if code != 0:
                print(
                    f"{scenario} / {method} / seed {seed}: run failed (exit {code}); finished cells are kept, "
                    "rerun to resume",
                    file=sys.stderr,
                )
                return code
            found = current_results(out)
            if found is None:
                print(f"{scenario} / {method} / seed {seed}: no results written", file=sys.stderr)
                return 1
        else:
            progress(i, len(cells), f"{scenario} / {method} / seed {seed} already done, skipped", started)
        runs[scenario][method].append(json.loads(found.read_text()))
    progress(len(cells), len(cells), "done", started)
    grid_minutes = (time.monotonic() - started) / 60
    print(f"grid time: {grid_minutes:.1f} min for {len(cells)} cells (engine {args.engine})", flush=True)

    stats = {sc: seed_statistics(r) for sc, r in runs.items() if r}
    first = next(iter(next(iter(runs.values())).values()))[0]
    cfg = first["config"]
    setup = (
        f"{cfg['dataset']}, {cfg['model']}, {args.num_clients} clients ({cfg['partitioner']}), request in round "
        f"{cfg['unlearn.round']} of {cfg['num-server-rounds']}; mean ± std over seeds {args.seeds}; "
        f"engine {args.engine}"
    )
    verdicts = {sc: seed_verdicts(r) for sc, r in runs.items() if r}
    further = [
        f"| {m} | "
        + " | ".join(", ".join(verdicts[sc].get(m, [])) or "–" if m in verdicts[sc] else "" for sc in verdicts)
        + " |"
        for m in dict.fromkeys(m for v in verdicts.values() for m in v)
    ]
    sections = [
        f"# fed-unlearn harness\n\n{setup}\n\n## Ranking: Average Gap, KL and disagreement to gold together\n\n"
        f"{ranking_table(stats)}\n\n## Average Gap to gold (lower is better)\n\n{overview_table(stats)}\n\n"
        "## Further from the gold than the original (mean over seeds, beyond one std)\n\n"
        f"| method | {' | '.join(verdicts)} |\n|---|{'---|' * len(verdicts)}\n" + "\n".join(further),
        f"## Inside the gold's seed spread\n\n{spread_table(stats)}",
    ]
    if args.audit_references:
        sections.append(leakage_section(stats, runs, args.audit_references))
        sc0 = next(iter(runs))
        plot_harness_roc(
            dest / f"harness_roc_{sc0}.png", runs[sc0], title=f"RMIA on the forget set: {sc0}, seed {args.seeds[0]}"
        )
    for sc in stats:
        desc = next(iter(runs[sc].values()))[0]["deletion"]
        row = (
            "| **further from gold than the original on** | – | "
            + " | ".join(", ".join(verdicts[sc].get(m, [])) or "–" for m in runs[sc])
            + " | |"
        )
        sections.append(
            f"## {sc}: {json.dumps({k: v for k, v in desc.items() if k != 'clients'})}\n\n"
            f"{statistics_table(stats[sc])}\n{row}"
        )
        for m, named in verdicts[sc].items():
            if named:
                print(
                    f"warning: {sc} / {m}: further from the gold than the original on {', '.join(named)}",
                    file=sys.stderr,
                )
        plot_harness_scenario(
            dest / f"harness_{sc}.png", stats[sc], {m: r[0] for m, r in runs[sc].items()}, title=f"{sc}: {setup}"
        )
    (dest / "harness.md").write_text("\n\n".join(sections) + "\n")
    write_statistics_csv(dest / "harness.csv", stats)
    write_json(
        dest / "harness.json",
        {
            "seeds": args.seeds,
            "methods": args.methods,
            "scenarios": args.scenarios,
            "engine": args.engine,
            "run-config": args.run_config,
            "further-from-gold-than-original": verdicts,
            "statistics": {
                sc: {c: {k: {"mean": v[0], "std": v[1], "n": v[2]} for k, v in m.items()} for c, m in st.items()}
                for sc, st in stats.items()
            },
        },
    )
    plot_harness_overview(dest / "harness.png", stats, title=setup)
    print(f"\n{ranking_table(stats)}\n\n{overview_table(stats)}\n\nwritten to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
