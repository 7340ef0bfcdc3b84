"""The durable erasure-request journal and the server's checkpoint, in one SQLite file.

Every erasure request is written here (and the write is on disk: ``synchronous=FULL``,
one transaction per change) *before* the site is told it was received. A request
moves through

    pending -> unlearning -> recovered -> verified

* ``pending``: acknowledged, not yet served (also after a failed attempt: the site
  did not reply, or the server stopped before the unlearning round was committed);
* ``unlearning``: the unlearning round has started (``unlearning_round``); once that
  round's model is committed with the checkpoint, ``served_round`` is set and the
  recovery rounds run;
* ``recovered``: the recovery rounds are done;
* ``verified``: the audit report is written (``report``).

The global model, the round and the strategy's membership state (who left) are
checkpointed in the **same transaction** as the request transitions of that round,
so after a crash (even ``kill -9``) the journal and the model never disagree: a
request whose unlearning round was not committed goes back to ``pending`` and is
served again from a model that never saw its unlearning, i.e. exactly once in the
model that carries on. Refused requests (unknown site, a site naming another site,
malformed) are kept in their own table with the reason. Pure Python + numpy.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .erasure import safe_text

STATES = ("pending", "unlearning", "recovered", "verified")
#: Allowed transitions (``unlearning -> pending``: the attempt failed or was never committed).
TRANSITIONS = {
    ("pending", "unlearning"),
    ("unlearning", "pending"),
    ("unlearning", "recovered"),
    ("recovered", "verified"),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    received_at REAL NOT NULL,
    received_round INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    unlearning_round INTEGER,
    served_round INTEGER,
    recovered_round INTEGER,
    method TEXT,
    details TEXT NOT NULL DEFAULT '{}',
    report TEXT
);
CREATE TABLE IF NOT EXISTS transitions (
    request_id TEXT NOT NULL, at REAL NOT NULL, server_round INTEGER, old TEXT, new TEXT NOT NULL, note TEXT
);
CREATE TABLE IF NOT EXISTS refusals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, server_round INTEGER, source TEXT NOT NULL,
    named_site TEXT, reason TEXT NOT NULL, payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, server_round INTEGER, source TEXT NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1), server_round INTEGER NOT NULL, weights BLOB NOT NULL,
    state TEXT NOT NULL, digest TEXT NOT NULL, saved_at REAL NOT NULL
);
"""


class JournalError(ValueError):
    """A request or transition the journal refuses; nothing was written."""


@dataclass
class Request:
    """One erasure request as journaled."""

    id: str
    site: str
    requested_by: str
    state: str
    received_round: int
    reason: str = ""
    attempts: int = 0
    unlearning_round: int | None = None
    served_round: int | None = None
    recovered_round: int | None = None
    method: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    report: str | None = None


@dataclass
class Checkpoint:
    """The server's state after a committed round."""

    server_round: int
    weights: dict[str, np.ndarray]
    state: dict[str, Any]
    digest: str


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (sorted by name): a model's fingerprint."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(weights):
        a = np.ascontiguousarray(weights[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _to_blob(weights: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in weights.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def _from_blob(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob)) as z:
        return {k: z[k] for k in z.files}


class Journal:
    """The journal of one federation (one SQLite file; safe to open from several processes).

    Parameters
    ----------
    path : str or Path
        The SQLite file.
    create : bool
        Create it (and its folder) if missing; otherwise a missing journal is an error
        (an operator's mistyped state directory must not start a new, unread journal).

    Raises
    ------
    JournalError
        If the file is missing (``create=False``) or is not a readable journal.
    """

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise JournalError(f"no journal at {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")  # a committed transaction is on disk
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path} is not a readable journal ({exc})") from None

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transactions -----------------------------------------------------------------
    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def _transaction(self, fn: Any) -> Any:
        self._begin()
        try:
            out = fn()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return out

    # -- requests ---------------------------------------------------------------------
    def add(self, request_id: str, site: str, requested_by: str, server_round: int, reason: str = "") -> bool:
        """Journal a new request as ``pending``; ``False`` if this id is already journaled (a resend).

        Raises
        ------
        JournalError
            If the id or site is empty.
        """
        if not request_id or not site or not requested_by:
            raise JournalError("a request needs an id, a site and who requested it")
        # text from sites is stored whatever it holds (a lone surrogate would make SQLite raise at every poll)
        request_id, site, requested_by, reason = (safe_text(x) for x in (request_id, site, requested_by, reason))

        def write() -> bool:
            if self._db.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone():
                return False
            now = time.time()
            self._db.execute(
                "INSERT INTO requests (id, site, requested_by, reason, state, received_at, received_round) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                (request_id, site, requested_by, reason, now, server_round),
            )
            self._db.execute(
                "INSERT INTO transitions VALUES (?, ?, ?, NULL, 'pending', ?)",
                (request_id, now, server_round, requested_by),
            )
            return True

        return bool(self._transaction(write))

    def refuse(
        self,
        source: str,
        named_site: str | None,
        reason: str,
        payload: Mapping[str, Any] | str,
        server_round: int | None,
    ) -> None:
        """Record a refused request (who sent it, what it named, why); the same refusal again is recorded once."""
        text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True, default=str)
        body = safe_text(text, 2000)
        source, reason = safe_text(source, 500), safe_text(reason, 2000)
        named_site = None if named_site is None else safe_text(named_site, 200)
        seen = self._db.execute(
            "SELECT 1 FROM refusals WHERE source = ? AND named_site IS ? AND reason = ? AND payload = ?",
            (source, named_site, reason, body),
        ).fetchone()
        if seen:  # a site resending what was refused before its verdict reached it (e.g. across a restart)
            return
        self._transaction(
            lambda: self._db.execute(
                "INSERT INTO refusals (at, server_round, source, named_site, reason, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), server_round, source, named_site, reason, body),
            )
        )

    def event(self, server_round: int | None, source: str, kind: str, detail: str) -> None:
        """Record what the service did not use or did to a site (a rejected update, an exclusion, a failed poll)."""
        self._transaction(
            lambda: self._db.execute(
                "INSERT INTO events (at, server_round, source, kind, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), server_round, safe_text(source, 500), kind, safe_text(detail, 2000)),
            )
        )

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Recorded events (optionally of one kind), oldest first."""
        sql = "SELECT seq, at, server_round, source, kind, detail FROM events"
        cur = self._db.execute(
            sql + (" WHERE kind = ? ORDER BY seq" if kind else " ORDER BY seq"), (kind,) if kind else ()
        )
        return [dict(zip(("seq", "at", "server-round", "source", "kind", "detail"), row, strict=False)) for row in cur]

    def refusals(self) -> list[dict[str, Any]]:
        """Every refused request, oldest first."""
        cur = self._db.execute(
            "SELECT seq, at, server_round, source, named_site, reason, payload FROM refusals ORDER BY seq"
        )
        return [
            dict(zip(("seq", "at", "server-round", "source", "named-site", "reason", "payload"), row, strict=True))
            for row in cur
        ]

    def get(self, request_id: str) -> Request:
        """One request.

        Raises
        ------
        JournalError
            If the id is not journaled.
        """
        rows = self._select("WHERE id = ?", (request_id,))
        if not rows:
            raise JournalError(f"no request '{request_id}' in the journal")
        return rows[0]

    def requests(self, state: str | None = None) -> list[Request]:
        """Requests (optionally in one state), in the order they were received."""
        if state is not None and state not in STATES:
            raise JournalError(f"unknown state '{state}'; valid: {', '.join(STATES)}")
        return self._select("WHERE state = ?", (state,)) if state else self._select("", ())

    def _select(self, where: str, args: tuple) -> list[Request]:
        cols = (
            "id",
            "site",
            "requested_by",
            "state",
            "received_round",
            "reason",
            "attempts",
            "unlearning_round",
            "served_round",
            "recovered_round",
            "method",
            "details",
            "report",
        )
        cur = self._db.execute(f"SELECT {', '.join(cols)} FROM requests {where} ORDER BY received_at, id", args)
        out = []
        for row in cur:
            d = dict(zip(cols, row, strict=False))
            d["details"] = json.loads(d["details"])
            out.append(Request(**d))
        return out

    def history(self, request_id: str) -> list[dict[str, Any]]:
        """The transitions of one request, oldest first."""
        cur = self._db.execute(
            "SELECT at, server_round, old, new, note FROM transitions WHERE request_id = ? ORDER BY rowid",
            (request_id,),
        )
        return [dict(zip(("at", "server-round", "old", "new", "note"), r, strict=False)) for r in cur]

    def _move(self, request_id: str, new: str, server_round: int | None, note: str = "", **columns: Any) -> None:
        row = self._db.execute("SELECT state, details FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            raise JournalError(f"no request '{request_id}' in the journal")
        old = row[0]
        if old != new and (old, new) not in TRANSITIONS:
            raise JournalError(f"request '{request_id}': {old} -> {new} is not a valid transition")
        if "details" in columns:
            merged = {**json.loads(row[1]), **columns["details"]}
            columns["details"] = json.dumps(merged, sort_keys=True, default=str)
        sets = ", ".join(["state = ?", *(f"{k} = ?" for k in columns)])
        self._db.execute(f"UPDATE requests SET {sets} WHERE id = ?", (new, *columns.values(), request_id))
        self._db.execute(
            "INSERT INTO transitions VALUES (?, ?, ?, ?, ?, ?)", (request_id, time.time(), server_round, old, new, note)
        )

    def start_unlearning(
        self, ids: Iterable[str], server_round: int, method: str, details: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """``pending -> unlearning`` for ``ids`` in ``server_round`` (one transaction; counts the attempt)."""

        def write() -> None:
            for rid in ids:
                attempts = self._db.execute("SELECT attempts FROM requests WHERE id = ?", (rid,)).fetchone()
                self._move(
                    rid,
                    "unlearning",
                    server_round,
                    method,
                    unlearning_round=server_round,
                    method=method,
                    attempts=(attempts[0] if attempts else 0) + 1,
                    details=dict((details or {}).get(rid, {})),
                )

        self._transaction(write)

    def back_to_pending(
        self, ids: Iterable[str], server_round: int | None, note: str, count_attempt: bool = True
    ) -> None:
        """``unlearning -> pending`` (the attempt failed, or was never committed).

        ``count_attempt = False``: the attempt was not the site's fault (the server stopped)
        and does not count towards the fallback.
        """

        def write() -> None:
            for rid in ids:
                extra = {} if count_attempt else {"attempts": max(0, self.get(rid).attempts - 1)}
                self._move(rid, "pending", server_round, note, unlearning_round=None, **extra)

        self._transaction(write)

    def set_verified(self, request_id: str, report: str, server_round: int | None = None) -> None:
        """``recovered -> verified`` with the path of the audit report."""
        self._transaction(lambda: self._move(request_id, "verified", server_round, "audit written", report=report))

    # -- checkpoint -------------------------------------------------------------------
    def commit_round(
        self,
        server_round: int,
        weights: Mapping[str, np.ndarray],
        state: Mapping[str, Any],
        served: Iterable[str] = (),
        recovered: Iterable[str] = (),
        details: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> str:
        """Checkpoint the round's model and state together with its request transitions (one transaction).

        ``served``: requests whose unlearning round this is (``served_round`` set);
        ``recovered``: requests whose recovery is done (``unlearning -> recovered``).
        Returns the model digest.
        """
        digest = weights_digest(weights)
        blob = _to_blob(weights)
        extra = details or {}

        def write() -> None:
            for rid in served:
                self._move(
                    rid,
                    "unlearning",
                    server_round,
                    "unlearning round committed",
                    served_round=server_round,
                    details=dict(extra.get(rid, {})),
                )
            for rid in recovered:
                self._move(
                    rid,
                    "recovered",
                    server_round,
                    "recovery done",
                    recovered_round=server_round,
                    details=dict(extra.get(rid, {})),
                )
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoint VALUES (1, ?, ?, ?, ?, ?)",
                (server_round, blob, json.dumps(dict(state), sort_keys=True), digest, time.time()),
            )

        self._transaction(write)
        return digest

    def checkpoint(self) -> Checkpoint | None:
        """The last committed checkpoint, or ``None``."""
        row = self._db.execute("SELECT server_round, weights, state, digest FROM checkpoint WHERE id = 1").fetchone()
        if row is None:
            return None
        try:
            return Checkpoint(int(row[0]), _from_blob(row[1]), json.loads(row[2]), row[3])
        except (zipfile.BadZipFile, ValueError, OSError, TypeError, KeyError, EOFError) as exc:
            raise JournalError(
                f"{self.path}: the checkpoint of round {row[0]} does not read ({type(exc).__name__}: {exc}); "
                "restore the file from a backup"
            ) from None

    def reconcile(self) -> list[str]:
        """After a restart: requests whose unlearning round was not committed go back to ``pending``.

        Returns their ids.
        """
        stale = [r.id for r in self.requests("unlearning") if r.served_round is None]
        if stale:
            self.back_to_pending(stale, None, "restart: unlearning round was not committed", count_attempt=False)
        return stale


def check_state_dir(state_dir: str | Path) -> None:
    """Refuse a state directory whose journal is gone while its erasures' traces remain.

    A missing or empty ``journal.sqlite`` beside audit reports or the certificate key means the
    record of what was erased is lost: starting anyway would begin a new federation that trains
    the erased sites again while their certificates still say they were erased.

    Raises
    ------
    JournalError
        Naming what is there and what to do.
    """
    state = Path(state_dir)
    db = state / "journal.sqlite"
    if db.is_file() and db.stat().st_size > 0:
        return
    audit = state / "audit"
    key = state / "certificate-key.pem"
    traces = [p.name for p in (audit, key) if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if traces:
        raise JournalError(
            f"{db} is {'empty' if db.exists() else 'missing'} but {state} holds {' and '.join(traces)} of earlier "
            "erasures: restore journal.sqlite from a backup (a new federation needs a new service.state-dir)"
        )


class StateDirBusy(RuntimeError):
    """Another process runs the service on the same state directory."""


class StateDirLock:
    """An exclusive lock on a service state directory (``flock`` on ``<dir>/service.lock``).

    Two ServerApps serving one federation would both train and both write the journal. A
    SuperLink crash can leave the old ServerApp process alive for a while (it lives in
    another session and retries its connection), so a restarted service waits for the lock
    up to ``timeout`` seconds, then fails with the holder's PID. The OS releases the lock
    when the holder dies, ``kill -9`` included.
    """

    def __init__(self, state_dir: str | Path, timeout: float = 0.0, poll: float = 0.5) -> None:
        self.path = Path(state_dir) / "service.lock"
        self.timeout, self.poll = timeout, poll
        self._fh: io.TextIOWrapper | None = None

    def acquire(self) -> StateDirLock:
        """Take the lock (waiting up to ``timeout``); raises :class:`StateDirBusy` if it stays held."""
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115  (held open for the lock's lifetime, closed in release())
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "unknown"
                    fh.close()
                    raise StateDirBusy(
                        f"{self.path.parent} is in use by another service process (pid {holder}); "
                        f"waited {self.timeout:.0f}s"
                    ) from None
                time.sleep(self.poll)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> StateDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
