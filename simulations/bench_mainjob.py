"""Benchmark: the main job against its floors — the bare SGD loop, and the same apps without Ray.

    python -m simulations.bench_mainjob              # the default experiment, four ways (~4 min here)

The default experiment's work, each run in a fresh process with an empty federation cache
(so the gold is trained, as on a fresh machine):

* **bare loop** — plain PyTorch: the same model, the same number of SGD steps on batches of
  the same sizes, the same number of examples evaluated (both counted in one in-process run,
  whose global forward hooks slow it: it is not one of the timed runs),
  on the MNIST-5k images; no Flower, no data pipeline, no clients. This is the compute floor.
* **in-process** — the project's ServerApp and ClientApp on the in-process Grid (no SuperLink,
  no Ray): what the apps themselves cost on top of that compute.
* **Ray** — ``python -m simulations.run_experiment``, the main job exactly as README runs it
  (``flwr run`` on a private simulation SuperLink, Ray actors as clients).
* **Ray floor** — the same launcher, engine and federation (5 SuperNodes, one CPU each)
  running the least a PyTorch federation does (:mod:`simulations.ray_floor_app`: every node
  imports torch and answers one query with one SGD step): Flower's and Ray's fixed cost,
  which no app on this engine avoids.

Printed: each run's wall time, the experiment's own phases (``timings.phases`` of its
``results.json``: discovery, original, deletion request, gold, unlearning + recovery,
measurements, relearn time, report), the Ray job's fixed costs around it (preflight and
SuperLink start; submission, Ray and the ServerApp's start; Flower's end of the run; stopping),
and the ratios: in-process / bare loop (target ≤ 1.3×), Ray / in-process (target ≤ 2×), and the Ray
job against its floor plus the in-process run (what is left to the app on this engine).
Interpreter start and imports are timed apart for the two child runs and excluded from
their ratios (``flwr run`` pays them inside its own processes, so they are in the Ray figure);
``torch._dynamo``, which building a torch optimizer imports, among them (the bare loop builds
its optimizer before its clock starts). The bare loop and the in-process run alternate
``--repeats`` times (fresh processes each), and the ratio is of their medians: on a shared
machine one run of either moves by 20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .run_experiment import PROJECT_ROOT

NUM_CLIENTS = 5


def _count_model_work() -> dict[str, Any]:
    """Global forward hooks on the project's model classes: training batches and evaluated examples."""
    import torch

    counts: dict[str, Any] = {"train-batches": [], "eval-examples": 0, "eval-batches": 0}

    def hook(module: torch.nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        if not type(module).__module__.startswith("fed_unlearn.models") or not args:
            return
        n = int(args[0].shape[0]) if hasattr(args[0], "shape") and args[0].dim() > 0 else 1
        if torch.is_grad_enabled() and module.training:
            counts["train-batches"].append(n)
        else:
            counts["eval-examples"] += n
            counts["eval-batches"] += 1

    torch.nn.modules.module.register_module_forward_hook(hook)
    return counts


def child_inprocess(results_dir: str, count: bool) -> dict[str, Any]:
    """The default experiment on the in-process Grid; with ``count``, its SGD steps and evaluated examples counted.

    Counting takes global forward hooks, which put every module call of the run on torch's slow
    path: a counted run does the work the bare loop repeats, an uncounted one is timed.
    """
    t0 = time.perf_counter()
    import torch  # noqa: F401  (imports timed apart)
    import torch._dynamo  # noqa: F401  (what building an optimizer imports: the bare loop does it before its clock)

    from .inprocess import run_inprocess

    imports = time.perf_counter() - t0
    counts = _count_model_work() if count else {}
    steps: list[int] = []

    def step_hook(_opt: Any, _args: Any, _kwargs: Any) -> None:
        steps.append(1)

    if count:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(step_hook)
    overrides = f"results-dir='{results_dir}' gold-cache-dir='{Path(results_dir) / 'gold-cache'}'"
    t1, c1 = time.perf_counter(), time.process_time()
    run_inprocess(str(PROJECT_ROOT), NUM_CLIENTS, overrides)
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    return {
        "imports-seconds": imports,
        "wall-seconds": wall,
        "cpu-seconds": cpu,
        "sgd-steps": len(steps),
        **{k: counts[k] for k in ("train-batches", "eval-examples", "eval-batches") if k in counts},
        "results": _results(results_dir),
    }


def child_bare(work: dict[str, Any]) -> dict[str, Any]:
    """Plain PyTorch doing the counted work: SGD on batches of the counted sizes, the counted evaluations."""
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from fed_unlearn.config import ExperimentConfig
    from fed_unlearn.data import load_dataset
    from fed_unlearn.models import build_model

    from .inprocess import fused_run_config

    imports = time.perf_counter() - t0
    torch.set_num_threads(1)  # as every client (one CPU per client)
    rc = fused_run_config(str(PROJECT_ROOT), "")
    cfg = ExperimentConfig.from_run_config(rc)
    ds = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    x = torch.from_numpy(np.ascontiguousarray(ds.x, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(ds.y, dtype=np.int64))
    model = build_model(cfg.data.model, ds.input_shape, ds.num_classes, seed=cfg.data.seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    t1, c1 = time.perf_counter(), time.process_time()
    pos, n = 0, len(x)
    model.train()
    for b in work["train-batches"]:
        idx = torch.arange(pos, pos + b) % n
        pos = (pos + b) % n
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    train = time.perf_counter() - t1
    model.eval()
    per = max(1, round(work["eval-examples"] / max(1, work["eval-batches"])))
    left = work["eval-examples"]
    with torch.no_grad():
        while left > 0:
            b = min(per, left, n)
            model(x[pos % n : pos % n + b] if pos % n + b <= n else x[:b])
            pos, left = pos + b, left - b
    return {
        "imports-seconds": imports,
        "wall-seconds": time.perf_counter() - t1,
        "cpu-seconds": time.process_time() - c1,
        "train-seconds": train,
    }


def _results(results_dir: str) -> dict[str, Any]:
    found = sorted(Path(results_dir).glob("*/results.json"))
    if not found:
        raise RuntimeError(f"no results.json under {results_dir}")
    data = json.loads(found[0].read_text())
    return {"timings": data["timings"], "written-at": found[0].stat().st_mtime}


def _python(args: list[str], what: str) -> str:
    """Run ``python args`` in the project; its standard output (its last 4000 characters of output on failure)."""
    out = subprocess.run([sys.executable, *args], cwd=str(PROJECT_ROOT), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out.stdout


def _child(kind: str, arg: str) -> dict[str, Any]:
    out = _python(["-m", "simulations.bench_mainjob", "--child", kind, "--arg", arg], f"the {kind} run")
    return dict(json.loads(out.strip().splitlines()[-1]))


def ray_job(results_dir: str) -> dict[str, Any]:
    """The main job as README runs it, each line of its output timestamped."""
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.run_experiment", "--results-dir", results_dir],
        cwd=str(PROJECT_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marks: dict[str, float] = {}

    def read() -> None:
        for line in proc.stdout or []:
            if line.startswith("$ ") and "flwr" in line and "submitted" not in marks:
                marks.setdefault("flwr-run", time.time())
            elif " submitted" in line:
                marks.setdefault("submitted", time.time())
            elif line.startswith("run ") and ": finished" in line:
                marks.setdefault("finished", time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc = proc.wait()
    end = time.time()
    reader.join(timeout=5)
    if rc != 0:
        raise RuntimeError(f"the Ray job exited with {rc}")
    res = _results(results_dir)
    total = float(res["timings"]["total-seconds"])
    exp_end = float(res["written-at"])
    exp_start = exp_end - total
    flwr_run = marks.get("flwr-run", t0)
    finished = marks.get("finished", end)
    return {
        "wall-seconds": end - t0,
        "fixed": {
            "preflight + SuperLink start": flwr_run - t0,
            "submission, Ray and ServerApp start": exp_start - flwr_run,
            "Flower's run end (ServerApp exit, Ray shutdown)": finished - exp_end,
            "SuperLink stop and exit": end - finished,
        },
        "results": res,
    }


def floor_job(results_dir: str) -> float:
    """Wall seconds of the Ray floor app on the same launcher and federation as the main job."""
    t0 = time.time()
    app = str(Path(__file__).parent / "ray_floor_app")
    _python(
        ["-m", "simulations.run_experiment", "--app", app, "--num-clients", str(NUM_CLIENTS)]
        + ["--results-dir", results_dir, "--run-config", f"num-nodes={NUM_CLIENTS}"],
        "the Ray floor app",
    )
    return time.time() - t0


def _phase_rows(label: str, timings: dict[str, Any]) -> list[str]:
    phases = timings.get("phases", {})
    return [f"  {label:10s} {name:24s} {sec:7.2f} s" for name, sec in phases.items()]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", choices=("inprocess", "inprocess-counted", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--arg", default="", help=argparse.SUPPRESS)
    ap.add_argument("--skip-ray", action="store_true", help="only the bare loop and the in-process run")
    ap.add_argument("--repeats", type=int, default=3, help="alternated bare and in-process runs (median)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.child in ("inprocess", "inprocess-counted"):
        print(json.dumps(child_inprocess(args.arg, count=args.child == "inprocess-counted")))
        return 0
    if args.child == "bare":
        print(json.dumps(child_bare(json.loads(args.arg))))
        return 0

    print(f"machine: {os.cpu_count()} cores; the default experiment ({NUM_CLIENTS} clients), fresh caches")
    inprocs: list[dict[str, Any]] = []
    bares: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fu-mainjob-") as tmp:
        counted = _child("inprocess-counted", str(Path(tmp) / "counted"))
        work = {k: counted[k] for k in ("train-batches", "eval-examples", "eval-batches")}
        for i in range(args.repeats):  # alternated, so that a busy stretch of the machine hits both
            inprocs.append(_child("inprocess", str(Path(tmp) / f"inprocess-{i}")))
            bares.append(_child("bare", json.dumps(work)))
        ray = None if args.skip_ray else ray_job(str(Path(tmp) / "ray"))
        floor = None if args.skip_ray else floor_job(str(Path(tmp) / "floor"))
    inproc = sorted(inprocs, key=lambda r: r["wall-seconds"])[len(inprocs) // 2]
    bare = sorted(bares, key=lambda r: r["wall-seconds"])[len(bares) // 2]
    print(
        f"work counted in-process: {counted['sgd-steps']} SGD steps ({sum(work['train-batches'])} examples), "
        f"{work['eval-examples']} examples evaluated in {work['eval-batches']} batches"
    )
    walls = {k: ", ".join(f"{r['wall-seconds']:.2f}" for r in rs) for k, rs in (("bare", bares), ("in", inprocs))}
    print(f"{'run':12s} {'wall s':>8s} {'imports s':>10s}   (median of {args.repeats}; every run)")
    print(
        f"{'bare loop':12s} {bare['wall-seconds']:8.2f} {bare['imports-seconds']:10.2f}   "
        f"(SGD {bare['train-seconds']:.2f} s; {walls['bare']})"
    )
    print(f"{'in-process':12s} {inproc['wall-seconds']:8.2f} {inproc['imports-seconds']:10.2f}   ({walls['in']})")
    if ray is not None and floor is not None:
        print(f"{'Ray':12s} {ray['wall-seconds']:8.2f} {'(inside)':>10s}")
        print(f"{'Ray floor':12s} {floor:8.2f} {'(inside)':>10s}   (one torch SGD step per node, same engine)")
    print("the experiment's phases:")
    for line in _phase_rows("in-process", inproc["results"]["timings"]):
        print(line)
    if ray is not None:
        for line in _phase_rows("Ray", ray["results"]["timings"]):
            print(line)
        print("the Ray job's fixed costs:")
        for name, sec in ray["fixed"].items():
            print(f"  {name:48s} {sec:7.2f} s")
    ratio = inproc["wall-seconds"] / bare["wall-seconds"]

    def median_cpu(runs: list[dict[str, Any]]) -> float:
        return float(sorted(r["cpu-seconds"] for r in runs)[len(runs) // 2])

    cpu_ratio = median_cpu(inprocs) / median_cpu(bares)
    print(
        f"in-process / bare loop: {ratio:.2f}x wall (target <= 1.3x); {cpu_ratio:.2f}x in CPU seconds "
        f"({median_cpu(inprocs):.2f} / {median_cpu(bares):.2f} s)"
    )
    if ray is not None and floor is not None:
        print(f"Ray / in-process: {ray['wall-seconds'] / inproc['wall-seconds']:.2f}x (target <= 2x)")
        fixed = ray["wall-seconds"] - inproc["wall-seconds"]
        print(
            f"Ray / (Ray floor + in-process): {ray['wall-seconds'] / (floor + inproc['wall-seconds']):.2f}x; "
            f"the Ray job's cost beyond its in-process work {fixed:.1f} s = "
            f"{fixed / floor:.2f}x the floor's {floor:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
