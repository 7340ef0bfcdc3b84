"""The comparison harness: methods x seeds, each cell a `flwr run` simulation, summarised.

    python -m simulations.harness                                   # every method, seeds 0 1 2
    python -m simulations.harness --methods puf sragu --seeds 0 1 --run-config "partitioner='dirichlet'"

Each cell (method, seed) writes its ``results.json`` under
``<results-dir>/harness/<method>/seed<k>/``; a rerun skips cells whose results exist
(resumable), and the gold federation of each seed is trained once and shared by every
method through the cache. Outputs in ``<results-dir>/harness/``:

* ``harness.md``: mean ± std over seeds per metric and model (original, each method, gold);
* ``harness.csv`` / ``harness.json``: the same numbers, machine-readable;
* ``harness.png``: Average Gap per method and MIA AUC per method against the gold's.

Deletion scenarios beyond whole clients (sample- and class-level) are not in the grid yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fed_unlearn.report import plot_harness, seed_statistics, statistics_table, write_json, write_statistics_csv
from fed_unlearn.unlearning import METHODS

from .run_experiment import PROJECT_ROOT
from .run_experiment import main as run_one


def progress(done: int, total: int, label: str, started: float) -> None:
    """One-line progress bar over the grid, with elapsed time."""
    width = 30
    filled = int(width * done / total)
    print(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label} ({time.monotonic() - started:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="registry names (default: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--num-clients", type=int, default=5)
    ap.add_argument("--run-config", default="", help="overrides shared by every cell")
    ap.add_argument("--results-dir", default=str(PROJECT_ROOT / "results"))
    args = ap.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if "seed=" in args.run_config or "unlearn.method=" in args.run_config:
        ap.error("seed and unlearn.method are set by the harness; use --seeds and --methods")
    root = Path(args.results_dir).resolve()
    dest = root / "harness"
    cells = [(m, s) for s in args.seeds for m in args.methods]  # seed-major: one gold per seed, then reused
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    started = time.monotonic()
    for i, (method, seed) in enumerate(cells):
        out = dest / method / f"seed{seed}"
        found = sorted(out.glob("*/results.json"))
        if not found:
            progress(i, len(cells), f"running {method} seed {seed}", started)
            rc = f"seed={seed} unlearn.method='{method}' gold-cache-dir='{root / 'gold-cache'}' {args.run_config}".strip()
            code = run_one(["--num-clients", str(args.num_clients), "--results-dir", str(out), "--run-config", rc])
            if code != 0:
                print(f"{method} seed {seed}: run failed (exit {code}); finished cells are kept, rerun to resume", file=sys.stderr)
                return code
            found = sorted(out.glob("*/results.json"))
        else:
            progress(i, len(cells), f"{method} seed {seed} already done, skipped", started)
        runs[method].append(json.loads(found[0].read_text()))
    progress(len(cells), len(cells), "done", started)

    stats = seed_statistics(runs)
    cfg = runs[args.methods[0]][0]["config"]
    title = (f"{cfg['dataset']}, {args.num_clients} clients, client(s) {cfg['departing']} leave in round "
             f"{cfg['departure_round']}; mean ± std over seeds {args.seeds}")
    table = statistics_table(stats)
    (dest / "harness.md").write_text(f"# {title}\n\n{table}\n")
    write_statistics_csv(dest / "harness.csv", stats)
    write_json(dest / "harness.json", {"seeds": args.seeds, "methods": args.methods, "run-config": args.run_config,
                                       "statistics": {c: {k: {"mean": v[0], "std": v[1], "n": v[2]} for k, v in m.items()}
                                                      for c, m in stats.items()}})
    plot_harness(dest / "harness.png", stats, title=title)
    print(f"\n{table}\n\nwritten to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
