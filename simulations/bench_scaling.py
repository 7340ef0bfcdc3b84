"""Benchmark: wall time per round on Flower's Ray simulation engine, 10 -> 100 simulated clients.

    python -m simulations.bench_scaling                       # clients 10 25 50 100 x CPUs per client 1, 2

Each configuration is one ``flwr run`` (through :mod:`simulations.run_experiment`) of a
short experiment on the embedded MNIST-5k: 2 training rounds, one departure (fine-tune),
1 local epoch, no relearn probe. The figure is the median wall time of the federation's
rounds (train + evaluate of every client) from the run's own per-round timings, and
client updates per second. ``client-resources-num-cpus`` sets how many Ray actors run
at once on this machine's cores (``cores / cpus-per-client``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .run_experiment import main as run_one

SETUP = (
    "num-server-rounds=3 unlearn.round=3 local-epochs=1 relearn-max-steps=0 unlearn.method='fine-tune' "
    "unlearn.recovery='fixed'"
)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 25, 50, 100])
    ap.add_argument("--cpus", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--run-config", default="", help="extra overrides")
    args = ap.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores; Ray simulation engine through flwr run; setup: {SETUP} {args.run_config}")
    rows = []
    for cpus in args.cpus:
        for k in args.clients:
            with tempfile.TemporaryDirectory(prefix="fu-scale-") as tmp:
                t0 = time.perf_counter()
                code = run_one(
                    [
                        "--num-clients",
                        str(k),
                        "--cpus-per-client",
                        str(cpus),
                        "--results-dir",
                        tmp,
                        "--run-config",
                        f"{SETUP} {args.run_config}".strip(),
                    ]
                )
                total = time.perf_counter() - t0
                if code != 0:
                    print(f"K={k} cpus={cpus}: run failed (exit {code})", file=sys.stderr)
                    return code
                (res,) = [json.loads(p.read_text()) for p in Path(tmp).glob("*/results.json")]
            per_round = [h["round-seconds"] for h in res["history"].values() if "round-seconds" in h]
            rows.append((cpus, k, statistics.median(per_round), k / statistics.median(per_round), total))
    print(f"\n{'cpus/client':>11s} {'actors':>6s} {'clients':>7s} {'s/round':>8s} {'updates/s':>10s} {'run s':>7s}")
    for cpus, k, sec, ups, total in rows:
        print(f"{cpus:11d} {int(os.cpu_count() // cpus):6d} {k:7d} {sec:8.2f} {ups:10.1f} {total:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
