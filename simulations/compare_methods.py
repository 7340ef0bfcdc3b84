"""Run several unlearning methods on the same experiment and compare them with the gold.

Every method runs as its own `flwr run` simulation (same seeds, same clients, same
departure; the gold federation is trained once and shared through the cache), then
one table, one plot and the per-layer table (exponent, stability weight, share of
the unlearning motion per method) are written:

    python -m simulations.compare_methods     # every method that serves the scenario (~8 min here)
    python -m simulations.compare_methods --methods puf sragu --run-config "seed=1"

A method whose results are already in ``<results-dir>/comparison/<method>/`` is not
rerun (delete the folder to recompute). Class-only methods (TRW, MPRU) are left out of
the default list unless the run config sets ``unlearn.scenario='class'``.

Outputs in ``<results-dir>/comparison/``: ``comparison.md``, ``comparison.png``,
``comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from fed_unlearn.report import (
    comparison_table,
    current_results,
    layer_table,
    plot_comparison,
    write_json,
)
from fed_unlearn.unlearning import METHODS

from .harness import serves
from .run_experiment import PROJECT_ROOT
from .run_experiment import main as run_one


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=None, help="registry names (default: all that serve the scenario)")
    ap.add_argument("--num-clients", type=int, default=5)
    ap.add_argument("--run-config", default="", help="overrides shared by every method")
    ap.add_argument("--results-dir", default=str(PROJECT_ROOT / "results"))
    args = ap.parse_args(argv)
    found = re.search(r"unlearn\.scenario\s*=\s*['\"]?(\w+)", args.run_config)
    scenario = found.group(1) if found else "client"
    if args.methods is None:
        args.methods = [m for m in METHODS if serves(m, scenario)]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        print(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir).resolve()
    results = {}
    for method in args.methods:
        out = results_dir / "comparison" / method
        # one gold federation for all methods: a shared cache
        rc = f"unlearn.method='{method}' gold-cache-dir='{results_dir / 'gold-cache'}' " + args.run_config
        if current_results(out) is None:  # a result of older code is rerun
            code = run_one(["--num-clients", str(args.num_clients), "--results-dir", str(out), "--run-config", rc])
            if code != 0:
                print(f"{method}: run failed (exit {code})", file=sys.stderr)
                return code
        res_file = current_results(out)
        if res_file is None:
            print(f"{method}: no results written", file=sys.stderr)
            return 1
        results[method] = json.loads(res_file.read_text())
    cfg = next(iter(results.values()))["config"]
    title = (
        f"{cfg['dataset']}, {args.num_clients} clients: client(s) {cfg['unlearn.departing']} leave in round "
        f"{cfg['unlearn.round']}"
    )
    table, layers = comparison_table(results), layer_table(results)
    dest = results_dir / "comparison"
    (dest / "comparison.md").write_text(f"# {title}\n\n{table}\n\n## Per layer\n\n{layers}\n")
    plot_comparison(dest / "comparison.png", results, title=title)
    write_json(
        dest / "comparison.json",
        {
            m: {k: r[k] for k in ("report", "recovery", "client-compute", "unlearning", "config")}
            for m, r in results.items()
        },
    )
    print(f"\n{table}\n\n{layers}\n\nwritten to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
