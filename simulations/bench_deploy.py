"""Where a deployed service round's time goes, with Flower's SuperExec and with the warm one.

    python -m simulations.bench_deploy                 # 3 sites, TLS + node auth, the demo on loopback
    python -m simulations.bench_deploy --configs warm  # one configuration only

Each configuration brings up a real SuperLink and three SuperNodes (TLS, registered keys),
runs :func:`simulations.deploy.demo` (ordinary rounds, a site's erasure request, serving,
recovery, audit) and prints, per configuration, the demo's wall time and the median service
round split into its phases: the sites' erasure polls (``query.erasure``, with the serving
decision), training (``train`` messages and aggregation) and evaluation — each a Flower
round trip whose ClientApp processes start per message. It also measures what a fresh
``flwr-clientapp`` process pays before it can run a task (importing torch and the ClientApp's
libraries) against a ``fork()`` of a parent that imported them once.

Configurations:

* ``flower``: Flower's subprocess isolation as shipped (SuperExec polls every 1 s, a fresh
  process per message);
* ``flower-poll``: the same with ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1``;
* ``warm``: :mod:`fed_unlearn.flower.warm_superexec` (tasks forked from a warm parent) with
  the 0.1 s poll.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .deploy import Deployment, demo

CONFIGS = {"flower": ("subprocess", ""), "flower-poll": ("subprocess", "0.1"), "warm": ("warm", "0.1")}
PHASES = ("before-round-seconds", "train-wall-seconds", "evaluate-wall-seconds", "round-seconds")


def process_start_seconds(repeats: int = 3) -> dict[str, float]:
    """Median seconds of a fresh interpreter importing the ClientApp's libraries, and of a fork."""
    libs = "import torch, numpy, scipy.special, scipy.stats, sklearn.metrics, flwr.clientapp"
    fresh = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", libs], check=True)
        fresh.append(time.perf_counter() - t0)
    forked = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{libs}\nimport os, time\nts = []\nfor _ in range({repeats}):\n t0 = time.perf_counter()\n"
            " pid = os.fork()\n if pid == 0: os._exit(0)\n os.waitpid(pid, 0)\n ts.append(time.perf_counter() - t0)\n"
            "print(sorted(ts)[len(ts) // 2])",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return {"fresh-process-import": statistics.median(fresh), "fork": float(forked.stdout.strip())}


def run_config(name: str, folder: Path, rounds: int, run_config: str) -> dict[str, float]:
    """The demo on one configuration: wall time and the median service round's phases."""
    executor, poll = CONFIGS[name]
    dep = Deployment(str(folder / name), ["site-0", "site-1", "site-2"], executor=executor, poll_interval=poll)
    t0 = time.perf_counter()
    try:
        dep.up()
        t_up = time.perf_counter()
        code = demo(dep, rounds, run_config)
        t_end = time.perf_counter()
    finally:
        dep.down()
    if code != 0:
        raise RuntimeError(f"the demo failed on configuration {name}; logs in {dep.root / 'logs'}")
    history = json.loads((dep.state_dir / "service.json").read_text())["history"]
    out = {"demo-seconds": t_end - t0, "up-seconds": t_up - t0, "rounds": float(len(history))}
    for key in PHASES:
        values = [h[key] for h in history.values() if key in h]
        out[key] = statistics.median(values) if values else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--run-config", default="dataset='digits'")
    args = ap.parse_args(argv)
    start = process_start_seconds()
    print(
        f"a ClientApp task's start: fresh process importing its libraries {start['fresh-process-import']:.2f} s, "
        f"fork of a warm parent {start['fork'] * 1000:.1f} ms",
        flush=True,
    )
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fu-bench-deploy-") as tmp:
        for name in args.configs:
            print(f"--- {name} ---", flush=True)
            rows[name] = run_config(name, Path(tmp), args.rounds, args.run_config)
    print("\n| configuration | demo (s) | start-up (s) | service round (s, median) | poll | train | evaluate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['demo-seconds']:.0f} | {r['up-seconds']:.0f} | {r['round-seconds']:.1f} | "
            f"{r['before-round-seconds']:.1f} | {r['train-wall-seconds']:.1f} | {r['evaluate-wall-seconds']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
