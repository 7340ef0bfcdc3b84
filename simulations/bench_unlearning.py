"""Benchmark: what unlearning costs against retraining the gold, on full Fashion-MNIST.

    python -m simulations.bench_unlearning                 # PUF, SRAGU, fine-tune vs gold (~1 h here)
    python -m simulations.bench_unlearning --dataset mnist-5k --model mlp --num-clients 5 --rounds-before 5

The realistic setting: the 70,000 Fashion-MNIST images from Debian's
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, read with the project's
IDX loader), the small CNN, 10 clients with Dirichlet label skew (alpha 0.5), one local
epoch per round, client 0 leaves after ``--rounds-before`` rounds; every method through
``flwr run`` on the Ray engine, same seeds, one gold federation shared through the cache.

Printed per method, from the runs' own reports: test accuracy, forget accuracy,
loss-threshold MIA AUC and KL(gold || model) on the forget set next to the gold's;
client-compute of unlearning + recovery (optimizer steps summed over clients, and client
seconds) and wall time, as fractions of the gold's retraining; recovery rounds until the
test accuracy is within 1 point of the gold's; and the targets: <= 10 % of the gold's
client-compute, within 1 point of its test accuracy and 0.02 of its MIA AUC.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .harness import run_cell
from .run_experiment import PROJECT_ROOT


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["puf", "sragu", "fine-tune"])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--num-clients", type=int, default=10)
    ap.add_argument(
        "--rounds-before", type=int, default=20, help="rounds of training before the request (the gold's length)"
    )
    ap.add_argument("--max-recovery", type=int, default=10, help="recovery rounds at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=("ray", "inprocess"), default="ray")
    ap.add_argument("--run-config", default="partitioner='dirichlet' dirichlet-alpha=0.5 local-epochs=1")
    ap.add_argument("--results-dir", default=str(PROJECT_ROOT / "results" / "bench-unlearning"))
    args = ap.parse_args(argv)
    if (
        args.dataset == "fashion-mnist"
        and not Path("/usr/share/datasets/fashion-mnist").is_dir()
        and "data-dir" not in args.run_config
    ):
        print(
            "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (or pass data-dir=...)",
            file=sys.stderr,
        )
        return 2
    root = Path(args.results_dir).resolve()
    d = args.rounds_before + 1
    base = (
        f"dataset='{args.dataset}' model='{args.model}' seed={args.seed} unlearn.round={d} "
        f"num-server-rounds={d + args.max_recovery} unlearn.recovery-tolerance=0.01 "
        f"gold-cache-dir='{root / 'gold-cache'}' {args.run_config}"
    )
    results = {}
    for method in args.methods:
        out = root / method
        found = sorted(out.glob("*/results.json"))
        if not found:
            code = run_cell(args.engine, out, args.num_clients, f"{base} unlearn.method='{method}'")
            if code != 0:
                return code
            found = sorted(out.glob("*/results.json"))
        results[method] = json.loads(found[0].read_text())
    import torch

    first = next(iter(results.values()))
    gold = first["report"]["gold"]
    gcost = first["client-compute"]["gold"]
    gwall = first["timings"]["gold-wall-seconds"]
    print(
        f"\nmachine: {os.cpu_count()} cores, torch {torch.__version__}; engine {args.engine}; "
        f"{args.dataset}, {args.model}, "
        f"{args.num_clients} clients, {args.run_config}; client 0 leaves after {args.rounds_before} rounds"
    )
    print(
        f"gold: test {gold['test-acc']:.4f}, forget {gold['forget-acc']:.4f}, MIA {gold['mia-auc']:.4f}; retraining "
        f"{gcost['train-steps']:.0f} client steps, {gcost['train-seconds']:.0f} client-s, {gwall:.0f} s wall\n"
    )
    head = (
        "| method | test acc | forget acc | MIA AUC | KL forget | steps (frac. of gold) | client-s (frac.) "
        "| wall s (frac.) "
        "| recovery rounds | <= 10 % compute | test within 1 pt | MIA within 0.02 |"
    )
    lines = [head, "|---|" + "---:|" * 11]
    for m, r in results.items():
        u, cost = r["report"]["unlearned"], r["client-compute"]["unlearning+recovery"]
        frac = cost["train-steps"] / gcost["train-steps"]
        wall = r["timings"].get("unlearning+recovery-wall-seconds", float("nan"))
        ok = (frac <= 0.10, abs(u["test-acc"] - gold["test-acc"]) <= 0.01, abs(u["mia-auc"] - gold["mia-auc"]) <= 0.02)
        rec = r["recovery"]["rounds-to-gold"]
        lines.append(
            f"| {m} | {u['test-acc']:.4f} | {u['forget-acc']:.4f} | {u['mia-auc']:.4f} | {u['kl-forget']:.4f} | "
            f"{cost['train-steps']:.0f} ({frac:.3f}) | "
            f"{cost['train-seconds']:.0f} ({cost['train-seconds'] / gcost['train-seconds']:.3f}) | "
            f"{wall:.0f} ({wall / gwall:.3f}) | {'–' if rec is None else rec} | "
            + " | ".join("yes" if x else "**no**" for x in ok)
            + " |"
        )
    o = first["report"]["original"]
    lines.append(
        f"| original | {o['test-acc']:.4f} | {o['forget-acc']:.4f} | {o['mia-auc']:.4f} | {o['kl-forget']:.4f} | "
        "– | – | – | – | – | – | – |"
    )
    lines.append(
        f"| gold | {gold['test-acc']:.4f} | {gold['forget-acc']:.4f} | {gold['mia-auc']:.4f} | 0 | "
        f"{gcost['train-steps']:.0f} (1) | "
        f"{gcost['train-seconds']:.0f} (1) | {gwall:.0f} (1) | – | – | – | – |"
    )
    table = "\n".join(lines)
    print(table)
    (root / "bench-unlearning.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
