"""A deployed federation serving erasure requests: durable, resumable, audited (``mode = "service"``).

Round ``r`` of the service:

1. **Poll** every site still in the federation (``query.erasure``), handing back the
   verdicts on what it sent last time (``acks`` / ``refused``). The poll for round ``r + 1``
   is pushed at the start of round ``r`` and answered while the sites train; only a run's
   first round waits for its poll (in Flower's simulation, where a node may run two messages
   at once, every round waits for it). Each request it sends is
   validated (:func:`fed_unlearn.erasure.parse_request`) and checked against the sender's
   identity: a node may only ask for the erasure of the site it is (the site registry
   binds site names to authenticated node ids). Valid requests are written to the
   journal (on disk) before they are acknowledged; the others are journaled as refusals.
   Operators add requests directly to the journal (``server.erasure_admin``) or through
   the run config (``service.erase-sites``).
2. **Serve** the pending requests: the journal marks them ``unlearning`` (committed before
   any message is sent), the site's data is measured with the current model (the
   "before" of the audit; pushed right behind the round's training messages, so a site
   measures as soon as it has replied, read after the round), and the strategy runs the
   configured method in this round's training. A site that is not connected or does not
   answer leaves its request pending (one attempt counted); after
   ``service.fallback-after`` attempts the data-free fallback applies (or, with ``wait``,
   the request stays open and is reported).
3. **Train** (FedAvg, or the unlearning round) and **evaluate** the sites that stay.
4. **Commit** the model, the round and who left, together with the round's request
   transitions, in one journal transaction (the checkpoint a restart resumes from).
5. **Audit** requests whose recovery rounds are done: the leakage audit on the erased
   site's data (if it still answers), utility of the others, the gold's figures if
   ``service.audit-gold``, and the model hashes; the JSON report is written and the
   request becomes ``verified``.

After a crash (even ``kill -9``), the next run with the same ``service.state-dir``
resumes after the last committed round; requests whose unlearning round was not
committed are served again (exactly once in the model that carries on).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fed_unlearn import protocol as P
from fed_unlearn.attacks import ATTACKS, erasure_verdict, leakage_summary, roc_on_grid
from fed_unlearn.certificate import load_or_create_key, render_html, sign
from fed_unlearn.config import ExperimentConfig, ServiceConfig
from fed_unlearn.erasure import RequestError, SiteRegistry, parse_request
from fed_unlearn.evaluation import summarise
from fed_unlearn.flower import FederationRun, PromptGrid, run_rounds, to_record, to_weights
from fed_unlearn.flower.grid import RidingGrid, collect, one_message_at_a_time
from fed_unlearn.gold_cache import code_fingerprint
from fed_unlearn.journal import Journal, StateDirLock, check_state_dir, weights_digest
from fed_unlearn.metrics import average_gap
from fed_unlearn.models import get_weights
from fed_unlearn.report import plot_roc, write_json
from fed_unlearn.task import load_task
from fed_unlearn.unlearning import make_method, method_class, online_methods

from .federations import gold_federation, initial_model, new_strategy, reference_federations
from .membership import Membership
from .queries import audit_messages, last_line, measure, read_measurements, strong_audit_scores

#: Requests taken from one site's poll per round (the rest wait for the next poll).
MAX_REQUESTS_PER_POLL = 50
#: What the leakage audit keeps of a site's measurements.
AUDIT_KEYS = ("forget-acc", "forget-heldout-acc", "forget-loss", "mia-auc", "mia-entropy-auc")


def service_methods() -> list[str]:
    """Methods a long-running service can erase a site with: one round, no stored history, serving whole clients."""
    return [m for m in online_methods() if "client" in method_class(m).scenarios]


def check_service(cfg: ExperimentConfig, svc: ServiceConfig) -> SiteRegistry | None:
    """The service's settings checked before any message (also by a deployment before it submits a run).

    Returns the site registry, if one is configured.

    Raises
    ------
    ValueError
        Naming the setting: a method that cannot serve, a site registry that does not read,
        an operator request for a site it does not know, a state directory whose journal is lost.
    """
    usable = service_methods()
    if cfg.request.method not in usable:
        raise ValueError(
            f"unlearn.method '{cfg.request.method}' cannot serve requests in a long-running federation "
            f"(it stores history, retrains or does not erase sites); use one of {', '.join(usable)}"
        )
    registry = SiteRegistry.from_file(svc.sites_file) if svc.sites_file else None
    unknown = sorted(set(svc.erase_list) - set(registry.sites)) if registry else []
    if unknown and registry is not None:
        raise ValueError(f"service.erase-sites names unknown site(s) {unknown}; registered: {sorted(registry.sites)}")
    check_state_dir(svc.state_dir)
    return registry


def operator_request_id(site: str) -> str:
    """Stable id of the run-config request for ``site`` (a rerun does not serve it twice)."""
    return hashlib.sha256(f"run-config:{site}".encode()).hexdigest()[:32]


class AuditAhead(NamedTuple):
    """The serving round's measurements of the model before unlearning, pushed with its training."""

    ids: list[str]  # the audit messages' ids
    measured: dict[int, int]  # client -> node of the sites asked
    staying: set[int]  # the clients who stay
    by_site: dict[str, list[str]]  # site -> the request ids served
    known: dict[int, dict[str, float]]  # what the last round's evaluation measured of the staying clients


class ErasureService:
    """The state of one service run (see the module docstring)."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, svc: ServiceConfig, run_config: dict[str, Any]) -> None:
        registry = check_service(cfg, svc)
        self.grid, self.cfg, self.svc, self.run_config = grid, cfg, svc, run_config
        self.state_dir = Path(svc.state_dir)
        check_state_dir(self.state_dir)  # a lost journal must not restart a federation its certificates erased
        self.journal = Journal(self.state_dir / "journal.sqlite")
        ck = self.journal.checkpoint()
        known: dict[str, int] = dict(ck.state.get("sites", {})) if ck else {}
        self.gone_sites = set(ck.state.get("departed-sites", [])) if ck else set()
        self.excluded_sites = set(ck.state.get("excluded-sites", [])) if ck else set()
        # a site's replies may not weigh more than its registered size, or than what it described when it
        # first joined (kept in the checkpoint: a restarted node cannot raise it)
        self.declared: dict[str, int] = dict(ck.state.get("declared", {})) if ck else {}
        task = load_task(cfg.data.task)
        check = None if task.builtin else to_record(get_weights(task.model(run_config)))
        # every connected site each round (none is waited for: a site that is down just misses the round)
        self.strategy = new_strategy(
            None,
            1,
            evaluate_departed=False,
            on_missing="skip",
            calibrate=cfg.request.calibrate,
            memorisation_z=cfg.request.memorisation_z,
            support_floor=cfg.request.support_floor,
            utility_tolerance=cfg.request.utility_tolerance,
            max_strikes=svc.max_strikes,
        )
        self.members = Membership(
            grid,
            self.journal,
            self.strategy,
            registry,
            known,
            self.gone_sites,
            self.excluded_sites,
            self.declared,
            ck.state.get("strikes", {}) if ck else {},  # a restart forgives nothing
            cfg.federation.round_timeout,
            check,
        )
        # a restart waits only for the sites still in the federation (erased and excluded ones may be gone for
        # good), and not forever for those: the others carry on, the absent ones rejoin when they connect
        expected = (
            set(known) - self.gone_sites - self.excluded_sites if ck else set(registry.sites) if registry else None
        )
        self.members.connect(expected, cfg.federation.node_wait_seconds)
        self.sites, self.node_of, self.clients = self.members.sites, self.members.node_of, self.members.clients
        if ck is not None and known and not set(known) & {self.site_of[c] for c in self.node_of}:
            raise RuntimeError(
                f"the checkpoint in {self.state_dir} belongs to another federation (sites {known}, "
                f"now {sorted(self.site_of[c] for c in self.node_of)})"
            )
        bad = sorted(set(svc.erase_list) - set(self.sites))
        if bad:
            raise ValueError(
                f"service.erase-sites names unknown site(s) {bad}; the federation has {sorted(self.sites)}"
            )
        first = self.clients[min(self.clients)]
        self.initial = to_weights(check if check is not None else initial_model(task, run_config, first))
        self.resumed_from = ck.server_round if ck else 0
        self.weights = ck.weights if ck else dict(self.initial)
        self.stale = self.journal.reconcile()
        self.in_flight: list[str] = []
        # the serving round's measurements of the model before unlearning, pushed with its training
        self.audit_ahead: AuditAhead | None = None
        self.round_grid: RidingGrid | None = None  # the rounds' view of the grid (while they run)
        self.ahead_ok = one_message_at_a_time(grid)  # queries ride ahead of a round only where that is safe
        self.before_details: dict[str, dict[str, Any]] = {}
        self.verdicts: dict[int, dict[str, list[str]]] = {}  # node -> {"acks": [...], "refused": [...]}
        # the next round's poll, pushed ahead: (message ids, the verdicts each node's message carries)
        self.ahead: tuple[list[str], dict[int, dict[str, list[str]]]] | None = None
        self.history: dict[int, dict[str, float]] = {}
        for site in svc.erase_list:
            if self.journal.add(operator_request_id(site), site, "operator:run-config", self.resumed_from):
                log(INFO, "operator request (run config): erase site %r", site)

    # -- 1. intake ----------------------------------------------------------------------
    @property
    def site_of(self) -> dict[int, str]:
        """Partition -> site name."""
        return self.members.site_of

    @property
    def active(self) -> list[int]:
        """Client ids of the sites still in the federation."""
        return sorted(c for c, n in self.node_of.items() if n not in self.strategy.departed | self.strategy.excluded)

    @property
    def departed_clients(self) -> set[int]:
        """Client ids of the sites that have left."""
        return {c for c, n in self.node_of.items() if n in self.strategy.departed}

    def poll(self, rnd: int) -> None:
        """Take the sites' requests for round ``rnd``, then ask them again for the next round.

        The next round's poll is pushed without waiting (the sites answer it while they train
        and evaluate) and its replies are read at the start of that round, so only a run's
        first round spends a message exchange on the poll (where nodes take their messages one at a
        time, :func:`~fed_unlearn.flower.grid.one_message_at_a_time`; in Flower's simulation every
        round asks and waits). A request a site files during a
        round is therefore served one round later than a synchronous poll would; a reply that
        has not arrived by then is dropped (the site resends unacknowledged requests, and its
        verdicts are sent again).
        """
        if self.ahead is not None:
            ids, owed = self.ahead
            self.ahead = None
            replies = list(self.grid.pull_messages(ids)) if ids else []
        else:  # the run's first round: ask and wait
            msgs, owed = self._poll_messages(rnd)
            replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout)) if msgs else []
        self._take_poll(rnd, replies, owed)
        if rnd < self.cfg.federation.num_server_rounds and self.ahead_ok:
            msgs, owed = self._poll_messages(rnd + 1)
            self.ahead = (list(self.grid.push_messages(msgs)) if msgs else [], owed)

    def _poll_messages(self, rnd: int) -> tuple[list[Message], dict[int, dict[str, list[str]]]]:
        """Poll messages to every connected site in the federation (and any gone site still owed a
        verdict), each carrying the verdicts owed to it; returns them and what each one carries."""
        client_of = {n: c for c, n in self.node_of.items()}
        connected = set(self.grid.get_node_ids())  # a node that is down would make the poll wait for its timeout
        asked = sorted(
            c for c in set(self.active) | {client_of[n] for n in self.verdicts} if self.node_of[c] in connected
        )
        msgs = []
        owed: dict[int, dict[str, list[str]]] = {}
        for cid in asked:
            v = owed[self.node_of[cid]] = self.verdicts.pop(self.node_of[cid], {})
            cfg = ConfigRecord(
                {
                    "server-round": rnd,
                    **({P.ACKS: v["acks"]} if v.get("acks") else {}),
                    **({P.REFUSED: v["refused"]} if v.get("refused") else {}),
                }
            )
            msgs.append(Message(RecordDict({"config": cfg}), self.node_of[cid], P.ERASURE))
        return msgs, owed

    def _take_poll(self, rnd: int, replies: list[Message], owed: dict[int, dict[str, list[str]]]) -> None:
        """Journal the requests in the poll's replies; verdicts not delivered are owed again."""
        client_of = {n: c for c, n in self.node_of.items()}
        answered: set[int] = set()
        for reply in replies:
            nid = reply.metadata.src_node_id
            if nid not in client_of or nid not in owed:
                continue
            sender = self.site_of[client_of[nid]]
            if reply.has_error() or P.ERASURE_RECORD not in reply.content.config_records:
                why = last_line(reply.error.reason) if reply.has_error() else "no 'erasure' record in its reply"
                log(WARNING, "round %d: the erasure poll of site %r failed (%s); retried next round", rnd, sender, why)
                self.journal.event(rnd, f"site:{sender}", "poll-failed", why)
                continue
            answered.add(nid)
            record = reply.content.config_records[P.ERASURE_RECORD]
            texts, files, problems = (record.get(k, []) for k in ("requests", "files", "problems"))
            texts = texts if isinstance(texts, list) else []
            files = files if isinstance(files, list) and len(files) == len(texts) else [""] * len(texts)
            problems = problems if isinstance(problems, list) and len(problems) == len(texts) else [""] * len(texts)
            verdict = self.verdicts.setdefault(nid, {"acks": [], "refused": []})
            for text, name, problem in list(zip(texts, files, problems, strict=False))[:MAX_REQUESTS_PER_POLL]:
                if problem:
                    self._refuse_file(str(name), sender, nid, rnd, str(problem)[:500], verdict)
                else:
                    self._intake(str(text), str(name), sender, nid, rnd, verdict)
        for nid, v in owed.items():  # verdicts a site did not receive are sent again with the next poll
            if nid not in answered and (v.get("acks") or v.get("refused")):
                mine = self.verdicts.setdefault(nid, {"acks": [], "refused": []})
                mine["acks"] = list(dict.fromkeys(v.get("acks", []) + mine["acks"]))
                mine["refused"] = list(dict.fromkeys(v.get("refused", []) + mine["refused"]))

    def _refuse_file(
        self, name: str, sender: str, nid: int, rnd: int, problem: str, verdict: dict[str, list[str]]
    ) -> None:
        """A file in a site's inbox that is not a request at all (unreadable, too large, a folder)."""
        self.journal.refuse(f"node {nid} ({sender})", None, f"inbox file {name!r}: {problem}", "", rnd)
        if name:
            verdict["refused"].append(name)
        log(WARNING, "refused inbox file %r of site %r: %s", name, sender, problem)

    def _intake(self, text: str, name: str, sender: str, nid: int, rnd: int, verdict: dict[str, list[str]]) -> None:
        try:
            req = parse_request(text)
        except RequestError as exc:
            self.journal.refuse(f"node {nid} ({sender})", None, f"malformed: {exc}", text[:2000], rnd)
            if name:
                verdict["refused"].append(name)  # filed away by name: it would be resent forever
            log(WARNING, "refused a malformed request from %s: %s", sender, exc)
            return
        reason = None
        if req.site not in self.sites:
            reason = f"unknown site {req.site!r}"
        elif req.site != sender:
            reason = f"site {sender!r} may not request the erasure of site {req.site!r}"
        if reason is not None:
            self.journal.refuse(f"node {nid} ({sender})", req.site, reason, req.to_dict(), rnd)
            verdict["refused"].append(req.id)
            log(WARNING, "refused request %s: %s", req.id, reason)
            return
        if self.journal.add(req.id, req.site, f"site:{sender}", rnd, req.reason):
            log(INFO, "journaled erasure request %s of site %r", req.id, req.site)
        verdict["acks"].append(req.id)  # journaled (now or before): the site may stop resending

    # -- 2. serving ------------------------------------------------------------------------
    def maybe_serve(self, rnd: int, arrays: ArrayRecord) -> None:
        """Start serving the pending requests of sites still in the federation."""
        if self.strategy.pending or self.strategy.queue:
            return
        gone = self.gone_sites | {self.site_of[c] for c in self.departed_clients}
        pending = [r for r in self.journal.requests("pending") if r.site not in gone]
        if not pending:
            return
        late = [r for r in pending if r.attempts >= self.svc.fallback_after and self.svc.fallback != "wait"]
        batch = late or pending
        name = self.svc.fallback if late else self.cfg.request.method
        method = make_method(name, self.run_config)
        connected = set(self.grid.get_node_ids())
        absent = (
            [r for r in batch if self.node_of.get(self.sites[r.site]) not in connected]
            if method.departing_clients_train
            else [r for r in batch if self.sites[r.site] not in self.node_of]  # not seen in this run yet
        )
        if absent:
            ids = [r.id for r in absent]
            self.journal.start_unlearning(ids, rnd, name)
            self.journal.back_to_pending(ids, rnd, "site not connected")
            log(WARNING, "sites %s are not connected: their requests stay pending", [r.site for r in absent])
        batch = [r for r in batch if r not in absent]
        # one request per site (a site that asked twice is served once)
        by_site: dict[str, list[str]] = {}
        for r in batch:
            by_site.setdefault(r.site, []).append(r.id)
        if not by_site:
            return
        cids = [self.sites[s] for s in by_site]
        # the erased sites' data and the others' utility, both with the model before unlearning: pushed
        # with the round's training where needed (a site takes both messages back to back), read after the round
        staying = {c: self.node_of[c] for c in self.active if c not in cids and self.node_of[c] in connected}
        # the sites who stay measured this model in the last round's evaluation, on the same data: what
        # they measured stands; an audit only where it is missing (fewer tasks beside the round's training)
        known = self._evaluated(rnd - 1, staying)
        # a site that is not connected (served by a data-free method) is not waited for
        measured = {
            **{c: self.node_of[c] for c in cids if self.node_of.get(c) in connected},
            **{c: n for c, n in staying.items() if c not in known},
        }
        msgs = audit_messages(measured, arrays, None, forget_all=cids)
        audit_ids: list[str] = []
        if self.ahead_ok and self.round_grid is not None:
            # right behind the round's training: a site measures as soon as it has replied, while the
            # server waits for the slowest site and aggregates (and it is awake for the calibration)
            self.round_grid.ride_behind(MessageType.TRAIN, msgs, audit_ids.extend, tag="audit")
        else:
            audit_ids.extend(self.grid.push_messages(msgs))
        self.audit_ahead = AuditAhead(audit_ids, measured, set(staying), dict(by_site), known)
        if not self.ahead_ok:
            self._take_audit_ahead()  # nodes that may take two messages at once: read before the round
        digest = weights_digest(to_weights(arrays))
        details = {rid: {"model-before": digest, "fallback": bool(late)} for ids in by_site.values() for rid in ids}
        self.in_flight = [rid for ids in by_site.values() for rid in ids]
        self.journal.start_unlearning(self.in_flight, rnd, name, details)
        self.strategy.request_unlearning(
            *(self.node_of[c] for c in cids),
            key=None,
            round=rnd,
            leave=True,
            method=method,
            extra_config={P.FORGET_ALL: True},
        )
        log(INFO, "round %d: serving the erasure of %s with %s", rnd, sorted(by_site), name)

    # -- 5. audit ------------------------------------------------------------------------
    def audit(self, rnd: int, arrays: ArrayRecord, request_ids: list[str]) -> None:
        """Write the audit report of every recovered request and mark it verified."""
        for rid in request_ids:
            req = self.journal.get(rid)
            cid = self.sites[req.site]
            reach = (
                {cid: self.node_of[cid]}
                if cid in self.node_of and self.node_of[cid] in set(self.grid.get_node_ids())
                else {}
            )
            after_m = (
                measure(
                    self.grid,
                    reach,
                    arrays,
                    None,
                    self.cfg.federation.round_timeout,
                    forget_all=[cid],
                    allow_missing=True,
                ).get(cid)
                if reach
                else None
            )
            after = {k: v for k, v in summarise({0: after_m}).items() if k in AUDIT_KEYS} if after_m else None
            report: dict[str, Any] = {
                "request": {
                    "id": req.id,
                    "site": req.site,
                    "requested-by": req.requested_by,
                    "reason": req.reason,
                    "attempts": req.attempts,
                },
                "client-id": cid,
                "method": req.method,
                "fallback-used": bool(req.details.get("fallback")),
                "rounds": {
                    "received": req.received_round,
                    "unlearning": req.unlearning_round,
                    "served": req.served_round,
                    "recovered": req.recovered_round,
                    "recovery-rounds": self.svc.recovery_rounds,
                },
                "model-sha256": {
                    "before": req.details.get("model-before"),
                    "after-unlearning": req.details.get("model-after-unlearning"),
                    "after-recovery": weights_digest(to_weights(arrays)),
                },
                "leakage-audit": {
                    "site-reachable": after is not None,
                    "before": req.details.get("before"),
                    "after": after,
                    "reading": (
                        "after unlearning the site's training data should look like data the model never saw: "
                        "forget-acc close to forget-heldout-acc, MIA AUCs close to 0.5 (or to the gold's)"
                    ),
                },
                "utility": {
                    "test-acc-before": req.details.get("test-acc-before"),
                    "test-acc-after": self.history.get(rnd, {}).get("test-acc"),
                },
                "journal": self.journal.history(rid),
                "written-at": time.time(),
            }
            gold = None
            if self.svc.audit_gold:
                report["gold"], gold = self._gold_audit(req, cid, arrays)
            images: dict[str, bytes] = {}
            if self.cfg.audit.references and reach:
                try:
                    report["strong-audit"], images = self._strong_audit(req, cid, arrays, gold, reach)
                except (RuntimeError, ValueError) as exc:  # costs the audit, never the service
                    log(WARNING, "strong audit of request %s failed: %s", rid, last_line(str(exc)))
                    report["strong-audit-error"] = last_line(str(exc))
            path = write_json(self.state_dir / "audit" / f"{rid}.json", report)
            self._certify(rid, report, images)
            self.journal.set_verified(rid, str(path), rnd)
            log(INFO, "audit of request %s (site %r) written to %s", rid, req.site, path)

    def _audit_config(self, req: Any, departing: tuple[int, ...] = ()) -> ExperimentConfig:
        """The settings of a retrained federation up to the request's round (cached in the state directory)."""
        return replace(
            self.cfg,
            request=replace(self.cfg.request, departing=departing, round=int(req.unlearning_round)),
            output=replace(self.cfg.output, gold_cache_dir=str(self.state_dir / "gold-cache")),
        )

    def _strong_audit(
        self, req: Any, cid: int, arrays: ArrayRecord, gold: ArrayRecord | None, reach: dict[int, int]
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """RMIA and LiRA on the erased site's samples, calibrated with reference federations; the ROC plot."""
        members = sorted((set(self.clients) - self.departed_clients) | {cid})
        refs, cost = reference_federations(
            self.grid, self._audit_config(req), self.clients, to_record(self.initial), members=members
        )
        seed, timeout = self.cfg.data.seed, self.cfg.federation.round_timeout

        def scores(model: ArrayRecord) -> dict[str, Any]:
            return strong_audit_scores(self.grid, reach, model, refs, seed, timeout, [cid])

        audited = {"after": scores(arrays)}
        if gold is not None:
            audited["gold"] = scores(gold)
        figures = leakage_summary(audited, target="gold" if gold is not None else None)
        consistent, verdict = erasure_verdict(figures["after"], figures.get("gold"))
        roc = roc_on_grid(audited, "rmia")
        png = self.state_dir / "audit" / f"{req.id}.roc.png"
        plot_roc(png, roc, title=f"RMIA on the training samples of site {req.site}")
        strong = {
            "figures": figures,
            "target": "the gold model (retrained without the site)" if gold is not None else "chance (TPR = FPR)",
            "consistent-with-erasure": consistent,
            "keys": [
                "members",
                "nonmembers",
                *(f"{a}-{k}" for a in ATTACKS for k in ("auc", "tpr@1%", "tpr@1%-low", "tpr@1%-high", "tpr@0.1%")),
                "rmia-tpr@1%-fpr-high",
                *(f"{a}-vs-gold-auc" for a in ATTACKS),
            ],
            "references": cost,
            "verdict": verdict,
            "reading": (
                "Per-sample attacks calibrated with reference federations trained on random halves of the data: "
                "members = the erased site's training samples, non-members = its held-out samples. A model "
                "that never saw the samples gives TPR = FPR (1 % at 1 % FPR); the gold, when trained, is a "
                "model retrained without the site. TPR intervals are 95 % Clopper-Pearson."
            ),
        }
        return strong, {"rmia-roc.png": png.read_bytes()}

    def _certify(self, rid: str, report: dict[str, Any], images: dict[str, bytes]) -> None:
        """Sign the audit report as an erasure certificate (JSON and a self-contained HTML page)."""
        key = load_or_create_key(self.state_dir / "certificate-key.pem")
        received = next((t["at"] for t in report["journal"]), None)
        strong = report.get("strong-audit")
        weak = report["leakage-audit"]
        verdict = (
            strong["verdict"]
            if strong
            else f"strong audit failed: {report['strong-audit-error']}"
            if "strong-audit-error" in report
            else (
                "site not reachable: no leakage audit on its data"
                if not weak["site-reachable"]
                else "loss-threshold audit only (no reference federations: audit.references = 0)"
            )
        )
        payload = {
            **{k: v for k, v in report.items() if k != "journal"},
            "received-at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(received)) if received else None,
            "verdict": verdict,
            "server": {"federation-sites": sorted(self.sites), "code": code_fingerprint()},
        }
        cert = sign(payload, key, images)
        write_json(self.state_dir / "audit" / f"{rid}.certificate.json", cert)
        (self.state_dir / "audit" / f"{rid}.certificate.html").write_text(render_html(cert, images), encoding="utf-8")

    def _gold_audit(self, req: Any, cid: int, arrays: ArrayRecord) -> tuple[dict[str, Any], ArrayRecord]:
        """Retrain without every site erased so far up to the request's round; compare."""
        gone = tuple(sorted(self.departed_clients | {cid}))
        gcfg = self._audit_config(req, departing=gone)
        info = {c: {"digest": "site"} for c in gone}
        gold, _ = gold_federation(self.grid, gcfg, self.clients, to_record(self.initial), info)
        everyone = dict(self.node_of)
        models = {"unlearned": arrays, "gold": gold}
        rep = {
            k: summarise(
                measure(
                    self.grid,
                    everyone,
                    a,
                    gold,
                    self.cfg.federation.round_timeout,
                    forget_all=[cid],
                    allow_missing=True,
                )
            )
            for k, a in models.items()
        }
        rep["unlearned"]["average-gap"] = average_gap(rep["unlearned"], rep["gold"])
        return rep, gold

    # -- the loop ---------------------------------------------------------------------------
    def _evaluated(self, rnd: int, clients: dict[int, int]) -> dict[int, dict[str, float]]:
        """What ``clients`` measured in round ``rnd``'s evaluation (of the model the next round starts from),
        where it holds the figures of an audit (this ClientApp's evaluation does); none from another round."""
        last = self.strategy.last_evaluation
        if last is None or last[0] != rnd:
            return {}
        return {c: last[1][n] for c, n in clients.items() if n in last[1] and "test-n" in last[1][n]}

    def _take_audit_ahead(self) -> None:
        """Read the measurements of the model before unlearning pushed with the serving round (``maybe_serve``)."""
        if self.audit_ahead is None:
            return
        ids, measured, staying, by_site, known = self.audit_ahead
        self.audit_ahead = None
        late = self.round_grid.cancel_riders("audit") if self.round_grid is not None and not ids else []
        if late:  # no training exchange carried them (no site trained in the round): asked now
            replies = list(self.grid.send_and_receive(late, timeout=self.cfg.federation.round_timeout))
        else:
            replies = collect(self.grid, ids, self.cfg.federation.round_timeout)
        before = {**known, **read_measurements(replies, measured, allow_missing=True)}
        others = {c: before[c] for c in staying if c in before}
        test_before = summarise(others).get("test-acc") if others else None
        for site, rids in by_site.items():
            b = before.get(self.sites[site])
            for rid in rids:
                self.before_details[rid] = {
                    "test-acc-before": test_before,
                    "before": {k: v for k, v in summarise({0: b}).items() if k in AUDIT_KEYS} if b else None,
                }

    def run(self) -> dict[str, Any]:
        """Rounds ``resumed_from + 1 .. num-server-rounds``; returns the service summary."""
        start = self.resumed_from + 1
        if self.stale:
            log(
                WARNING,
                "restart: requests %s were being unlearned in an uncommitted round; serving them again",
                self.stale,
            )
        log(
            INFO,
            "service: sites %s, rounds %d..%d, method %s",
            self.sites,
            start,
            self.cfg.federation.num_server_rounds,
            self.cfg.request.method,
        )
        serving: list[str] = []
        # a crash between a recovery round's commit and its certificate: the audit is owed (it reads that model)
        unaudited = [r.id for r in self.journal.requests("recovered")]

        def before(rnd: int, arrays: ArrayRecord) -> None:
            self.journal.event(rnd, "server", "round-start", f"round {rnd}")
            self.members.admit(rnd)  # sites that came (back) since the last round
            self.poll(rnd)
            self.maybe_serve(rnd, arrays)
            serving[:] = self.in_flight

        def after(rnd: int, arrays: ArrayRecord, summary: dict[str, float]) -> None:
            self._journal_problems(rnd)
            self._take_audit_ahead()
            served: list[str] = []
            if serving and self.strategy.failed:
                self.journal.back_to_pending(serving, rnd, "a site to forget did not reply")
                for rid in serving:
                    self.before_details.pop(rid, None)
                self.in_flight = []
            elif serving and not self.strategy.pending and not self.strategy.queue:
                served, self.in_flight = list(serving), []
            self.history[rnd] = dict(summary)
            weights = to_weights(arrays)
            digest = weights_digest(weights)
            served_at = {
                r.id: r.served_round for r in self.journal.requests("unlearning") if r.served_round is not None
            }
            recovered = [i for i, at in served_at.items() if rnd - at >= self.svc.recovery_rounds]
            if self.svc.recovery_rounds == 0:
                recovered += served
            self.gone_sites |= {self.site_of[c] for c in self.departed_clients}
            state = {
                "sites": self.sites,
                "departed-sites": sorted(self.gone_sites),
                "departed": sorted(self.departed_clients),
                "declared": self.declared,
                "excluded-sites": sorted(self.excluded_sites),
                "strikes": {
                    **{s: n for s, n in self.members.strikes.items() if self.sites.get(s) not in self.node_of},
                    **{
                        self.site_of[c]: int(self.strategy.strikes[n])
                        for c, n in self.node_of.items()
                        if self.strategy.strikes[n]
                    },
                },
            }
            self.journal.commit_round(
                rnd,
                weights,
                state,
                served=served,
                recovered=recovered,
                details={rid: {**self.before_details.pop(rid, {}), "model-after-unlearning": digest} for rid in served},
            )
            log(
                INFO,
                "[service] round %d committed: test-acc %.4f, %d sites, served %s, recovered %s",
                rnd,
                summary.get("test-acc", float("nan")),
                len(self.active),
                served,
                recovered,
            )
            if recovered:
                self.audit(rnd, arrays, recovered)

        if unaudited:
            log(WARNING, "restart: requests %s were recovered but not audited; auditing them now", unaudited)
            self.audit(self.resumed_from, to_record(self.weights), unaudited)
        interval = self.grid.interval if isinstance(self.grid, PromptGrid) else 0.1
        # nodes that are no checked site get nothing
        self.round_grid = RidingGrid(self.grid, self.members.hidden, interval)
        run_rounds(
            self.round_grid,
            self.strategy,
            FederationRun(arrays=to_record(self.weights)),
            range(start, self.cfg.federation.num_server_rounds + 1),
            self.cfg.federation.round_timeout,
            "service",
            before_round=before,
            after_round=after,
            fail_on_empty=False,
        )
        return self.summary()

    def _journal_problems(self, rnd: int) -> None:
        """Journal the replies the round did not use, and the sites excluded for them."""
        client_of = {n: c for c, n in self.node_of.items()}
        for node, problem in sorted(self.strategy.last_round_problems.items()):
            if problem == "ok" or node not in client_of:
                continue
            site = self.site_of[client_of[node]]
            self.journal.event(
                rnd, f"site:{site}", "failed" if problem.startswith("failed") else "rejected-update", problem
            )
        for node in sorted(self.strategy.excluded):
            gone = self.site_of.get(client_of.get(node, -1))
            if gone is not None and gone not in self.excluded_sites:
                self.excluded_sites.add(gone)
                self.journal.event(
                    rnd,
                    f"site:{site}",
                    "excluded",
                    f"{self.strategy.strikes[node]} invalid replies: no longer part of the federation",
                )
                log(WARNING, "site %r is excluded after %d invalid replies", site, self.strategy.strikes[node])

    def summary(self) -> dict[str, Any]:
        """``service.json``: rounds of this run, every request and refusal."""
        out = {
            "sites": self.sites,
            "resumed-from-round": self.resumed_from,
            "re-served-after-restart": self.stale,
            "history": {str(r): h for r, h in self.history.items()},
            "requests": [{**r.__dict__} for r in self.journal.requests()],
            "refusals": self.journal.refusals(),
            "events": self.journal.events(),
            "excluded-sites": sorted(self.excluded_sites),
            "open-requests": [r.id for r in self.journal.requests() if r.state in ("pending", "unlearning")],
        }
        write_json(self.state_dir / "service.json", out)
        return out


def run_service(grid: Grid, cfg: ExperimentConfig, svc: ServiceConfig, run_config: dict[str, Any]) -> dict[str, Any]:
    """Build the service (bad settings fail before any round) and run it.

    One service process per state directory: a restart waits (up to ``node-wait-seconds``)
    for a previous ServerApp that is still dying to release the directory.
    """
    with StateDirLock(svc.state_dir, timeout=cfg.federation.node_wait_seconds):
        service = ErasureService(grid, cfg, svc, run_config)
        try:
            return service.run()
        finally:
            service.journal.close()


def describe(state_dir: str | Path) -> str:
    """A short text status of a service's journal (for operators and logs)."""
    with Journal(Path(state_dir) / "journal.sqlite", create=False) as j:
        ck = j.checkpoint()
        lines = [f"checkpoint: round {ck.server_round} ({ck.digest[:12]})" if ck else "checkpoint: none"]
        lines += [f"{r.id} {r.site} {r.state} attempts={r.attempts} by={r.requested_by}" for r in j.requests()]
        lines += [f"refused: {x['named-site']} from {x['source']}: {x['reason']}" for x in j.refusals()]
        lines += [
            f"event round {x['server-round']}: {x['kind']} {x['source']}: {x['detail']}"
            for x in j.events()
            if x["kind"] != "round-start"
        ]
        return "\n".join(lines) + "\n" + json.dumps({"open": [r.id for r in j.requests() if r.state != "verified"]})
