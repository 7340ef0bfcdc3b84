"""Benchmark: what unlearning costs against the gold as the federation's history grows, beside what it reached.

    python -m simulations.bench_rounds                      # the default experiment, R = 5, 10, 20, 40 (~10 min here)
    python -m simulations.bench_rounds --rounds 5 10 --method sragu

The default experiment (MNIST-5k, MLP, 5 IID clients, client 0 leaves) with the request
after R rounds, so the gold retrains R rounds; recovery as always (gold-free, at most
``--max-recovery`` rounds). Printed per R, from each run's own report: the client-compute
of unlearning + recovery as a fraction of the gold's (optimizer steps summed over clients)
next to the method's floor (one unlearning round of every client: 1/R of the gold's steps,
plus what the departing client trains), and the fidelity reached — forget accuracy and
Average Gap and KL to the gold, against the original's — so that a cheap run that did not
forget is seen as such (the ``forgot`` column: the share of the original's forget-accuracy
gap to the gold that was closed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .harness import run_cell
from .run_experiment import PROJECT_ROOT


def _run(root: Path, engine: str, clients: int, overrides: str) -> dict[str, Any] | None:
    found = sorted(root.glob("*/results.json"))
    if not found:
        if run_cell(engine, root, clients, overrides) != 0:
            return None
        found = sorted(root.glob("*/results.json"))
    return dict(json.loads(found[0].read_text()))


def row(rounds: int, r: dict[str, Any]) -> str:
    """One table row: cost fraction and floor, then forget accuracy, Average Gap and KL, original -> unlearned."""
    o, u, g = r["report"]["original"], r["report"]["unlearned"], r["report"]["gold"]
    frac = r["client-compute"]["fraction-of-gold-steps"]
    gap = o["forget-acc"] - g["forget-acc"]
    closed = (o["forget-acc"] - u["forget-acc"]) / gap if abs(gap) > 1e-9 else float("nan")
    rec = r["recovery"]["rounds-run"]
    return (
        f"| {rounds} | {frac:.3f} | {1 / rounds:.3f} | {rec} | {o['forget-acc']:.4f} → {u['forget-acc']:.4f} "
        f"(gold {g['forget-acc']:.4f}) | {closed:.0%} | {o['average-gap']:.4f} → {u['average-gap']:.4f} | "
        f"{o['kl-forget']:.4f} → {u['kl-forget']:.4f} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, nargs="+", default=[5, 10, 20, 40], help="R: rounds before the request")
    ap.add_argument("--method", default="puf")
    ap.add_argument("--max-recovery", type=int, default=10, help="recovery rounds at most")
    ap.add_argument("--num-clients", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=("ray", "inprocess"), default="inprocess")
    ap.add_argument("--run-config", default="", help="further run-config overrides")
    ap.add_argument("--results-dir", default=str(PROJECT_ROOT / "results" / "bench-rounds"))
    args = ap.parse_args(argv)
    if any(r < 1 for r in args.rounds):
        ap.error("--rounds must be >= 1")
    root = Path(args.results_dir).resolve()
    lines = [
        "| R | unlearning + recovery steps / gold's | floor 1/R | recovery rounds | forget acc, original → "
        "unlearned | forgot | Average Gap | KL forget |",
        "|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for rounds in args.rounds:
        d = rounds + 1
        overrides = (
            f"seed={args.seed} unlearn.method='{args.method}' unlearn.round={d} "
            f"num-server-rounds={d + args.max_recovery} gold-cache-dir='{root / 'gold-cache'}' {args.run_config}"
        ).strip()
        r = _run(root / f"R{rounds}", args.engine, args.num_clients, overrides)
        if r is None:
            print(f"the run with R = {rounds} failed", file=sys.stderr)
            return 1
        lines.append(row(rounds, r))
    table = "\n".join(lines)
    print(
        f"machine: {os.cpu_count()} cores; {args.method} on the default experiment ({args.num_clients} clients, "
        f"seed {args.seed}{', ' + args.run_config if args.run_config else ''}), engine {args.engine}\n"
    )
    print(table)
    (root / "bench-rounds.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
