"""No single site can stop the erasure service or take over the global model (in-process service, seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from clients.client_app import app as client_app
from fed_unlearn.erasure import new_request, submit_to_inbox
from fed_unlearn.flower import InProcessGrid, to_record, to_weights
from fed_unlearn.journal import Journal
from server.server_app import run_server as server_main
from simulations.inprocess import fused_run_config

TIER = "integration"  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SITES = ("h0", "h1", "h2")


class HostileGrid(InProcessGrid):
    """Replaces the training replies of ``hostile`` nodes with what ``forge(weights)`` makes of them."""

    hostile: frozenset = frozenset()
    forge = None
    claim = None

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type.startswith("train"):
                self.log.append((m.metadata.dst_node_id, int(m.content["config"]["server-round"])))
        out = []
        for reply in super().send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node in self.hostile and reply.metadata.message_type.startswith("train") and not reply.has_error():
                (akey, arrays), (mkey, metrics) = (
                    next(iter(reply.content.array_records.items())),
                    next(iter(reply.content.metric_records.items())),
                )
                w = self.forge(to_weights(arrays)) if self.forge else to_weights(arrays)
                m = {**dict(metrics), **({"num-examples": self.claim} if self.claim is not None else {})}
                reply = Message(
                    metadata=reply.metadata, content=RecordDict({akey: to_record(w), mkey: MetricRecord(m)})
                )
            out.append(reply)
        return out


def start(tmp: Path, rounds: int, extra: str = "", hostile=(), forge=None, claim=None):
    rc = fused_run_config(
        str(ROOT),
        f"mode='service' dataset='digits' num-server-rounds={rounds} "
        f"service.state-dir='{tmp / 'state'}' service.recovery-rounds=1 {extra}",
    )
    grid = HostileGrid(client_app, 3, rc, node_configs=[{"site": s, "erasure-inbox": str(tmp / s)} for s in SITES])
    ids = list(grid.contexts)
    grid.hostile, grid.forge, grid.claim = frozenset(ids[i] for i in hostile), forge, claim
    grid.log = []
    out = server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    return out, grid


def journal(tmp: Path) -> Journal:
    return Journal(tmp / "state" / "journal.sqlite")


@pytest.mark.parametrize(
    "name, write",
    [
        ("huge-number", lambda p: p.write_text('{"id": "' + "a" * 32 + '", "created": ' + "9" * 5000 + "}")),
        ("deep-nesting", lambda p: p.write_text("[" * 100_000 + "]" * 100_000)),
        ("not-utf8", lambda p: p.write_bytes(b'{"id": "\xff\xfe"}')),
        ("a-folder", lambda p: p.mkdir()),
        ("too-large", lambda p: _sparse(p)),
    ],
)
def test_a_poisoned_inbox_file_is_refused_and_another_sites_request_is_served(tmp_path, name, write):
    (tmp_path / "h0" / "pending").mkdir(parents=True)
    bad = tmp_path / "h0" / "pending" / f"{name}.json"
    write(bad)
    os.utime(bad, (1.0, 1.0), follow_symlinks=False)  # written long ago (a fresh unparsable file is waited for)
    good = new_request("h2", "leaving")
    submit_to_inbox(tmp_path / "h2", good)
    out, _ = start(tmp_path, 3)
    with journal(tmp_path) as j:
        assert j.get(good.id).state == "verified"  # the other site's request went through, in the same run
        refusal = [r for r in j.refusals() if "h0" in r["source"]]
        assert len(refusal) == 1, j.refusals()  # refused once, then filed away
    assert not list((tmp_path / "h0" / "pending").iterdir())
    assert list((tmp_path / "h0" / "refused").iterdir())
    assert out["history"]["3"]["test-acc"] > 0.5


def _sparse(path: Path) -> str:
    with open(path, "wb") as fh:
        fh.truncate(200 * 2**20)  # a 200 MiB file without writing 200 MiB
    return str(path)


def test_a_nan_update_costs_its_site_the_round_then_its_place(tmp_path):
    out, grid = start(
        tmp_path,
        4,
        extra="service.max-strikes=2",
        hostile=[1],
        forge=lambda w: {k: np.full_like(v, np.nan) for k, v in w.items()},
    )
    assert set(out["history"]) == {"1", "2", "3", "4"}  # the service kept running
    assert all(out["history"][r]["test-acc"] > 0.5 for r in out["history"])
    with journal(tmp_path) as j:
        rejected = j.events("rejected-update")
        assert [e["server-round"] for e in rejected] == [1, 2] and all("NaN" in e["detail"] for e in rejected)
        (excluded,) = j.events("excluded")
        assert excluded["source"] == "site:h1" and j.checkpoint().state["excluded-sites"] == ["h1"]
    assert out["excluded-sites"] == ["h1"]
    h1 = list(grid.contexts)[1]
    # once excluded, the site is sent no more training
    assert not [m for m in grid.log if m == (h1, 3) or m == (h1, 4)]


def test_a_huge_num_examples_claim_does_not_take_over_the_model(tmp_path):
    zeros = lambda w: {k: np.zeros_like(v) for k, v in w.items()}  # noqa: E731

    def norm(tmp: Path) -> float:
        with journal(tmp) as j:
            return float(
                np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in j.checkpoint().weights.values()))
            )

    start(tmp_path / "clean", 1)
    out, _ = start(tmp_path / "attack", 1, hostile=[2], forge=zeros, claim=10**12)
    # uncapped, the claim would make the new model the attacker's zeros (norm ~0); capped at the site's own size,
    # the zeros weigh a third: the model keeps about two thirds of its norm
    assert 0.5 < norm(tmp_path / "attack") / norm(tmp_path / "clean") < 0.8
    assert out["history"]["1"]["test-acc"] > 0.3


@pytest.mark.parametrize(
    "key, value",
    [
        ("momentum", "nan"),
        ("lr", "inf"),
        ("weight-decay", "inf"),
        ("fastclip.bound", "nan"),
        ("node-wait-seconds", "nan"),
        ("round-timeout", "-5.0"),
        ("holdout-fraction", "1.5"),
    ],
)
def test_bad_numbers_fail_before_any_message_naming_the_key(tmp_path, key, value):
    rc = fused_run_config(str(ROOT), f"dataset='digits' results-dir='{tmp_path}' {key}={value}")
    grid = InProcessGrid(client_app, 3, rc)
    with pytest.raises(ValueError, match=f"'{key}'"):
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    assert grid.sent == []


def test_operator_and_site_clis_say_one_line_and_exit_2(tmp_path, capsys):
    from clients.request_erasure import main as site
    from server.erasure_admin import main as admin

    start(tmp_path, 1)
    state = str(tmp_path / "state")
    cases = [
        (admin, ["request", "--state-dir", str(tmp_path / "typo"), "--site", "h0"], "no journal at"),
        (admin, ["request", "--state-dir", state, "--site", "h9"], "unknown site 'h9'"),
        (admin, ["request", "--state-dir", state, "--site", "h0\n"], "request site must match"),
        (admin, ["status", "--state-dir", str(tmp_path / "typo")], "no journal at"),
    ]
    for fn, argv, expect in cases:
        assert fn(argv) == 2
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "typo").exists()  # a mistyped state directory creates nothing
    # an erased site cannot be asked for again
    submit_to_inbox(tmp_path / "h1", new_request("h1"))
    start(tmp_path, 3)
    assert admin(["request", "--state-dir", state, "--site", "h1"]) == 2
    assert "already been erased" in capsys.readouterr().err
    # a corrupt journal
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "journal.sqlite").write_bytes(b"not a database" * 100)
    assert admin(["status", "--state-dir", str(bad)]) == 2
    assert "not a readable journal" in capsys.readouterr().err
    # the site's tool: an inbox that is a file; a malformed pending file in --status
    (tmp_path / "afile").write_text("x")
    assert site(["--inbox", str(tmp_path / "afile"), "--site", "h0"]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "h0" / "pending").mkdir(parents=True, exist_ok=True)
    (tmp_path / "h0" / "pending" / "junk.json").write_bytes(b"\xff\xfe")
    assert site(["--inbox", str(tmp_path / "h0"), "--status"]) == 0
    assert "junk.json: unreadable" in capsys.readouterr().out
