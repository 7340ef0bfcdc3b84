"""Deployed service rounds against stock Flower on the same deployment, with Flower's SuperExec and the warm one.

    python -m simulations.bench_deploy                 # 3 sites, TLS + node auth, on loopback (~45 min here)
    python -m simulations.bench_deploy --configs warm  # one configuration only (~8 min)

Each configuration brings up a real SuperLink and three SuperNodes (TLS, registered keys)
and runs, alternated on that one deployment: a plain Flower app (:mod:`simulations.stock_app`:
stock ``FedAvg`` and Flower's own round loop driving this repository's ClientApp, same model
and data), the floor of a round (:mod:`simulations.stock_app`'s ``floor``: rounds of the same two
exchanges whose tasks only answer ``query.identify``: Flower's messaging, no training or
evaluation), the erasure service's ordinary rounds, the plain app again, then a service run
during which a site files an erasure request (after the run's first round), which it serves,
recovers and audits. Printed per configuration: the median ordinary round of the plain app and
of the service (three sites each; every run's first round, which loads the app, left out), the
serving round, their ratios to the plain app's round and to the floor's, and the phases of the service's rounds
— the erasure poll answered before the round (``query.erasure``, pushed ahead), training (with,
in the serving round, the unlearning step and its calibration query), evaluation. It also
measures what a fresh ``flwr-clientapp`` process pays before it can run a task (importing
torch and the ClientApp's libraries) against a ``fork()`` of a parent that imported them once.

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_faults import journal
from .deploy import Deployment
from .run_experiment import PROJECT_ROOT

CONFIGS = {"flower": ("subprocess", ""), "flower-poll": ("subprocess", "0.1"), "warm": ("warm", "0.1")}
PHASES = (
    "before-round-seconds",
    "train-wall-seconds",
    "aggregate-train-seconds",
    "evaluate-wall-seconds",
    "round-seconds",
)


def process_start_seconds(repeats: int = 3) -> dict[str, float]:
    """Median seconds of a fresh interpreter importing the ClientApp's libraries, and of a fork."""
    # what a task of this repository's ClientApp imports (torch._dynamo: its first optimizer)
    libs = "import torch, torch._dynamo, numpy, scipy.special, flwr.clientapp"
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


def stock_app_dir(folder: Path, serverapp: str = "app") -> Path:
    """A copy of this repository whose ServerApp is :mod:`simulations.stock_app`'s ``serverapp`` (``app``: the
    plain Flower app; ``floor``: rounds of tasks that do nothing)."""
    out = folder / f"stock-{serverapp}"
    shutil.copytree(
        PROJECT_ROOT,
        out,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "results", ".flwr", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )
    pyproject = out / "pyproject.toml"
    text = pyproject.read_text()
    old = 'serverapp = "server.server_app:app"'
    if old not in text:
        raise RuntimeError(f"{pyproject}: no {old!r} to replace")
    pyproject.write_text(text.replace(old, f'serverapp = "simulations.stock_app:{serverapp}"'))
    return out


def _finished(dep: Deployment, run_id: int, what: str) -> None:
    status = dep.wait(run_id)
    if status != "finished:completed":
        raise RuntimeError(f"{what}: run {run_id} {status}; logs in {dep.root / 'logs'}")


def _committed(dep: Deployment, server_round: int, timeout: float = 900.0) -> None:
    """Wait until the service has committed ``server_round`` (its journal read beside the running service)."""
    deadline = time.monotonic() + timeout
    while journal(dep)["round"] < server_round:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not commit round {server_round} within {timeout:.0f} s")
        time.sleep(0.5)


def _later_rounds(times: dict[str, float]) -> list[float]:
    """A run's round times without its first round (which loads the app in every process)."""
    ordered = [times[r] for r in sorted(times, key=int)]
    return ordered[1:] if len(ordered) > 1 else ordered


def run_config(
    name: str, folder: Path, rounds: int, run_config: str, stock_app: Path, floor_app: Path
) -> dict[str, Any]:
    """Plain Flower vs the service on one configuration: round times and the service round's phases."""
    from clients.request_erasure import main as request

    executor, poll = CONFIGS[name]
    dep = Deployment(str(folder / name), ["site-0", "site-1", "site-2"], executor=executor, poll_interval=poll)
    first = max(2, rounds // 2)
    stock: list[float] = []
    floor: list[float] = []
    apps = {"stock": (stock_app, stock), "floor": (floor_app, floor)}  # its app, its round times

    def plain(tag: str, kind: str = "stock") -> None:
        """A run of the plain Flower app (``stock``) or the round floor (``floor``); its later rounds' times."""
        app, times = apps[kind]
        out = folder / name / f"{kind}-{tag}"
        dep.app = str(app)
        try:
            rc = f"{run_config} num-server-rounds={first} results-dir='{out}' node-wait-seconds=60.0"
            _finished(dep, dep.submit(rc), f"the {kind} app")
        finally:
            dep.app = ""
        times.extend(_later_rounds(json.loads((out / f"{kind}-rounds.json").read_text())))

    t0 = time.perf_counter()
    try:
        dep.up()
        t_up = time.perf_counter()
        plain("before")
        plain("before", "floor")
        _finished(dep, dep.submit(dep.checked(dep.service_config(first, run_config))), "the service's ordinary rounds")
        ordinary_history = json.loads((dep.state_dir / "service.json").read_text())["history"]
        plain("after")
        t_serve = time.perf_counter()
        # the request arrives while the service runs (as it would in production): served mid-run,
        # not in a run's first round (which loads the app everywhere and polls synchronously)
        run_id = dep.submit(dep.service_config(first + rounds, run_config))
        _committed(dep, first + 1)
        request(["--inbox", str(dep.inbox(dep.sites[1])), "--site", dep.sites[1], "--reason", "benchmark"])
        _finished(dep, run_id, "the service run that serves")
        t_end = time.perf_counter()
    finally:
        dep.down()
    served = json.loads((dep.state_dir / "service.json").read_text())
    serving_round = next(int(r["served_round"]) for r in served["requests"] if r.get("served_round") is not None)
    if serving_round <= first + 1:
        raise RuntimeError(f"the request was served in round {serving_round}, not mid-run")
    ordinary = {r: h["round-seconds"] for r, h in ordinary_history.items()}
    out: dict[str, Any] = {
        "up-seconds": t_up - t0,
        "serve-run-seconds": t_end - t_serve,
        "stock-round": statistics.median(stock),
        "stock-rounds": stock,
        "floor-round": statistics.median(floor),
        "service-round": statistics.median(_later_rounds(ordinary)),
        "serving-round": float(served["history"][str(serving_round)]["round-seconds"]),
        "serving-phases": {k: float(served["history"][str(serving_round)].get(k, float("nan"))) for k in PHASES},
    }
    for key in PHASES:
        values = [h[key] for h in list(ordinary_history.values())[1:] if key in h]
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
        app, floor_app = stock_app_dir(Path(tmp)), stock_app_dir(Path(tmp), "floor")
        for name in args.configs:
            print(f"--- {name} ---", flush=True)
            rows[name] = run_config(name, Path(tmp), args.rounds, args.run_config, app, floor_app)
    print(
        "\n| configuration | plain Flower round (s) | service round (s) | ratio (target <= 1.1) | serving round (s) "
        "| ratio (target <= 1.5) | poll | train | evaluate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['stock-round']:.1f} | {r['service-round']:.1f} | "
            f"{r['service-round'] / r['stock-round']:.2f} "
            f"| {r['serving-round']:.1f} | {r['serving-round'] / r['stock-round']:.2f} | "
            f"{r['before-round-seconds']:.1f} | {r['train-wall-seconds']:.1f} | {r['evaluate-wall-seconds']:.1f} |"
        )
    print("(the service's phases: median of its ordinary rounds; every run's first round left out)")
    print(
        "\n| configuration | round floor (s): two exchanges of tasks that do nothing | plain Flower round / floor "
        "| service round / floor (target <= 1.3) | serving round / floor |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        f = r["floor-round"]
        print(
            f"| {name} | {f:.1f} | {r['stock-round'] / f:.2f} | {r['service-round'] / f:.2f} "
            f"| {r['serving-round'] / f:.2f} |"
        )
    for name, r in rows.items():
        ph = r["serving-phases"]
        print(
            f"{name}: the serving round's phases: poll {ph['before-round-seconds']:.1f} s, train (with the "
            f"unlearning step and its calibration) {ph['train-wall-seconds']:.1f} s, of which the aggregation "
            f"(the calibration's exchanges) {ph['aggregate-train-seconds']:.1f} s; "
            f"evaluate {ph['evaluate-wall-seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
