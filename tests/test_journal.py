"""The erasure journal, request format, inbox and site registry (pure Python, no Flower)."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fed_unlearn.erasure import (
    MAX_FILES_PER_POLL,
    RequestError,
    SiteRegistry,
    acknowledge_in_inbox,
    erasure_poll,
    inbox_entries,
    new_request,
    parse_request,
    pending_in_inbox,
    submit_to_inbox,
)
from fed_unlearn.journal import Journal, JournalError, check_state_dir, weights_digest

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
    assert pending_in_inbox(tmp_path) == [(path.name, path.read_text())]
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


def test_text_that_cannot_be_stored_is_refused_naming_the_field_and_stored_safely_if_it_comes():
    lone = json.dumps({"id": "a" * 32, "site": "h1", "reason": "\ud800"})  # a JSON escape: valid ASCII
    with pytest.raises(RequestError, match="reason holds a lone surrogate"):
        parse_request(lone)
    with pytest.raises(RequestError, match="reason is not UTF-8 text \\(byte 0xf6"):
        new_request("h1", "L\udcf6schung")  # what Python makes of a Latin-1 terminal's argument


def test_the_journal_stores_any_text(tmp_path):
    with Journal(tmp_path / "j.sqlite") as j:
        j.add("r1", "h1", "site:h1", 1, "L\udcf6schung \ud800")
        j.refuse("node \ud800", "h\udcff", "why \ud800", "payload \ud800", 1)
        j.event(1, "site:\ud800", "poll-failed", "detail \ud800")
        assert j.get("r1").reason == "L\\udcf6schung \\ud800" and len(j.refusals()) == len(j.events()) == 1


def _pending(tmp_path: Path) -> Path:
    folder = tmp_path / "pending"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_inbox_never_reads_through_links(tmp_path):
    secret = tmp_path / "site-key.pem"
    secret.write_text('{"id": "' + "b" * 32 + '", "site": "h1"}')  # even a valid request is not read via a link
    folder = _pending(tmp_path)
    (folder / "key.json").symlink_to(secret)
    (folder / "hard.json").hardlink_to(secret)
    entries = {e.name: e for e in inbox_entries(tmp_path)}
    assert entries["key.json"].problem.startswith("a symbolic link") and entries["key.json"].text == ""
    assert entries["hard.json"].problem.startswith("a hard link") and entries["hard.json"].text == ""
    assert pending_in_inbox(tmp_path) == []


def test_any_file_name_is_served_and_filed_by_the_id_inside(tmp_path):
    folder = _pending(tmp_path)
    reqs = [new_request("h1") for _ in range(3)]
    names = ["request (1).json", "löschung.json", "c" * 32 + ".json"]  # the last: an id that is not its own
    for name, req in zip(names, reqs, strict=True):
        (folder / name).write_text(json.dumps(req.to_dict()))
    assert sorted(n for n, _ in pending_in_inbox(tmp_path)) == sorted(names)
    assert sorted(acknowledge_in_inbox(tmp_path, [r.id for r in reqs])) == sorted(r.id for r in reqs)
    assert sorted(p.name for p in (tmp_path / "acknowledged").iterdir()) == sorted(names)
    assert pending_in_inbox(tmp_path) == []


def test_a_file_being_written_is_retried_and_junk_never_delays_a_request(tmp_path):
    import os

    folder = _pending(tmp_path)
    (folder / "half.json").write_text('{"id": "' + "d" * 32)  # a writer that does not write atomically
    assert inbox_entries(tmp_path) == []  # still being written: not sent, not refused
    later = inbox_entries(tmp_path, now=os.path.getmtime(folder / "half.json") + 10)
    assert [e.problem.split(":")[0] for e in later] == ["malformed"]
    for i in range(3 * MAX_FILES_PER_POLL):
        (folder / f"junk-{i:04d}.json").write_text("x" * 100)
        os.utime(folder / f"junk-{i:04d}.json", (1.0, 1.0))  # older than the request
    req = new_request("h1")
    submit_to_inbox(tmp_path, req)
    poll = erasure_poll(str(tmp_path), "h1", {})
    assert len(poll["files"]) == MAX_FILES_PER_POLL and poll["files"][0] == f"{req.id}.json"
    assert sum(len(t) for t in poll["requests"]) < 1000  # junk goes over the wire as its problem only
    refused = erasure_poll(str(tmp_path), "h1", {"refused": poll["files"][1:]})
    assert refused["refused"] == MAX_FILES_PER_POLL - 1


def test_a_state_dir_without_its_journal_but_with_erasures_is_refused(tmp_path):
    check_state_dir(tmp_path)  # a new one is fine
    (tmp_path / "audit").mkdir()
    check_state_dir(tmp_path)  # an empty audit folder too
    (tmp_path / "audit" / "r.json").write_text("{}")
    (tmp_path / "journal.sqlite").write_bytes(b"")
    with pytest.raises(JournalError, match="journal.sqlite is empty but .* holds audit .*restore journal.sqlite"):
        check_state_dir(tmp_path)


def test_a_checkpoint_that_does_not_read_names_the_file(tmp_path):
    with Journal(tmp_path / "j.sqlite") as j:
        j.commit_round(1, W, {})
        j._db.execute("UPDATE checkpoint SET weights = ?", (b"not a zip",))
        with pytest.raises(JournalError, match="j.sqlite: the checkpoint of round 1 does not read"):
            j.checkpoint()
