"""Erasure requests of a deployed federation: their format, a site's inbox, the site registry.

A site asks to be forgotten by writing a request into its own *inbox*, a folder its
SuperNode's ClientApp reads (node-config ``erasure-inbox``): ``python -m
clients.request_erasure --inbox DIR --site NAME``. Each round the server polls the sites
(``query.erasure``); a site replies with the requests in ``<inbox>/pending/``. The server
checks them, journals the valid ones (:mod:`fed_unlearn.journal`) and only then
acknowledges them in its next poll; the site then moves the file to
``<inbox>/acknowledged/``. A resent request (the server stopped before acknowledging) is
recognised by its id. An operator can also journal a request on a site's behalf
(``python -m server.erasure_admin request``).

Who may ask: the **site registry** (a JSON file the operator writes when registering the
SuperNodes' public keys with ``flwr supernode register``, which returns each node id) binds
each site name to the node id the SuperLink authenticates. A request arriving from node
``n`` may only name the site bound to ``n``; anything else is refused and journaled as a
refusal. Without a registry (simulation, or a trusted loopback test) the site a node
names in ``query.info`` is taken as its identity, and the README says so.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol as P

SITE_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")
SCOPES = ("site",)
MAX_REASON = 500
#: Largest request file a site reads (a request is well under 1 KiB; 500 escaped characters of reason fit).
MAX_REQUEST_BYTES = 8 * 1024
#: Pending files a site hands over per poll (valid requests first; the rest wait for the next poll).
MAX_FILES_PER_POLL = 50
#: Pending files a site looks at per poll (oldest first), so a flooded inbox costs bounded work.
MAX_FILES_INSPECTED = 1000
#: A file that does not parse and changed less than this many seconds ago is still being written: retried.
SETTLE_SECONDS = 2.0
#: Latest accepted ``created`` time, relative to now (clocks differ; a request is not from the future).
MAX_CLOCK_SKEW = 86_400.0


class RequestError(ValueError):
    """A malformed erasure request."""


@dataclass(frozen=True)
class ErasureRequest:
    """A site's request to be forgotten.

    Attributes
    ----------
    id : str
        32 lowercase hex characters (a UUID4), chosen by the requester; the journal key.
    site : str
        The site to forget (letters, digits, ``.``, ``_``, ``-``; at most 64 characters).
    scope : str
        ``site``: all of the site's data (the site leaves the federation).
    reason : str
        Free text for the audit trail (at most 500 characters).
    created : float
        Unix time the request was written.
    """

    id: str
    site: str
    scope: str = "site"
    reason: str = ""
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"id": self.id, "site": self.site, "scope": self.scope, "reason": self.reason, "created": self.created}


def new_request(site: str, reason: str = "") -> ErasureRequest:
    """A fresh, valid request for ``site`` (validated like any incoming one)."""
    return parse_request(
        {"id": uuid.uuid4().hex, "site": site, "scope": "site", "reason": reason, "created": time.time()}
    )


def parse_request(payload: Any) -> ErasureRequest:
    """Validate an incoming request (a dict or a JSON string).

    Raises
    ------
    RequestError
        Naming the first problem: not an object, unknown or missing fields, bad id, site,
        scope or reason.
    """
    if isinstance(payload, (str, bytes)):
        if len(payload) > MAX_REQUEST_BYTES:
            raise RequestError(f"request is larger than {MAX_REQUEST_BYTES} bytes")
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise RequestError(f"request is not valid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # huge numbers, deep nesting, bad encodings
            raise RequestError(f"request cannot be parsed: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(payload, Mapping):
        raise RequestError(f"request must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"id", "site", "scope", "reason", "created"})
    if unknown:
        raise RequestError(f"request has unknown field(s) {unknown}")
    rid, site = payload.get("id"), payload.get("site")
    if not isinstance(rid, str) or not ID_RE.match(rid):
        raise RequestError(f"request id must be 32 lowercase hex characters, got {rid!r}")
    if not isinstance(site, str) or not SITE_RE.match(site):
        raise RequestError(f"request site must match {SITE_RE.pattern}, got {site!r}")
    scope = payload.get("scope", "site")
    if scope not in SCOPES:
        raise RequestError(f"request scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    reason = payload.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise RequestError(f"request reason must be text of at most {MAX_REASON} characters")
    check_text("reason", reason)
    created = payload.get("created", 0.0)
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise RequestError(f"request 'created' must be a number, got {created!r}")
    try:
        when = float(created)
    except OverflowError:
        raise RequestError("request 'created' is out of range") from None
    if not math.isfinite(when) or not 0.0 <= when <= time.time() + MAX_CLOCK_SKEW:
        raise RequestError(f"request 'created' must be a Unix time between 0 and now, got {when!r}")
    return ErasureRequest(rid, site, scope, reason, when)


def check_text(name: str, text: str) -> str:
    """``text`` if it is valid Unicode that encodes as UTF-8 (no lone surrogates); raises :class:`RequestError`.

    A lone surrogate comes from a JSON escape such as ``"\\ud800"`` or from a command line
    typed in a non-UTF-8 terminal (Python keeps the undecodable byte as ``\\udcXX``); it
    cannot be stored or sent, so it is refused here with the place it is at.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        ch = ord(text[exc.start])
        if 0xDC80 <= ch <= 0xDCFF:  # a byte the terminal's encoding could not decode
            raise RequestError(
                f"{name} is not UTF-8 text (byte 0x{ch - 0xDC00:02x} at character {exc.start}): "
                "write it in UTF-8 (e.g. a UTF-8 terminal locale)"
            ) from None
        raise RequestError(f"{name} holds a lone surrogate (U+{ch:04X} at character {exc.start}), not text") from None
    return text


def safe_text(text: str, limit: int | None = None) -> str:
    """``text`` made storable (a lone surrogate becomes its backslash escape), cut to ``limit`` characters."""
    out = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return out if limit is None else out[:limit]


# -- the site's inbox ----------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one (fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def submit_to_inbox(inbox: str | Path, request: ErasureRequest) -> Path:
    """Write a request into ``<inbox>/pending/<id>.json`` (atomically: a poll never sees half a file)."""
    path = Path(inbox) / "pending" / f"{request.id}.json"
    _atomic_write(path, json.dumps(request.to_dict(), sort_keys=True))
    return path


@dataclass(frozen=True)
class InboxEntry:
    """A file in ``<inbox>/pending/``: its name (as text), its text, or why it cannot be taken.

    ``request_id``: the id inside when the text is a valid request (files are answered by it).
    """

    name: str
    text: str
    problem: str = ""
    request_id: str = ""


def wire_name(name: str) -> str:
    """A file name as text any message can carry (bytes that are not UTF-8 escaped as ``\\xNN``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _read_entry(folder: Path, name: str, now: float) -> InboxEntry | None:
    """One pending file, read defensively; ``None``: still being written (retried at the next poll).

    Only a regular file with one link is read, opened without following links: a symbolic
    or hard link to another file (a key, ``/proc/self/environ``) would make the site send
    that file's contents. Never more than :data:`MAX_REQUEST_BYTES` is read.
    """
    shown = wire_name(name)
    try:
        st = os.lstat(folder / name)
        if stat.S_ISLNK(st.st_mode):
            return InboxEntry(shown, "", "a symbolic link (links are not followed)")
        if not stat.S_ISREG(st.st_mode):
            return InboxEntry(shown, "", "not a regular file")
        if st.st_nlink > 1:
            return InboxEntry(shown, "", "a hard link to another file (not read)")
        if st.st_size > MAX_REQUEST_BYTES:
            return InboxEntry(shown, "", f"{st.st_size} bytes, more than the {MAX_REQUEST_BYTES} a request may have")
        fd = os.open(folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            opened = os.fstat(fh.fileno())
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(opened.st_mode):
                return None  # replaced between the look and the open: look again next poll
            raw = fh.read(MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        return InboxEntry(shown, "", f"cannot be read ({exc.strerror or exc})")
    if len(raw) > MAX_REQUEST_BYTES:
        return InboxEntry(shown, "", f"more than the {MAX_REQUEST_BYTES} bytes a request may have")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InboxEntry(shown, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    try:
        req = parse_request(text)
    except RequestError as exc:
        if not _is_json(text) and now - st.st_mtime < SETTLE_SECONDS:
            return None  # half a document: a tool that does not write atomically is still writing it
        return InboxEntry(shown, "", f"malformed: {exc}")
    return InboxEntry(shown, text, "", req.id)


def read_inbox_file(folder: str | Path, name: str) -> InboxEntry:
    """A file of an inbox folder as a poll reads it (links refused, size capped, parsed); never raises."""
    return _read_entry(Path(folder), name, float("inf")) or InboxEntry(wire_name(name), "", "changed while read")


def _is_json(text: str) -> bool:
    """Whether ``text`` is one whole JSON document (a half-written file is not)."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _pending_names(folder: Path) -> list[str]:
    """Names in ``pending/``, oldest first; hidden names (``.tmp-*`` of a writer in progress) are skipped."""
    try:
        names = [n for n in os.listdir(folder) if not n.startswith(".")]
    except OSError:
        return []

    def key(n: str) -> tuple[float, str]:
        try:
            return (os.lstat(folder / n).st_mtime, n)
        except OSError:
            return (0.0, n)

    return sorted(names, key=key)


def inbox_entries(inbox: str | Path, now: float | None = None) -> list[InboxEntry]:
    """What a poll hands over: valid requests first, then files the server should refuse, at most
    :data:`MAX_FILES_PER_POLL` in all, oldest first within each (a flood of junk cannot delay a
    request); a file still being written is left for the next poll."""
    folder = Path(inbox) / "pending"
    if not folder.is_dir():
        return []
    when = time.time() if now is None else now
    entries = [e for n in _pending_names(folder)[:MAX_FILES_INSPECTED] if (e := _read_entry(folder, n, when))]
    return ([e for e in entries if not e.problem] + [e for e in entries if e.problem])[:MAX_FILES_PER_POLL]


def pending_in_inbox(inbox: str | Path) -> list[tuple[str, str]]:
    """``(file name, raw text)`` of every valid pending request, oldest first (validated again by the server)."""
    return [(e.name, e.text) for e in inbox_entries(inbox) if not e.problem]


def acknowledge_in_inbox(inbox: str | Path, answered: list[str], folder: str = "acknowledged") -> list[str]:
    """Move answered pending files to ``<inbox>/<folder>/``: a file is answered by the request id
    inside it, by its name, or by its name without ``.json``.

    Only names found in ``pending/`` are moved, so a verdict cannot name a path outside it.
    ``folder`` is ``acknowledged`` or ``refused``. Returns the verdicts that moved a file.
    """
    if folder not in ("acknowledged", "refused"):
        raise ValueError(f"folder must be 'acknowledged' or 'refused', got {folder!r}")
    wanted = {str(a) for a in answered}
    pending = Path(inbox) / "pending"
    done = Path(inbox) / folder
    moved: list[str] = []
    for name in _pending_names(pending)[:MAX_FILES_INSPECTED] if wanted else []:
        shown = wire_name(name)
        stem = shown[:-5] if shown.endswith(".json") else shown
        hit = next((w for w in (shown, stem) if w in wanted), None)
        if hit is None:  # a hand-named file, or one whose name is not its id: answered by the id inside
            entry = _read_entry(pending, name, float("inf"))
            hit = entry.request_id if entry is not None and entry.request_id in wanted else None
        if hit is None:
            continue
        done.mkdir(parents=True, exist_ok=True)
        dest = done / name
        if os.path.lexists(dest):  # filed before under this name: keep both
            dest = done / f"{uuid.uuid4().hex[:8]}-{name}"
        os.replace(pending / name, dest)
        moved.append(hit)
    return list(dict.fromkeys(moved))


def erasure_poll(inbox: str | None, site: str, verdicts: Mapping[str, Any]) -> dict[str, Any]:
    """A site's answer to the server's poll (``query.erasure``): file the verdicts, hand over what is pending.

    ``verdicts``: ``acks`` (request ids the server journaled) and ``refused`` (ids or file
    names it refused). Returns the reply's fields: ``site``, ``count``, ``acknowledged``,
    ``refused`` and, when files are pending, ``requests`` (raw texts of valid requests, validated
    again by the server; empty for the others), ``files`` (their names) and ``problems`` (why a
    file is not a request). A node without an inbox never has requests.
    """
    acks = [str(a) for a in verdicts.get(P.ACKS, [])] if isinstance(verdicts.get(P.ACKS), list) else []
    refused = [str(a) for a in verdicts.get(P.REFUSED, [])] if isinstance(verdicts.get(P.REFUSED), list) else []
    moved = acknowledge_in_inbox(inbox, acks) if inbox and acks else []
    moved_refused = acknowledge_in_inbox(inbox, refused, "refused") if inbox and refused else []
    pending = inbox_entries(inbox) if inbox else []
    out: dict[str, Any] = {
        "site": site,
        "count": len(pending),
        "acknowledged": len(moved),
        "refused": len(moved_refused),
    }
    if pending:
        out["requests"] = [e.text for e in pending]
        out["files"] = [e.name for e in pending]
        out["problems"] = [e.problem for e in pending]
    return out


# -- who is who --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteRegistry:
    """Site name -> authenticated Flower node id (and the partition the site's data is).

    ``sites``: ``{name: {"node-id": int, "partition-id": int}}``, optionally ``"num-examples"``:
    the most training examples the site may claim in a reply (larger claims are capped).
    """

    sites: Mapping[str, Mapping[str, int]]

    @classmethod
    def from_file(cls, path: str | Path) -> SiteRegistry:
        """Read and validate ``{"sites": {name: {"node-id": ..., "partition-id": ...}}}``.

        Raises
        ------
        ValueError
            On a malformed file, a bad site name, or a node id bound to two sites.
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"site registry {path}: {exc}") from None
        sites = data.get("sites") if isinstance(data, Mapping) else None
        if not isinstance(sites, Mapping) or not sites:
            raise ValueError(f"site registry {path}: needs a non-empty 'sites' object")
        seen: dict[int, str] = {}
        for name, entry in sites.items():
            if not SITE_RE.match(name):
                raise ValueError(f"site registry {path}: bad site name {name!r}")
            if not isinstance(entry, Mapping) or not all(
                isinstance(entry.get(k), int) for k in ("node-id", "partition-id")
            ):
                raise ValueError(f"site registry {path}: site {name!r} needs integer 'node-id' and 'partition-id'")
            n = entry.get("num-examples")
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"site registry {path}: site {name!r}: 'num-examples' must be a positive integer")
            if entry["node-id"] in seen:
                raise ValueError(
                    f"site registry {path}: node {entry['node-id']} is bound to {seen[entry['node-id']]!r} and {name!r}"
                )
            seen[entry["node-id"]] = name
        return cls({n: dict(e) for n, e in sites.items()})

    def site_of_node(self, node_id: int) -> str | None:
        """The site bound to ``node_id`` (``None``: not a registered node)."""
        return next((n for n, e in self.sites.items() if e["node-id"] == node_id), None)

    def write(self, path: str | Path) -> Path:
        """Write the registry as JSON (atomically)."""
        _atomic_write(
            Path(path), json.dumps({"sites": {n: dict(e) for n, e in self.sites.items()}}, indent=2, sort_keys=True)
        )
        return Path(path)
