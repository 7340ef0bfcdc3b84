"""Soak and fault benchmark: a deployed erasure service under kill -9, garbage input and hostile sites.

    python -m simulations.bench_faults                 # 20 kills (about an hour on 2 cores)
    python -m simulations.bench_faults --kills 4       # a shorter soak

A real deployment on loopback (TLS + SuperNode authentication, 5 sites, the digits MLP):

* site-0's inbox holds garbage from the start (a 5,000-digit number, 100,000-deep nesting,
  invalid UTF-8, a folder named like a request, a 200 MiB file); site-3 answers every
  training round with NaN weights; site-4 claims 10^12 training examples;
* site-1 asks to be forgotten before round 1, site-2 after round 6.

Phase A kills the server side (SuperLink, SuperExec and the ServerApp process: ``kill -9``)
at random moments, including once while a request is being unlearned, restarting it each
time; its final model is compared with an uninterrupted run of the same schedule (the
service is deterministic, so a kill must change nothing). Phase B kills SuperNodes and the
server at random and disconnects a site in the middle of a round; its model is not
comparable, its journal is checked. After every restart: the checkpoint never goes back,
every request moves only along the journal's transitions. At the end: requests lost,
requests served twice, rounds lost (started but not committed), and the final model hash.
Figures are printed; nothing is timed by a test.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from .deploy import Deployment
from .run_experiment import PROJECT_ROOT

ROUNDS_A, ROUNDS = 6, 12
RC = "dataset='digits' service.recovery-rounds=1 round-timeout=60.0 local-epochs=1"
SITES = [f"site-{i}" for i in range(5)]
FAULTY_CLIENT = '''"""The project's ClientApp with a fault injected by node config (benchmark only)."""

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.client_app import data_fn, model_fn
from fed_unlearn.flower import add_unlearning


def corrupt(msg, context, call_next):
    reply = call_next(msg, context)
    fault = str(context.node_config.get("fault", ""))
    if not fault or not msg.metadata.message_type.startswith("train") or not reply.has_content():
        return reply
    records = {}
    for key, rec in reply.content.array_records.items():
        if fault == "nan":
            rec = ArrayRecord({k: Array(np.full_like(v.numpy(), np.nan)) for k, v in rec.items()})
        records[key] = rec
    for key, rec in reply.content.metric_records.items():
        records[key] = MetricRecord({**dict(rec), **({"num-examples": 10**12} if fault == "huge-claim" else {})})
    return Message(RecordDict(records), reply_to=msg)


app = ClientApp(mods=[corrupt])
add_unlearning(app, model_fn=model_fn, data_fn=data_fn, default_handlers=True)
'''


def faulty_app(folder: Path) -> Path:
    """A copy of this repository's app whose ClientApp injects the node-configured faults."""
    app = folder / "app"
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    for name in ("fed_unlearn", "server", "clients"):
        shutil.copytree(PROJECT_ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "faulty_client.py").write_text(FAULTY_CLIENT)
    text = (PROJECT_ROOT / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        text.replace('clientapp = "clients.client_app:app"', 'clientapp = "faulty_client:app"')
    )
    return app


def garbage(inbox: Path) -> int:
    """Files a clumsy or hostile site could leave in its inbox; returns how many."""
    pending = inbox / "pending"
    pending.mkdir(parents=True, exist_ok=True)
    huge = "9" * 5000
    (pending / "huge-number.json").write_text(f'{{"id": "{"a" * 32}", "site": "site-0", "created": {huge}}}')
    (pending / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (pending / "not-utf8.json").write_bytes(b'{"id": "\\xff\\xfe"}')
    (pending / "folder.json").mkdir(exist_ok=True)
    with open(pending / "huge-file.json", "wb") as fh:
        fh.truncate(200 * 2**20)
    return 5


def journal(dep: Deployment) -> dict[str, Any]:
    """What the journal says now (read-only)."""
    empty: dict[str, Any] = {
        "round": 0,
        "digest": "",
        "state": {},
        "requests": [],
        "transitions": [],
        "starts": 0,
        "refusals": 0,
        "events": [],
    }
    try:
        db = sqlite3.connect(f"file:{dep.state_dir / 'journal.sqlite'}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:  # the service has not created it yet
        return empty
    try:
        ck = db.execute("SELECT server_round, digest, state FROM checkpoint").fetchone()
        reqs = db.execute("SELECT id, site, state, served_round FROM requests").fetchall()
        trans = db.execute("SELECT request_id, old, new FROM transitions ORDER BY rowid").fetchall()
        starts = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'round-start'").fetchone()[0]
        refusals = db.execute("SELECT COUNT(*) FROM refusals").fetchone()[0]
        events = db.execute("SELECT kind, source FROM events WHERE kind != 'round-start'").fetchall()
    except sqlite3.OperationalError:
        return empty
    finally:
        db.close()
    return {
        "round": ck[0] if ck else 0,
        "digest": ck[1] if ck else "",
        "state": json.loads(ck[2]) if ck else {},
        "requests": reqs,
        "transitions": trans,
        "starts": starts,
        "refusals": refusals,
        "events": events,
    }


def consistent(j: dict[str, Any], last_round: int) -> list[str]:
    """Problems with the journal after a restart (empty = consistent)."""
    from fed_unlearn.journal import TRANSITIONS

    out = []
    if j["round"] < last_round:
        out.append(f"checkpoint went back from round {last_round} to {j['round']}")
    for rid, old, new in j["transitions"]:
        if old is not None and old != new and (old, new) not in TRANSITIONS:  # old == new: a round committed
            out.append(f"request {rid[:8]}: illegal transition {old} -> {new}")
    for rid, _, state, served in j["requests"]:
        if state in ("recovered", "verified") and (served is None or served > j["round"]):
            out.append(f"request {rid[:8]} is {state} but its unlearning round {served} is not committed")
    return out


def unlearning_now(j: dict[str, Any]) -> bool:
    """Whether a request's unlearning round has started and is not committed yet."""
    return any(state == "unlearning" and served is None for _, _, state, served in j["requests"])


def wait_round(dep: Deployment, run: int, until: float, on_unlearning: bool = False) -> str:
    """Wait until the run finishes, ``until`` passes, or (``on_unlearning``) an unlearning round starts; returns why."""
    checked = 0.0
    while time.monotonic() < until:
        if on_unlearning and unlearning_now(journal(dep)):
            return "unlearning"
        if time.monotonic() - checked > 2.0:
            checked = time.monotonic()
            if dep.status(run).startswith("finished"):
                return "finished"
        time.sleep(0.2)
    return "time"


def crash_server(dep: Deployment) -> None:
    """kill -9 of the SuperLink, its SuperExec and the ServerApp; start the SuperLink again (same database)."""
    dep.kill("superlink", signal.SIGKILL)
    time.sleep(2.0)
    dep.start_superlink()


def serve(
    dep: Deployment,
    rounds: int,
    rng: random.Random,
    kills: dict[str, int],
    budget: int,
    mixed: bool,
    unlearning_kill: bool,
    stats: dict[str, Any],
) -> None:
    """Run the service to ``rounds`` committed rounds, killing things until ``budget`` kills are spent."""
    run = dep.submit(dep.service_config(rounds, RC))
    last = journal(dep)["round"]
    while True:
        j = journal(dep)
        if j["round"] >= rounds and dep.status(run).startswith("finished"):
            return
        spent = sum(kills.values())
        if spent >= budget:
            if wait_round(dep, run, time.monotonic() + 3600) == "finished" and journal(dep)["round"] < rounds:
                run = dep.submit(dep.service_config(rounds, RC))  # e.g. a run that failed after a node kill
            continue
        hunt = unlearning_kill and not kills.get("mid-unlearning")
        why = wait_round(dep, run, time.monotonic() + (600.0 if hunt else rng.uniform(5.0, 40.0)), on_unlearning=hunt)
        if why == "finished":
            if journal(dep)["round"] < rounds:
                run = dep.submit(dep.service_config(rounds, RC))
            continue
        what = (
            "mid-unlearning"
            if why == "unlearning"
            else (rng.choice(["server", "supernode", "disconnect"]) if mixed else "server")
        )
        if what in ("server", "mid-unlearning"):
            crash_server(dep)
            run = dep.submit(dep.service_config(rounds, RC))
        elif what == "supernode":
            site = rng.choice([s for s in SITES if s != "site-1"])
            dep.kill(f"supernode-{site}", signal.SIGKILL)
            time.sleep(1.0)
            dep.restart_supernode(site)
        else:  # a site drops out in the middle of a round and comes back later
            site = rng.choice(["site-0", "site-2"])
            dep.kill(f"supernode-{site}", signal.SIGKILL)
            time.sleep(rng.uniform(20.0, 60.0))
            dep.restart_supernode(site)
        kills[what] = kills.get(what, 0) + 1
        time.sleep(3.0)
        j = journal(dep)
        stats["problems"] += consistent(j, last)
        last = max(last, j["round"])
        print(f"  kill {sum(kills.values()):2d}: {what:15s} checkpoint round {j['round']}", flush=True)


def scenario(folder: Path, seed: int, budget: int, mixed: bool, app: Path) -> dict[str, Any]:
    """One deployment of ``app`` through the whole schedule with ``budget`` kills; its figures."""
    rng = random.Random(seed)
    dep = Deployment(
        str(folder),
        list(SITES),
        tls=True,
        auth=True,
        node_extra={"site-3": "fault='nan'", "site-4": "fault='huge-claim'"},
        app=str(app),
    )
    kills: dict[str, int] = {}
    stats: dict[str, Any] = {"problems": []}
    t0 = time.monotonic()
    try:
        dep.up()
        files = garbage(dep.inbox("site-0"))
        from clients.request_erasure import main as request

        request(["--inbox", str(dep.inbox("site-1")), "--site", "site-1", "--reason", "before round 1"])
        serve(dep, ROUNDS_A, rng, kills, budget // 2, mixed, unlearning_kill=True, stats=stats)
        request(["--inbox", str(dep.inbox("site-2")), "--site", "site-2", "--reason", "after round 6"])
        serve(dep, ROUNDS, rng, kills, budget, mixed, unlearning_kill=False, stats=stats)
        j = journal(dep)
    finally:
        dep.down()
    verified = [r for r in j["requests"] if r[2] == "verified"]
    served: dict[str, int] = {}
    for rid, old, new in j["transitions"]:
        if (old, new) == ("unlearning", "unlearning"):  # the unlearning round's model committed: served
            served[rid] = served.get(rid, 0) + 1
    return {
        "kills": kills,
        "wall-minutes": (time.monotonic() - t0) / 60,
        "requests-written": 2,
        "requests-verified": len(verified),
        "requests-lost": 2 - len({r[1] for r in verified} & {"site-1", "site-2"}),
        "requests-served-twice": sum(1 for n in served.values() if n > 1),
        "garbage-files": files,
        "refusals": j["refusals"],
        "excluded-sites": j["state"].get("excluded-sites", []),
        "rejected-updates": sum(1 for k, _ in j["events"] if k == "rejected-update"),
        "rounds-lost": j["starts"] - j["round"],
        "final-round": j["round"],
        "final-digest": j["digest"],
        "journal-problems": stats["problems"],
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9s in all (half in each phase)")
    ap.add_argument("--dir", default=str(PROJECT_ROOT / "results" / "bench-faults"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    app = faulty_app(root)  # one copy of the code for every phase: their final models must compare
    print("reference: the same schedule, no kill", flush=True)
    ref = scenario(root / "reference", args.seed, 0, mixed=False, app=app)
    print(json.dumps(ref, indent=1), flush=True)
    print(f"phase A: {args.kills // 2} kill -9 of the server side", flush=True)
    a = scenario(root / "phase-a", args.seed, args.kills // 2, mixed=False, app=app)
    print(json.dumps(a, indent=1), flush=True)
    print(
        f"phase B: {args.kills - args.kills // 2} kill -9 of SuperNodes and the server, a site dropping mid-round",
        flush=True,
    )
    b = scenario(root / "phase-b", args.seed + 1, args.kills - args.kills // 2, mixed=True, app=app)
    print(json.dumps(b, indent=1), flush=True)
    total = {k: a["kills"].get(k, 0) + b["kills"].get(k, 0) for k in set(a["kills"]) | set(b["kills"])}
    print("\nsummary")
    print(f"  kills: {sum(total.values())} ({', '.join(f'{k} {v}' for k, v in sorted(total.items()))})")
    print(
        f"  requests lost: {a['requests-lost'] + b['requests-lost']}, served twice: "
        f"{a['requests-served-twice'] + b['requests-served-twice']}"
    )
    print(f"  rounds lost (started, not committed): phase A {a['rounds-lost']}, phase B {b['rounds-lost']}")
    print(f"  journal problems after restarts: {len(a['journal-problems']) + len(b['journal-problems'])}")
    print(
        f"  garbage inbox files refused: {a['refusals']} / {a['garbage-files']}; NaN site excluded: "
        f"{'site-3' in a['excluded-sites']}; rejected updates: {a['rejected-updates']}"
    )
    same = a["final-digest"] == ref["final-digest"]
    print(
        f"  phase A final model = uninterrupted run's: {same} ({a['final-digest'][:12]} vs {ref['final-digest'][:12]})"
    )
    print(
        f"  wall time: reference {ref['wall-minutes']:.1f} min, A {a['wall-minutes']:.1f} min, "
        f"B {b['wall-minutes']:.1f} min"
    )
    return 0 if same and not a["journal-problems"] and not b["journal-problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
