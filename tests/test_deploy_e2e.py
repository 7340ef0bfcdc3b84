"""Deployment end to end: a real SuperLink and 3 SuperNodes on 127.0.0.1, TLS with self-made
certificates, SuperNode authentication with registered key pairs (slow: several minutes).

Every process is started on free ports and stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from clients.request_erasure import main as request_erasure
from simulations.deploy import FEDERATION, Deployment, descendants, make_node_keys
from simulations.run_experiment import free_port

RC = "dataset='digits' service.recovery-rounds=1 round-timeout=300.0"


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(
        str(tmp_path / "deploy"),
        ["site-0", "site-1", "site-2"],
        tls=True,
        auth=True,
        executor="warm",
        poll_interval="0.1",
    )
    try:
        dep.up()
        yield dep
    finally:
        dep.down()


def journal_rows(dep: Deployment) -> list[tuple]:
    db = sqlite3.connect(dep.state_dir / "journal.sqlite")
    try:
        return db.execute(
            "SELECT id, site, state, attempts, served_round FROM requests ORDER BY received_at"
        ).fetchall()
    finally:
        db.close()


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def assert_completed(dep: Deployment, run: int, timeout: float) -> None:
    """Wait for the run; on failure show the ServerApp's log (it runs under the SuperLink) and the run's status."""
    status = dep.wait(run, timeout=timeout)
    if status != "finished:completed":
        app_log = dep.flwr("log", str(run), FEDERATION, "--show", timeout=60).stdout
        link_log = (dep.root / "logs" / "superlink.log").read_text(errors="replace")
        pytest.fail(
            f"run {run}: {status}\n--- flwr log (tail) ---\n{app_log[-6000:]}\n"
            f"--- superlink.log (tail) ---\n{link_log[-2000:]}"
        )


@pytest.mark.e2e
def test_a_deployed_site_asks_to_be_forgotten_over_tls_with_node_authentication(deployment):
    dep = deployment
    assert (
        len(dep.node_ids) == 3
        and json.loads(dep.registry.read_text())["sites"]["site-1"]["node-id"] == dep.node_ids["site-1"]
    )
    with pytest.raises(OSError):  # TLS only: plaintext HTTP to the SuperLink is dropped
        urllib.request.urlopen(f"http://127.0.0.1:{dep.port}/health", timeout=5)
    # a SuperNode whose key was never registered cannot join
    make_node_keys(dep.root / "keys", "intruder")
    dep.sites.append("intruder")
    intruder = subprocess.Popen(
        dep.supernode_cmd("intruder", free_port()), env=dep.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    dep.sites.remove("intruder")
    try:
        assert intruder.wait(timeout=120) != 0
    finally:
        intruder.kill()

    run = dep.submit(dep.service_config(2, RC))
    assert_completed(dep, run, timeout=900)
    # site-0 asks for site-2 (refused); site-1 asks for itself (served)
    request_erasure(["--inbox", str(dep.inbox("site-0")), "--site", "site-2"])
    request_erasure(["--inbox", str(dep.inbox("site-1")), "--site", "site-1", "--reason", "leaving the consortium"])
    run = dep.submit(dep.service_config(5, RC))
    assert_completed(dep, run, timeout=1200)
    rows = journal_rows(dep)
    assert [(site, state, attempts) for _, site, state, attempts, _ in rows] == [("site-1", "verified", 1)]
    summary = json.loads((dep.state_dir / "service.json").read_text())
    assert summary["resumed-from-round"] == 2 and summary["sites"] == {"site-0": 0, "site-1": 1, "site-2": 2}
    assert any("may not request the erasure of site 'site-2'" in r["reason"] for r in summary["refusals"])
    report = json.loads(Path(summary["requests"][0]["report"]).read_text())
    assert (
        report["leakage-audit"]["site-reachable"]
        and report["model-sha256"]["before"] != report["model-sha256"]["after-recovery"]
    )
    served = rows[0][4]
    assert summary["history"][str(served + 1)]["test-acc"] > 0.5
    # the site left: the checkpoint's membership, and its request file was filed as acknowledged
    db = sqlite3.connect(dep.state_dir / "journal.sqlite")
    state = json.loads(db.execute("SELECT state FROM checkpoint").fetchone()[0])
    db.close()
    assert state["departed-sites"] == ["site-1"]
    assert len(list((dep.inbox("site-1") / "acknowledged").glob("*.json"))) == 1
    assert len(list((dep.inbox("site-0") / "refused").glob("*.json"))) == 1


@pytest.mark.e2e
def test_killing_the_server_mid_unlearning_loses_no_request_and_serves_it_once(deployment):
    dep = deployment
    run = dep.submit(dep.service_config(2, RC))
    assert_completed(dep, run, timeout=900)
    request_erasure(["--inbox", str(dep.inbox("site-2")), "--site", "site-2"])
    dep.submit(dep.service_config(5, RC))
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:  # the request is acknowledged and its unlearning round has started
        rows = journal_rows(dep)
        if rows and rows[0][2] == "unlearning" and rows[0][4] is None:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the unlearning round never started: {journal_rows(dep)}")
    server_side = [dep.pids["superlink"], *descendants(dep.pids["superlink"])]
    assert len(server_side) >= 3  # SuperLink, SuperExec, the ServerApp process of the run
    dep.kill("superlink", signal.SIGKILL)  # SuperLink, its SuperExec and the ServerApp process (another session)
    time.sleep(2)
    assert not [p for p in server_side if alive(p)]  # the whole server is gone, as in a crash
    db = sqlite3.connect(dep.state_dir / "journal.sqlite")
    committed = db.execute("SELECT server_round FROM checkpoint").fetchone()[0]
    db.close()
    assert committed == 2 and journal_rows(dep)[0][2] == "unlearning"
    dep.start_superlink()  # same database: the registered nodes reconnect
    run = dep.submit(dep.service_config(5, RC))
    assert_completed(dep, run, timeout=1200)
    (row,) = journal_rows(dep)
    assert row[1:] == ("site-2", "verified", 1, 3)  # served once, in the round that was interrupted
    summary = json.loads((dep.state_dir / "service.json").read_text())
    assert summary["resumed-from-round"] == 2 and summary["re-served-after-restart"] == [row[0]]
    assert set(summary["history"]) == {"3", "4", "5"}  # no round lost beyond the last checkpoint
