"""Faults the erasure service must outlive on the in-process Grid: hostile text and replies, sites down at a
restart, identity conflicts, a crash between a recovery round's commit and its certificate, a lost journal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from clients.client_app import app as client_app
from fed_unlearn.certificate import verify_file
from fed_unlearn.erasure import SiteRegistry, new_request, submit_to_inbox
from fed_unlearn.flower import InProcessGrid
from fed_unlearn.journal import Journal, JournalError
from server import service as service_module
from server.server_app import run_server as server_main
from simulations.inprocess import fused_run_config
from tests.test_hostile import HostileGrid

TIER = "integration"  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SITES = ("h0", "h1", "h2")


class Crash(BaseException):
    """Stands for the server process dying (not an Exception: nothing may catch it)."""


def start(
    tmp: Path, rounds: int, extra: str = "", offline=(), configs=None, grid_cls=InProcessGrid, hostile=(), **attrs
):
    rc = fused_run_config(
        str(ROOT),
        f"mode='service' dataset='digits' num-server-rounds={rounds} unlearn.memorisation-z=0.0 "
        f"{'' if 'node-wait-seconds' in extra else 'node-wait-seconds=3.0 '}"
        f"service.state-dir='{tmp / 'state'}' service.recovery-rounds=1 {extra}",
    )
    configs = configs or [{"site": s, "erasure-inbox": str(tmp / s)} for s in SITES]
    grid = grid_cls(client_app, len(configs), rc, node_configs=configs)
    ids = list(grid.contexts)
    grid.offline = {ids[i] for i in offline}
    grid.hostile, grid.log = frozenset(ids[i] for i in hostile), []
    for k, v in attrs.items():
        setattr(grid, k, v)
    return server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)), grid


def journal(tmp: Path) -> Journal:
    return Journal(tmp / "state" / "journal.sqlite")


def test_a_request_whose_reason_is_not_text_is_refused_and_the_service_goes_on(tmp_path):
    (tmp_path / "h0" / "pending").mkdir(parents=True)
    bad = '{"id": "' + "a" * 32 + '", "site": "h0", "reason": "\\ud800"}'  # 100 bytes that stopped the service
    (tmp_path / "h0" / "pending" / "bad.json").write_text(bad)
    good = new_request("h2", "leaving")
    submit_to_inbox(tmp_path / "h2", good)
    out, _ = start(tmp_path, 3)
    assert set(out["history"]) == {"1", "2", "3"}
    with journal(tmp_path) as j:
        assert j.get(good.id).state == "verified"
        (refusal,) = [r for r in j.refusals() if "h0" in r["source"]]
        assert "lone surrogate" in refusal["reason"]
    out, _ = start(tmp_path, 4)  # and every restart goes on too
    assert out["resumed-from-round"] == 3 and set(out["history"]) == {"4"}


def test_a_restart_goes_on_with_a_site_down_and_serves_its_request_once_it_is_back(tmp_path):
    start(tmp_path, 2)
    req = new_request("h1", "withdrawal")
    submit_to_inbox(tmp_path / "h1", req)
    out, _ = start(tmp_path, 4, offline=[1])  # h1 is down across the restart: the others carry on
    assert out["resumed-from-round"] == 2 and set(out["history"]) == {"3", "4"}
    assert all(h["test-acc"] > 0.5 for h in out["history"].values())
    with journal(tmp_path) as j:
        assert any(e["kind"] == "sites-absent" and "h1" in e["detail"] for e in j.events())
        assert j.checkpoint().state["sites"] == {"h0": 0, "h1": 1, "h2": 2}  # h1 is still one of the sites
        assert [r.id for r in j.requests()] == []  # its request is in its own inbox, unseen
    out, _ = start(tmp_path, 9, offline=[1], grid_cls=BackAfterGrid, back_round=6)  # h1 is back from round 6 on
    with journal(tmp_path) as j:
        r = j.get(req.id)
        assert r.state == "verified" and r.served_round > 6
        assert j.checkpoint().state["departed-sites"] == ["h1"]


class BackAfterGrid(InProcessGrid):
    """Offline nodes connect again once the training of ``back_round`` is sent."""

    back_round = 0

    def push_messages(self, messages):
        msgs = list(messages)
        for m in msgs:
            cfg = m.content.config_records.get("config")
            if m.metadata.message_type == "train" and cfg is not None and cfg.get("server-round") == self.back_round:
                self.offline = set()
        return super().push_messages(msgs)


def test_an_excluded_site_that_is_down_does_not_block_a_restart(tmp_path):
    start(tmp_path, 2)
    with journal(tmp_path) as j:  # h2 was excluded for invalid replies
        ck = j.checkpoint()
        j.commit_round(ck.server_round, ck.weights, {**ck.state, "excluded-sites": ["h2"]})
    out, _ = start(tmp_path, 3, "node-wait-seconds=600.0", offline=[2])  # down now: nobody waits for it
    assert set(out["history"]) == {"3"} and out["excluded-sites"] == ["h2"]


@pytest.mark.parametrize("registry", [False, True])
def test_a_node_claiming_another_sites_partition_is_refused_not_the_service(tmp_path, registry):
    sites = [{"site": s, "erasure-inbox": str(tmp_path / s), "num-partitions": 3} for s in SITES]
    liar = {"site": "h1", "partition-id": 1, "num-partitions": 3}
    extra = ""
    if registry:
        ids = [7_000_001 + 37 * i for i in range(4)]  # the in-process grid's node ids
        reg = {s: {"node-id": ids[i], "partition-id": i} for i, s in enumerate(SITES)}
        reg["h3"] = {"node-id": ids[3], "partition-id": 3}  # registered as h3, claims h1's partition
        SiteRegistry(reg).write(tmp_path / "sites.json")
        extra = f"service.sites-file='{tmp_path / 'sites.json'}'"
    out, grid = start(tmp_path, 2, extra, configs=[*sites, liar])
    assert set(out["history"]) == {"1", "2"} and out["sites"] == {"h0": 0, "h1": 1, "h2": 2}
    with journal(tmp_path) as j:
        (refused,) = j.events("node-refused")
    assert refused["source"] == f"node {list(grid.contexts)[3]}"
    want = "registered as 'h3' with partition 3, but claims partition 1" if registry else "which connected node"
    assert want in refused["detail"]


def test_a_crash_between_the_recovery_commit_and_the_audit_is_certified_at_the_restart(tmp_path, monkeypatch):
    req = new_request("h1", "withdrawal")
    submit_to_inbox(tmp_path / "h1", req)

    def die(*args, **kwargs):
        raise Crash()

    with monkeypatch.context() as m:
        m.setattr(service_module.ErasureService, "audit", die)
        with pytest.raises(Crash):
            start(tmp_path, 4)  # served in round 1, recovered in 2: killed before the audit
    with journal(tmp_path) as j:
        assert j.get(req.id).state == "recovered" and j.checkpoint().server_round == 2
    out, _ = start(tmp_path, 3)
    with journal(tmp_path) as j:
        r = j.get(req.id)
        assert r.state == "verified"
    cert = tmp_path / "state" / "audit" / f"{req.id}.certificate.json"
    payload = verify_file(cert, (tmp_path / "state" / "certificate-key.pub").read_bytes())
    assert payload["request"]["id"] == req.id and payload["rounds"]["recovered"] == 2
    assert out["resumed-from-round"] == 2


def test_a_lost_journal_beside_certificates_refuses_to_start_a_new_federation(tmp_path):
    req = new_request("h1")
    submit_to_inbox(tmp_path / "h1", req)
    start(tmp_path, 2)
    db = tmp_path / "state" / "journal.sqlite"
    db.unlink()
    with pytest.raises(JournalError, match="journal.sqlite is missing .* restore journal.sqlite from a backup"):
        start(tmp_path, 3)
    db.write_bytes(b"")
    with pytest.raises(JournalError, match="is empty"):
        start(tmp_path, 3)


@pytest.mark.parametrize("value, dtype", [(1e300, np.float64), (1e38, np.float32)])
def test_a_reply_of_1e300_or_1e38_costs_its_site_the_round_and_the_federation_trains_on(tmp_path, value, dtype):
    req = new_request("h0")
    submit_to_inbox(tmp_path / "h0", req)  # an erasure in flight while it happens
    out, grid = start(
        tmp_path,
        3,
        grid_cls=HostileGrid,
        hostile=[1],
        forge=lambda w: {k: np.full(a.shape, value, dtype) for k, a in w.items()},
    )
    # round 1 erases h0 from the initial model; then the one honest site left trains the federation on
    assert set(out["history"]) == {"1", "2", "3"} and out["history"]["3"]["test-acc"] > 0.8
    with journal(tmp_path) as j:
        assert all(np.isfinite(v).all() for v in j.checkpoint().weights.values())
        assert j.get(req.id).state == "verified"
        rejected = j.events("rejected-update")
        assert rejected and all(e["source"] == "site:h1" for e in rejected)
