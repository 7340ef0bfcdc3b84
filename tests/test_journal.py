"""The erasure journal, request format, inbox and site registry (pure Python, no Flower)."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fed_unlearn.erasure import (
    RequestError,
    SiteRegistry,
    acknowledge_in_inbox,
    new_request,
    parse_request,
    pending_in_inbox,
    submit_to_inbox,
)
from fed_unlearn.journal import Journal, JournalError, weights_digest

TIER = "unit"  # see tests/conftest.py

W = {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.float32)}


def test_request_lifecycle_and_transitions(tmp_path):
    with Journal(tmp_path / "j.sqlite") as j:
        assert j.add("r1", "h1", "site:h1", 3, "why") is True
        assert j.add("r1", "h1", "site:h1", 4) is False  # a resend is recognised
        j.start_unlearning(["r1"], 5, "puf", {"r1": {"before": {"mia-auc": 0.6}}})
        with pytest.raises(JournalError, match="not a valid transition"):
            j.set_verified("r1", "x")
        j.commit_round(5, W, {"departed-sites": ["h1"]}, served=["r1"])
        j.commit_round(6, W, {"departed-sites": ["h1"]}, recovered=["r1"])
        j.set_verified("r1", "audit/r1.json", 6)
        r = j.get("r1")
        assert (r.state, r.attempts, r.unlearning_round, r.served_round, r.recovered_round) == ("verified", 1, 5, 5, 6)
        assert r.details["before"]["mia-auc"] == 0.6 and r.report == "audit/r1.json"
        assert [h["new"] for h in j.history("r1")] == ["pending", "unlearning", "unlearning", "recovered", "verified"]
        with pytest.raises(JournalError):
            j.add("", "h1", "x", 0)
        with pytest.raises(JournalError, match="no request"):
            j.get("nope")


def test_checkpoint_and_request_transitions_commit_together(tmp_path):
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        j.add("r1", "h1", "operator", 0)
        j.start_unlearning(["r1"], 2, "puf")
        # a transition that fails inside the round's transaction rolls the checkpoint back too
        with pytest.raises(JournalError):
            j.commit_round(2, W, {"x": 1}, served=["r1"], recovered=["ghost"])
        assert j.checkpoint() is None and j.get("r1").served_round is None
        digest = j.commit_round(2, W, {"x": 1}, served=["r1"])
    with Journal(path) as j:  # reopened: on disk
        ck = j.checkpoint()
        assert ck.server_round == 2 and ck.state == {"x": 1} and ck.digest == digest == weights_digest(W)
        np.testing.assert_array_equal(ck.weights["a"], W["a"])
        assert j.reconcile() == []  # its unlearning round was committed: nothing to redo


def test_reconcile_sends_uncommitted_unlearning_back_to_pending(tmp_path):
    with Journal(tmp_path / "j.sqlite") as j:
        j.add("r1", "h1", "site:h1", 0)
        j.start_unlearning(["r1"], 4, "puf")  # ... and the server died before committing round 4
        assert j.reconcile() == ["r1"]
        r = j.get("r1")
        assert r.state == "pending" and r.unlearning_round is None and r.attempts == 0  # not the site's fault
        assert j.requests("pending")[0].id == "r1" and j.requests("verified") == []
        with pytest.raises(JournalError, match="unknown state"):
            j.requests("done")


def test_refusals_are_kept(tmp_path):
    with Journal(tmp_path / "j.sqlite") as j:
        j.refuse("node 7 (h0)", "h2", "site 'h0' may not request the erasure of site 'h2'", {"site": "h2"}, 3)
        (r,) = j.refusals()
        assert r["named-site"] == "h2" and "may not" in r["reason"] and json.loads(r["payload"]) == {"site": "h2"}
        assert j.requests() == []


def test_the_journal_is_durable_synchronous_sqlite(tmp_path):
    path = tmp_path / "j.sqlite"
    Journal(path).add("r1", "h1", "operator", 0)  # no explicit close
    assert sqlite3.connect(path).execute("SELECT state FROM requests").fetchone() == ("pending",)
    with Journal(path) as j:
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_weights_digest_identifies_models():
    assert weights_digest(W) == weights_digest({k: v.copy() for k, v in reversed(W.items())})
    assert weights_digest(W) != weights_digest({**W, "a": W["a"] + 1e-6})
    assert weights_digest(W) != weights_digest({**W, "a": W["a"].astype(np.float64)})


@pytest.mark.parametrize(
    "payload, msg",
    [
        ("not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"id": "x" * 32, "site": "h1"}, "32 lowercase hex"),
        ({"id": "a" * 32, "site": "../etc"}, "site must match"),
        ({"id": "a" * 32, "site": "h1", "scope": "samples"}, "scope"),
        ({"id": "a" * 32, "site": "h1", "reason": "x" * 501}, "reason"),
        ({"id": "a" * 32, "site": "h1", "admin": True}, "unknown field"),
    ],
)
def test_malformed_requests_are_refused(payload, msg):
    with pytest.raises(RequestError, match=msg):
        parse_request(
            payload if isinstance(payload, str) else json.dumps(payload) if isinstance(payload, dict) else payload
        )


def test_inbox_round_trip(tmp_path):
    req = new_request("hospital-b", "withdrawal")
    assert parse_request(json.dumps(req.to_dict())) == req
    path = submit_to_inbox(tmp_path, req)
    assert path.parent.name == "pending" and not list(tmp_path.glob("pending/.tmp-*"))
    assert pending_in_inbox(tmp_path) == [(req.id, path.read_text())]
    assert acknowledge_in_inbox(tmp_path, [req.id, "../../etc/passwd", "f" * 32]) == [req.id]
    assert pending_in_inbox(tmp_path) == [] and (tmp_path / "acknowledged" / f"{req.id}.json").exists()
    with pytest.raises(ValueError):
        acknowledge_in_inbox(tmp_path, [], "elsewhere")


def test_site_registry(tmp_path):
    reg = SiteRegistry({"h0": {"node-id": 11, "partition-id": 0}, "h1": {"node-id": 12, "partition-id": 1}})
    path = reg.write(tmp_path / "sites.json")
    back = SiteRegistry.from_file(path)
    assert back.site_of_node(12) == "h1" and back.site_of_node(99) is None
    (tmp_path / "dup.json").write_text(
        json.dumps({"sites": {"a": {"node-id": 1, "partition-id": 0}, "b": {"node-id": 1, "partition-id": 1}}})
    )
    with pytest.raises(ValueError, match="bound to"):
        SiteRegistry.from_file(tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text(json.dumps({"sites": {"a": {"node-id": "1", "partition-id": 0}}}))
    with pytest.raises(ValueError, match="integer"):
        SiteRegistry.from_file(tmp_path / "bad.json")


def test_one_service_process_per_state_dir_and_kill_9_releases_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from fed_unlearn.journal import StateDirBusy, StateDirLock

    with StateDirLock(tmp_path), pytest.raises(StateDirBusy, match=f"pid {os.getpid()}"):
        StateDirLock(tmp_path, timeout=0.2, poll=0.05).acquire()
    StateDirLock(tmp_path).acquire().release()  # released on exit
    # a holder killed with SIGKILL leaves no stale lock behind
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fed_unlearn.journal import StateDirLock; "
            f"lock = StateDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(StateDirBusy, match=f"pid {holder.pid}"):
        StateDirLock(tmp_path, timeout=0.1, poll=0.05).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    StateDirLock(tmp_path, timeout=5).acquire().release()
