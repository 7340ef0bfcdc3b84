"""Soak and fault benchmark: a deployed erasure service under kill -9 aimed at every window, hostile sites.

    python -m simulations.bench_faults                 # 20 kills, 10 requests
    python -m simulations.bench_faults --kills 6       # a shorter soak

A real deployment on loopback (TLS + SuperNode authentication, 8 sites, the digits MLP):

* site-0's inbox holds garbage from the start (a 5,000-digit number, 100,000-deep nesting,
  invalid UTF-8, a lone surrogate, a folder named like a request, a 200 MiB file, a symbolic
  link to the site's private key); site-3 answers every training round with NaN weights;
  site-4 claims 10^12 training examples;
* sites 1, 2, 5, 6 and 7 each ask to be forgotten twice (10 requests): in phase A between
  runs (so the final model can be compared with an uninterrupted run), in phase B while the
  service runs.

Kills are aimed at every window the journal shows: while a request is being unlearned,
between a recovery round's commit and its certificate (the request is ``recovered``), at a
round's start (the poll), and at random. Phase A kills the server side only (SuperLink,
SuperExec and ServerApp, ``kill -9``) and compares its final model with an uninterrupted run
of the same schedule (the service is deterministic, so a kill must change nothing). Phase B
also kills SuperNodes, drops a site in the middle of a round, and keeps a site **down across
a server restart** (it comes back rounds later). After every restart: the checkpoint never
goes back, every request moves only along the journal's transitions. At the end: requests
lost (filed, never journaled), stuck (journaled, not verified), served twice, certificates
that do not verify against the server's pinned key, inbox files whose contents reached the
server through a link. The exit code is non-zero if any of these is not zero, if a journal
problem was seen, or if phase A's model differs. Figures are printed; nothing is timed by a test.
"""

from __future__ import annotations

import argparse
import json
import os
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

ROUNDS = 16
#: Checkpoint rounds after which the leaving sites file their requests (two each).
SCHEDULE = {2: ("site-1",), 4: ("site-2",), 6: ("site-5",), 8: ("site-6",), 10: ("site-7",)}
RC = "dataset='digits' service.recovery-rounds=1 round-timeout=60.0 local-epochs=1"
SITES = [f"site-{i}" for i in range(8)]
#: Kill windows, in the order each phase aims at them (then again from the start).
WINDOWS_A = ("mid-unlearning", "commit-to-audit", "poll", "random")
WINDOWS_B = ("site-down-across-restart", "mid-unlearning", "supernode", "commit-to-audit", "disconnect", "poll")
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
    (pending / "surrogate.json").write_text('{"id": "' + "b" * 32 + '", "site": "site-0", "reason": "\\ud800"}')
    key = next(inbox.parents[2].glob("keys/site-0*"), None)  # the site's node key: never to be sent
    os.symlink(key or "/proc/self/environ", pending / "key.json")
    old = time.time() - 3600  # long written (a file that does not parse yet is waited for)
    for f in pending.iterdir():
        os.utime(f, (old, old), follow_symlinks=False)
    return 7


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


def in_window(window: str, j: dict[str, Any], starts: int) -> bool:
    """Whether the journal shows ``window`` open now (``starts``: round starts seen before aiming)."""
    if window == "mid-unlearning":
        return unlearning_now(j)
    if window == "commit-to-audit":
        return any(state == "recovered" for _, _, state, _ in j["requests"])
    if window == "poll":
        return j["starts"] > starts
    return False


def wait_window(dep: Deployment, run: int, window: str, until: float) -> str:
    """Wait until ``window`` opens (``"window"``), the run finishes (``"finished"``) or ``until`` passes."""
    checked, starts = 0.0, journal(dep)["starts"]
    while time.monotonic() < until:
        if in_window(window, journal(dep), starts):
            return "window"
        if time.monotonic() - checked > 2.0:
            checked = time.monotonic()
            if dep.status(run).startswith("finished"):
                return "finished"
        time.sleep(0.1)
    return "time"


def crash_server(dep: Deployment) -> None:
    """kill -9 of the SuperLink, its SuperExec and the ServerApp; start the SuperLink again (same database)."""
    dep.kill("superlink", signal.SIGKILL)
    time.sleep(2.0)
    dep.start_superlink()


def file_requests(dep: Deployment, sites: tuple[str, ...], filed: dict[str, str]) -> None:
    """Each of ``sites`` asks to be forgotten twice (the second while the first is open)."""
    from fed_unlearn.erasure import new_request, submit_to_inbox

    for site in sites:
        for n in (1, 2):
            req = new_request(site, f"benchmark request {n}")
            submit_to_inbox(dep.inbox(site), req)
            filed[req.id] = site


def kill(dep: Deployment, what: str, rng: random.Random, rounds: int) -> int | None:
    """Carry out one kill; returns the new run id when the server side was restarted."""
    if what == "supernode":
        site = rng.choice(["site-0", "site-3", "site-4"])
        dep.kill(f"supernode-{site}", signal.SIGKILL)
        time.sleep(1.0)
        dep.restart_supernode(site)
        return None
    if what == "disconnect":  # a site drops out in the middle of a round and comes back later
        dep.kill("supernode-site-0", signal.SIGKILL)
        time.sleep(rng.uniform(20.0, 60.0))
        dep.restart_supernode("site-0")
        return None
    if what == "site-down-across-restart":  # down while the server restarts; back two rounds later
        dep.kill("supernode-site-4", signal.SIGKILL)
        crash_server(dep)
        run = dep.submit(dep.service_config(rounds, RC))
        target = journal(dep)["round"] + 2
        deadline = time.monotonic() + 900
        while journal(dep)["round"] < target and time.monotonic() < deadline:
            time.sleep(1.0)
        dep.restart_supernode("site-4")
        return run
    crash_server(dep)
    return dep.submit(dep.service_config(rounds, RC))


def serve(
    dep: Deployment,
    rounds: int,
    rng: random.Random,
    kills: dict[str, int],
    budget: int,
    windows: tuple[str, ...],
    stats: dict[str, Any],
) -> None:
    """Run the service to ``rounds`` committed rounds, aiming ``budget`` kills at ``windows`` in turn."""
    run = dep.submit(dep.service_config(rounds, RC))
    last = journal(dep)["round"]
    while True:
        j = journal(dep)
        if j["round"] >= rounds and dep.status(run).startswith("finished"):
            return
        spent = sum(kills.values())
        if spent >= budget:
            if wait_window(dep, run, "never", time.monotonic() + 3600) == "finished" and journal(dep)["round"] < rounds:
                run = dep.submit(dep.service_config(rounds, RC))  # e.g. a run that failed after a node kill
            continue
        window = windows[spent % len(windows)]
        aimed = window in ("mid-unlearning", "commit-to-audit", "poll")
        why = wait_window(
            dep, run, window if aimed else "never", time.monotonic() + (300.0 if aimed else rng.uniform(5.0, 40.0))
        )
        if why == "finished":
            if journal(dep)["round"] < rounds:
                run = dep.submit(dep.service_config(rounds, RC))
            continue
        what = window if why == "window" or not aimed else f"random ({window} not seen)"
        on_nodes = window in ("supernode", "disconnect", "site-down-across-restart")
        run = kill(dep, window if on_nodes else "server", rng, rounds) or run
        kills[what] = kills.get(what, 0) + 1
        time.sleep(3.0)
        j = journal(dep)
        stats["problems"] += consistent(j, last)
        last = max(last, j["round"])
        print(f"  kill {sum(kills.values()):2d}: {what:28s} checkpoint round {j['round']}", flush=True)


def serve_schedule(
    dep: Deployment, rng: random.Random, kills: dict[str, int], budget: int, during: bool, stats: dict[str, Any]
) -> dict[str, str]:
    """The whole schedule: requests between runs (``during=False``) or while the service runs; the filed ids."""
    filed: dict[str, str] = {}
    windows = WINDOWS_B if during else WINDOWS_A
    if during:
        pending = dict(SCHEDULE)
        import threading

        stop = threading.Event()

        def filer() -> None:  # files each site's requests once the checkpoint passes its round
            while pending and not stop.is_set():
                rnd = journal(dep)["round"]
                for at in sorted(k for k in pending if k <= rnd):
                    file_requests(dep, pending.pop(at), filed)
                time.sleep(0.5)

        thread = threading.Thread(target=filer, daemon=True)
        thread.start()
        try:
            serve(dep, ROUNDS, rng, kills, budget, windows, stats)
        finally:
            stop.set()
            thread.join()
        return filed
    done = 0
    for at in [*sorted(SCHEDULE), ROUNDS]:
        share = budget * (at - done) // ROUNDS if at < ROUNDS else budget
        serve(dep, at, rng, kills, min(budget, sum(kills.values()) + max(share, 0)), windows, stats)
        if at in SCHEDULE:
            file_requests(dep, SCHEDULE[at], filed)
        done = at
    return filed


def scenario(folder: Path, seed: int, budget: int, during: bool, app: Path) -> dict[str, Any]:
    """One deployment of ``app`` through the whole schedule with ``budget`` kills; its figures."""
    from fed_unlearn.certificate import CertificateError, verify_file

    rng = random.Random(seed)
    dep = Deployment(
        str(folder),
        list(SITES),
        tls=True,
        auth=True,
        node_extra={"site-3": "fault='nan'", "site-4": "fault='huge-claim'"},
        app=str(app),
        executor="warm",
        poll_interval="0.1",
    )
    kills: dict[str, int] = {}
    stats: dict[str, Any] = {"problems": []}
    t0 = time.monotonic()
    try:
        dep.up()
        files = garbage(dep.inbox("site-0"))
        filed = serve_schedule(dep, rng, kills, budget, during, stats)
        j = journal(dep)
    finally:
        dep.down()
    states = {rid: state for rid, _, state, _ in j["requests"]}
    served: dict[str, int] = {}
    for rid, old, new in j["transitions"]:
        if (old, new) == ("unlearning", "unlearning"):  # the unlearning round's model committed: served
            served[rid] = served.get(rid, 0) + 1
    pub = (
        (dep.state_dir / "certificate-key.pub").read_bytes()
        if (dep.state_dir / "certificate-key.pub").is_file()
        else b""
    )
    invalid = []
    for rid in [r for r, st in states.items() if st == "verified"]:
        try:
            verify_file(dep.state_dir / "audit" / f"{rid}.certificate.json", pub, request_id=rid)
        except CertificateError as exc:
            invalid.append(f"{rid[:8]}: {exc}")
    leaked = [p for p in (dep.state_dir / "service.json",) if p.is_file() and "PRIVATE KEY" in p.read_text()]
    return {
        "kills": kills,
        "wall-minutes": (time.monotonic() - t0) / 60,
        "requests-filed": len(filed),
        "requests-verified": sum(1 for r in filed if states.get(r) == "verified"),
        "requests-lost": sum(1 for r in filed if r not in states),
        "requests-stuck": sum(1 for r in filed if r in states and states[r] != "verified"),
        "requests-served-twice": sum(1 for n in served.values() if n > 1),
        "certificates-invalid": invalid,
        "garbage-files": files,
        "refusals": j["refusals"],
        "linked-contents-sent": len(leaked),
        "excluded-sites": j["state"].get("excluded-sites", []),
        "departed-sites": j["state"].get("departed-sites", []),
        "rejected-updates": sum(1 for k, _ in j["events"] if k == "rejected-update"),
        "rounds-lost": j["starts"] - j["round"],
        "final-round": j["round"],
        "final-digest": j["digest"],
        "journal-problems": stats["problems"],
    }


def bad(r: dict[str, Any]) -> list[str]:
    """What must be zero and is not."""
    keys = ("requests-lost", "requests-stuck", "requests-served-twice", "linked-contents-sent")
    out = [f"{k} {r[k]}" for k in keys if r[k]]
    out += [f"invalid certificate {c}" for c in r["certificates-invalid"]]
    out += [f"journal: {p}" for p in r["journal-problems"]]
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (1 when any request is lost, stuck or served twice)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9s in all (half in each phase)")
    ap.add_argument("--dir", default=str(PROJECT_ROOT / "results" / "bench-faults"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    app = faulty_app(root)  # one copy of the code for every phase: their final models must compare
    print("reference: phase A's schedule, no kill", flush=True)
    ref = scenario(root / "reference", args.seed, 0, during=False, app=app)
    print(json.dumps(ref, indent=1), flush=True)
    print(f"phase A: {args.kills // 2} kill -9 of the server side aimed at {', '.join(WINDOWS_A)}", flush=True)
    a = scenario(root / "phase-a", args.seed, args.kills // 2, during=False, app=app)
    print(json.dumps(a, indent=1), flush=True)
    print(f"phase B: {args.kills - args.kills // 2} kills aimed at {', '.join(WINDOWS_B)}; requests filed during runs")
    b = scenario(root / "phase-b", args.seed + 1, args.kills - args.kills // 2, during=True, app=app)
    print(json.dumps(b, indent=1), flush=True)
    total = {k: a["kills"].get(k, 0) + b["kills"].get(k, 0) for k in set(a["kills"]) | set(b["kills"])}
    print("\nsummary")
    print(f"  kills: {sum(total.values())} ({', '.join(f'{k} {v}' for k, v in sorted(total.items()))})")
    for key in ("requests-filed", "requests-verified", "requests-lost", "requests-stuck", "requests-served-twice"):
        print(f"  {key}: phase A {a[key]}, phase B {b[key]}")
    invalid = len(a["certificates-invalid"]) + len(b["certificates-invalid"])
    print(f"  certificates not valid against the pinned key: {invalid}")
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
    problems = bad(ref) + bad(a) + bad(b) + ([] if same else ["phase A's final model differs"])
    for p in problems:
        print(f"  FAILED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
