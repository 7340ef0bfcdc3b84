"""The erasure service (mode = "service") on an in-process Grid: intake, serving, restart, audit, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from clients.client_app import app as client_app
from fed_unlearn.erasure import SiteRegistry, new_request, submit_to_inbox
from fed_unlearn.flower import InProcessGrid
from fed_unlearn.journal import Journal
from server.server_app import run_server as server_main
from simulations.inprocess import fused_run_config

TIER = "integration"  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SITES = ("h0", "h1", "h2")


class Crash(BaseException):
    """Stands for the server process dying (not an Exception: nothing may catch it)."""


class CrashingGrid(InProcessGrid):
    """Dies when asked to send the training messages of ``crash_round``; ``drop`` nodes go offline after discovery."""

    crash_round = -1
    drop: frozenset = frozenset()  # replaced per instance by start()

    def push_messages(self, messages):  # every exchange pushes (a message riding behind one too)
        msgs = list(messages)
        if msgs and msgs[0].metadata.message_type not in ("query.info", "query.identify"):  # discovery is over
            self.offline |= self.drop
        if (
            msgs
            and msgs[0].metadata.message_type.startswith("train")
            and msgs[0].content["config"]["server-round"] == self.crash_round
        ):
            raise Crash()
        return super().push_messages(msgs)


def start(tmp: Path, rounds: int, extra: str = "", grid_cls=None, crash_round: int = -1, offline=()):
    rc = fused_run_config(
        str(ROOT),
        # memorisation-z 0: the small federation's evidence is weak; the serving path moves the model anyway
        f"mode='service' dataset='digits' num-server-rounds={rounds} unlearn.memorisation-z=0.0 "
        f"service.state-dir='{tmp / 'state'}' service.recovery-rounds=1 {extra}",
    )
    grid = (grid_cls or CrashingGrid)(
        client_app, 3, rc, node_configs=[{"site": s, "erasure-inbox": str(tmp / s)} for s in SITES]
    )
    grid.crash_round = crash_round
    grid.drop = {list(grid.contexts)[i] for i in offline}  # connected at discovery, then gone
    return server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)), grid


def journal(tmp: Path) -> Journal:
    return Journal(tmp / "state" / "journal.sqlite")


def test_a_site_asks_to_be_forgotten_is_served_once_left_out_and_audited(tmp_path):
    start(tmp_path, 3)  # three ordinary rounds
    req = new_request("h1", "withdrawal")
    submit_to_inbox(tmp_path / "h1", req)
    out, _ = start(tmp_path, 6)  # resumes at round 4, serves it there, recovers in 5
    assert out["resumed-from-round"] == 3 and set(out["history"]) == {"4", "5", "6"}
    with journal(tmp_path) as j:
        r = j.get(req.id)
        assert (r.state, r.requested_by, r.attempts, r.served_round, r.recovered_round) == (
            "verified",
            "site:h1",
            1,
            4,
            5,
        )
        assert j.checkpoint().server_round == 6 and j.checkpoint().state["departed-sites"] == ["h1"]
    report = json.loads(Path(r.report).read_text())
    assert report["request"]["site"] == "h1" and report["method"] == "puf" and not report["fallback-used"]
    hashes = report["model-sha256"]
    assert len({hashes["before"], hashes["after-unlearning"], hashes["after-recovery"]}) == 3
    audit = report["leakage-audit"]
    assert audit["site-reachable"] and audit["before"]["forget-acc"] > audit["after"]["forget-acc"]
    assert report["utility"]["test-acc-after"] > 0.5 and report["utility"]["test-acc-before"] > 0.5
    # h1's node got no training message after its unlearning round, and its file is filed
    assert (tmp_path / "h1" / "acknowledged" / f"{req.id}.json").exists() and not list(
        (tmp_path / "h1" / "pending").glob("*")
    )


class ExchangeGrid(CrashingGrid):
    """Records the message types of every exchange (``send_and_receive``) and of every message pushed ahead."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges: list[tuple[str, ...]] = []
        self.ahead: list[tuple[str, ...]] = []
        self.pushed: list[tuple[str, int]] = []  # (message type, node) of every message sent
        self.in_exchange = False

    def push_messages(self, messages):
        msgs = list(messages)
        self.pushed += [(m.metadata.message_type, m.metadata.dst_node_id) for m in msgs]
        if not self.in_exchange:
            self.ahead.append(tuple(sorted({m.metadata.message_type for m in msgs})))
        return super().push_messages(msgs)

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        self.exchanges.append(tuple(sorted({m.metadata.message_type for m in msgs})))
        self.in_exchange = True
        try:
            return super().send_and_receive(msgs, timeout=timeout)
        finally:
            self.in_exchange = False


def test_the_serving_round_is_one_exchange_longer_than_an_ordinary_round(tmp_path):
    """The erasure poll rides ahead of the round's training, the measurement of the model before unlearning and
    the label counts of the sites who stay right behind it (a site takes queued messages back to back); what the
    round adds is the calibration query to the departing site."""
    start(tmp_path, 2)
    submit_to_inbox(tmp_path / "h1", new_request("h1", "withdrawal"))
    out, grid = start(tmp_path, 4, grid_cls=ExchangeGrid)  # serves in round 3, recovers in 4
    calibration = ("query.calibrate",)
    serving = grid.exchanges[grid.exchanges.index(calibration) :]
    assert serving[:2] == [calibration, ("evaluate",)]
    assert serving[2:4] == [("train",), ("evaluate",)]  # the recovery round: an ordinary round
    assert ("query.erasure",) in grid.ahead
    sent = [t for t, _ in grid.pushed]
    audit = sent.index("evaluate.audit")
    # the serving round's training, then the measurements of the model before and the label counts of the two
    # sites who stay, then the calibration (to the departing site alone)
    behind = sent[audit : sent.index("query.calibrate")]
    assert sent[audit - 1] == "train" and sorted(behind) == ["evaluate.audit"] * 3 + ["query.support"] * 2
    h1 = next(n for n, c in grid.contexts.items() if c.node_config["site"] == "h1")
    assert [n for t, n in grid.pushed if t == "query.calibrate"] == [h1]
    with journal(tmp_path) as j:
        (r,) = j.requests()
        assert r.state == "verified" and r.served_round == 3
    report = json.loads(Path(r.report).read_text())
    before = report["leakage-audit"]["before"]  # what rode ahead reached the audit
    assert 0.5 < before["forget-acc"] <= 1 and 0.5 < report["utility"]["test-acc-before"] <= 1
    assert report["leakage-audit"]["after"]["forget-acc"] != before["forget-acc"]


def test_a_request_filed_mid_run_takes_the_staying_sites_before_figures_from_the_last_evaluation(tmp_path):
    """The model a request is served from is the one the last round's evaluation measured, on the same data: the
    sites who stay are not asked again, and the utility before unlearning is what they measured then."""
    from fed_unlearn.evaluation import summarise

    inbox = tmp_path / "h1"

    class Filing(ExchangeGrid):
        """Files h1's request once the run's second evaluation is over, and keeps every evaluation's replies."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.evaluations: list[dict[int, dict]] = []

        def send_and_receive(self, messages, *, timeout=None):
            msgs = list(messages)
            out = list(super().send_and_receive(msgs, timeout=timeout))
            if msgs and msgs[0].metadata.message_type == "evaluate":
                self.evaluations.append(
                    {r.metadata.src_node_id: dict(next(iter(r.content.metric_records.values()))) for r in out}
                )
                if len(self.evaluations) == 2:
                    submit_to_inbox(inbox, new_request("h1", "withdrawal"))
            return out

    _, grid = start(tmp_path, 5, grid_cls=Filing)  # the poll of round 4 finds it: served in 4, recovered in 5
    with journal(tmp_path) as j:
        (r,) = j.requests()
        assert r.state == "verified" and r.served_round == 4
    site = {n: c.node_config["site"] for n, c in grid.contexts.items()}
    serving = grid.pushed[: [t for t, _ in grid.pushed].index("query.calibrate")]
    assert [site[n] for t, n in serving if t == "evaluate.audit"] == ["h1"]  # the departing site alone
    staying = {i: m for i, (n, m) in enumerate(grid.evaluations[2].items()) if site[n] != "h1"}  # round 3's
    report = json.loads(Path(r.report).read_text())
    assert report["utility"]["test-acc-before"] == summarise(staying)["test-acc"]
    assert 0.5 < report["leakage-audit"]["before"]["forget-acc"] <= 1


def test_queries_ride_ahead_only_where_each_node_takes_one_message_at_a_time():
    """Flower's simulation may run two messages of one node at once and keep the state of the last to finish."""
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fed_unlearn.flower import ActiveNodesGrid, PromptGrid
    from fed_unlearn.flower.grid import one_message_at_a_time

    local = InProcessGrid(client_app, 2, {})
    deployed, simulated = HttpGrid.__new__(HttpGrid), InMemoryGrid.__new__(InMemoryGrid)
    assert one_message_at_a_time(local) and one_message_at_a_time(ActiveNodesGrid(local, lambda: ()))
    assert one_message_at_a_time(deployed) and one_message_at_a_time(PromptGrid(deployed))
    assert not one_message_at_a_time(simulated) and not one_message_at_a_time(ActiveNodesGrid(simulated, lambda: ()))


def test_riders_are_pushed_right_behind_the_next_exchange_of_their_type_and_only_that_one():
    from flwr.app import Message

    from fed_unlearn.flower.grid import RidingGrid

    class Recording(InProcessGrid):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.pushes: list[list[str]] = []

        def push_messages(self, messages):
            msgs = list(messages)
            self.pushes.append([m.metadata.message_type for m in msgs])
            return super().push_messages(msgs)

    inner = Recording(client_app, 2, {})
    nodes = list(inner.get_node_ids())
    grid = RidingGrid(inner, lambda: ())
    got: list[list[str]] = []
    grid.ride_behind("train", [Message(RecordDict(), n, "evaluate.audit") for n in nodes], got.append)
    grid.send_and_receive([Message(RecordDict(), n, "query.info") for n in nodes])  # not their exchange
    assert inner.pushes == [["query.info"] * 2] and got == []
    replies = list(grid.send_and_receive([Message(RecordDict(), n, "train") for n in nodes]))
    assert inner.pushes[1:] == [["train"] * 2, ["evaluate.audit"] * 2] and len(got[0]) == 2
    assert {r.metadata.message_type for r in replies} == {"train"}  # the exchange's replies only
    grid.ride_behind("train", [Message(RecordDict(), nodes[0], "evaluate.audit")], got.append)
    assert [m.metadata.message_type for m in grid.cancel_riders()] == ["evaluate.audit"]
    grid.send_and_receive([Message(RecordDict(), n, "train") for n in nodes])
    assert inner.pushes[-1] == ["train"] * 2 and len(got) == 1  # a cancelled rider is not pushed


def test_a_crash_in_the_unlearning_round_is_resumed_and_the_request_served_exactly_once(tmp_path):
    def scenario(tmp: Path, crash: bool) -> str:
        start(tmp, 2)
        submit_to_inbox(tmp / "h2", new_request("h2"))
        if crash:
            with pytest.raises(Crash):
                start(tmp, 5, crash_round=3)  # journaled + unlearning started, not committed
            with journal(tmp) as j:
                (r,) = j.requests()
                assert r.state == "unlearning" and r.served_round is None and j.checkpoint().server_round == 2
        out, _ = start(tmp, 5)
        if crash:
            assert out["resumed-from-round"] == 2 and out["re-served-after-restart"] == [r.id]
        with journal(tmp) as j:
            (r,) = j.requests()
            assert r.state == "verified" and r.served_round == 3 and r.attempts == 1
            return j.checkpoint().digest

    # the final model is exactly the one of a run that never crashed: served once, no round lost
    assert scenario(tmp_path / "crash", True) == scenario(tmp_path / "clean", False)


def test_bad_requests_are_refused_and_change_nothing(tmp_path):
    submit_to_inbox(tmp_path / "h0", new_request("h2", "not mine"))  # a site asking for another
    submit_to_inbox(tmp_path / "h0", new_request("h9"))  # an unknown site
    (tmp_path / "h1" / "pending").mkdir(parents=True)
    (tmp_path / "h1" / "pending" / "garbage.json").write_text('{"site": "h1"}')  # malformed
    os.utime(tmp_path / "h1" / "pending" / "garbage.json", (1.0, 1.0))  # and not being written any more
    start(tmp_path / "clean", 2)
    start(tmp_path, 2)
    with journal(tmp_path) as j, journal(tmp_path / "clean") as clean:
        assert j.requests() == []
        reasons = sorted(r["reason"] for r in j.refusals())
        assert len(reasons) == 3 and any("may not request" in x for x in reasons)
        assert any("unknown site 'h9'" in x for x in reasons) and any("malformed" in x for x in reasons)
        assert j.checkpoint().digest == clean.checkpoint().digest  # the model never moved because of them
    assert len(list((tmp_path / "h0" / "refused").glob("*.json"))) == 2
    assert (tmp_path / "h1" / "refused" / "garbage.json").exists()  # filed by name: not resent forever


@pytest.mark.parametrize("fallback", ["wait", "fine-tune"])
def test_an_absent_site_leaves_its_request_pending_until_the_fallback(tmp_path, fallback):
    start(tmp_path, 1)
    r = new_request("h2")
    with journal(tmp_path) as j:  # journaled while h2 was up; then h2 drops out
        j.add(r.id, "h2", "site:h2", 1)
    extra = f"service.fallback='{fallback}' service.fallback-after=2"
    out, grid = start(tmp_path, 5, extra=extra, offline=[2], grid_cls=ExchangeGrid)
    gone = list(grid.contexts)[2]
    assert ("evaluate.audit", gone) not in grid.pushed  # a site known to be down is not waited for
    with journal(tmp_path) as j:
        got = j.get(r.id)
        if fallback == "wait":  # tried every round (2..5), still open and reported
            assert got.state == "pending" and got.attempts == 4 and out["open-requests"] == [r.id]
            assert j.checkpoint().state["departed-sites"] == []
        else:  # two failed attempts, then served without the site (data-free), recovered, audited
            assert got.state == "verified" and got.method == "fine-tune" and got.attempts == 3
            report = json.loads(Path(got.report).read_text())
            assert report["fallback-used"] and report["leakage-audit"]["site-reachable"] is False
            assert j.checkpoint().state["departed-sites"] == ["h2"]


def test_operator_requests(tmp_path, capsys):
    from server.erasure_admin import main as admin

    assert admin(["request", "--state-dir", str(tmp_path / "state"), "--site", "h1"]) == 2  # no federation known yet
    start(tmp_path, 1)
    assert admin(["request", "--state-dir", str(tmp_path / "state"), "--site", "h7"]) == 2
    assert "unknown site 'h7'" in capsys.readouterr().err
    with journal(tmp_path) as j:
        assert j.requests() == []
    assert admin(["request", "--state-dir", str(tmp_path / "state"), "--site", "h0", "--reason", "court order"]) == 0
    start(tmp_path, 3)
    with journal(tmp_path) as j:
        (r,) = j.requests()
        assert (r.site, r.requested_by, r.state) == ("h0", "operator", "verified")
    assert admin(["status", "--state-dir", str(tmp_path / "state")]) == 0
    assert "verified" in capsys.readouterr().out
    # the run-config path, and its refusal of unknown sites before any round
    out, _ = start(tmp_path / "rc", 2, extra="service.erase-sites='h2'")
    assert out["requests"][0]["requested_by"] == "operator:run-config"
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['h8'\]"):
        start(tmp_path / "rc2", 2, extra="service.erase-sites='h8'")
    assert (
        not (tmp_path / "rc2" / "state" / "journal.sqlite").exists()
        or Journal(tmp_path / "rc2" / "state" / "journal.sqlite").checkpoint() is None
    )


def test_the_site_registry_binds_sites_to_node_ids(tmp_path):
    rc = fused_run_config(str(ROOT), "mode='service' dataset='digits'")
    ids = list(InProcessGrid(client_app, 3, rc).contexts)
    # h0's node is registered as "h1-alias"... i.e. it claims a name it is not registered under
    reg = SiteRegistry(
        {
            "alpha": {"node-id": ids[0], "partition-id": 0},
            "h1": {"node-id": ids[1], "partition-id": 1},
            "h2": {"node-id": ids[2], "partition-id": 2},
        }
    ).write(tmp_path / "sites.json")
    req = new_request("alpha")
    submit_to_inbox(tmp_path / "h0", req)  # node 0 speaks for site "alpha" in the registry
    out, _ = start(tmp_path, 3, extra=f"service.sites-file='{reg}'")
    assert out["sites"] == {"alpha": 0, "h1": 1, "h2": 2}
    with journal(tmp_path) as j:
        assert j.get(req.id).state == "verified"
        assert any("claims to be 'h0'" in r["reason"] for r in j.refusals())
    bad = SiteRegistry({"h0": {"node-id": 1, "partition-id": 0}}).write(tmp_path / "bad.json")
    with pytest.raises(RuntimeError, match="not in the site registry"):
        start(tmp_path / "b", 2, extra=f"service.sites-file='{bad}' node-wait-seconds=2.0")


def test_methods_that_store_history_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match="cannot serve requests"):
        start(tmp_path, 2, extra="unlearn.method='federaser'")


def test_a_restart_does_not_wait_for_sites_that_were_erased(tmp_path):
    submit_to_inbox(tmp_path / "h1", new_request("h1"))
    start(tmp_path, 3)  # h1 served in round 1, recovered in 2, audited
    rc = fused_run_config(
        str(ROOT),
        f"mode='service' dataset='digits' num-server-rounds=5 node-wait-seconds=5.0 "
        f"service.state-dir='{tmp_path / 'state'}' service.recovery-rounds=1",
    )
    grid = InProcessGrid(
        client_app, 3, rc, node_configs=[{"site": s, "erasure-inbox": str(tmp_path / s)} for s in SITES]
    )
    grid.offline = {list(grid.contexts)[1]}  # h1 has shut its node down for good
    out = server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    assert out["resumed-from-round"] == 3 and set(out["history"]) == {"4", "5"} and out["sites"]["h1"] == 1
    with journal(tmp_path) as j:
        assert j.checkpoint().state["departed-sites"] == ["h1"]


def test_the_strong_audit_is_signed_as_an_erasure_certificate_that_detects_tampering(tmp_path, capsys):
    from server.erasure_admin import main as admin

    start(tmp_path, 2, "audit.references=2")
    req = new_request("h1", "withdrawal")
    submit_to_inbox(tmp_path / "h1", req)
    start(tmp_path, 4, "audit.references=2")  # served in 3, recovered in 4, audited
    audit = tmp_path / "state" / "audit"
    report = json.loads((audit / f"{req.id}.json").read_text())
    strong = report["strong-audit"]
    after = strong["figures"]["after"]
    assert strong["references"]["trained"] == 2 and strong["target"] == "chance (TPR = FPR)"
    assert after["members"] > 0 and after["nonmembers"] > 0 and 0 <= after["rmia-auc"] <= 1
    # the certificate's verdict is the one the figures give (fed_unlearn.attacks.erasure_verdict)
    from fed_unlearn.attacks import erasure_verdict

    assert (strong["consistent-with-erasure"], strong["verdict"]) == erasure_verdict(after)
    page, cert, pub = audit / f"{req.id}.certificate.html", audit / f"{req.id}.certificate.json", "certificate-key.pub"
    key = ["--public-key", str(tmp_path / "state" / pub)]
    assert admin(["verify", str(page), *key]) == 0 and admin(["verify", str(cert), *key]) == 0
    out = capsys.readouterr().out
    assert "valid: erasure of site 'h1'" in out and strong["verdict"] in out
    payload = json.loads(cert.read_text())["payload"]
    assert payload["model-sha256"] == report["model-sha256"] and payload["request"]["site"] == "h1"
    assert set(payload["images-sha256"]) == {"rmia-roc.png"}
    # a changed figure on the page fails, with one line saying why
    page.write_text(page.read_text().replace(f"{after['rmia-auc']:.4f}", "0.5000", 1))
    assert admin(["verify", str(page), *key]) == 1
    assert "INVALID" in capsys.readouterr().err


class FilingGrid(InProcessGrid):
    """A site files its request while it trains in round 2 (mid-run), and every poll is recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.request = new_request("h1")
        self.log: list[tuple[str, int]] = []  # (message type, server round) as pushed

    def push_messages(self, messages):
        msgs = list(messages)
        for m in msgs:
            cfg = m.content.config_records.get("config")
            rnd = int(cfg.get("server-round", 0)) if cfg is not None else 0
            self.log.append((m.metadata.message_type, rnd))
            node_config = self.contexts[m.metadata.dst_node_id].node_config
            if m.metadata.message_type == "train" and rnd == 2 and node_config["site"] == "h1":
                submit_to_inbox(Path(str(node_config["erasure-inbox"])), self.request)
        return super().push_messages(msgs)


def test_the_next_rounds_poll_is_pushed_ahead_and_a_request_filed_mid_run_is_served(tmp_path):
    out, grid = start(tmp_path, 5, grid_cls=FilingGrid)
    polls = [rnd for kind, rnd in grid.log if kind == "query.erasure"]
    # one poll per site and round; from round 1 on, the poll for round r + 1 goes out before round r trains
    assert polls == [r for r in range(1, 6) for _ in SITES]
    first_train = {rnd: grid.log.index(("train", rnd)) for rnd in (1, 2, 3)}
    assert grid.log.index(("query.erasure", 2)) < first_train[1]
    assert grid.log.index(("query.erasure", 3)) < first_train[2] < grid.log.index(("query.erasure", 4))
    # filed during round 2's training: the poll pushed at the start of round 3 carries it,
    # it is journaled at the start of round 4 and served there
    with journal(tmp_path) as j:
        r = j.get(grid.request.id)
        assert (r.state, r.served_round, r.recovered_round) == ("verified", 4, 5)
    assert out["sites"]["h1"] == 1 and (tmp_path / "h1" / "acknowledged" / f"{grid.request.id}.json").exists()
