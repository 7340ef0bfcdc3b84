"""Operator tool for a deployed federation's erasure journal.

    python -m server.erasure_admin request --state-dir results/service --site hospital-b --reason "legal request"
    python -m server.erasure_admin status --state-dir results/service
    python -m server.erasure_admin verify results/service/audit/<id>.certificate.html \
        --public-key results/service/certificate-key.pub

``request`` journals an erasure on a site's behalf (``requested_by = operator``); the
running service serves it at its next round. The state directory must hold the service's
journal (``--init`` creates one for a federation that has not run yet, which then needs
``--sites-file``). The site must exist (in the site registry, or in the federation the
journal's checkpoint records) and must not have been erased already. ``verify`` checks an
erasure certificate (JSON or its HTML page) against the server's public key (``--public-key``
or ``--state-dir``; required): valid, exit 0; altered, signed by another key, not the
``--request`` asked about, or not a certificate, one line naming why and exit 1. Any other
error is one line on stderr and exit code 2; nothing is changed.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from fed_unlearn.certificate import CertificateError, key_id, public_key_bytes, verify_file
from fed_unlearn.erasure import RequestError, SiteRegistry, new_request
from fed_unlearn.journal import Journal, JournalError


def _request(args: argparse.Namespace) -> str:
    db = Path(args.state_dir) / "journal.sqlite"
    request = new_request(args.site, args.reason)
    if not db.is_file() and not args.init:
        raise ValueError(f"no journal at {db}: is --state-dir the service's state-dir? (--init creates one)")
    if args.sites_file:
        known = set(SiteRegistry.from_file(args.sites_file).sites)
    elif not db.is_file():
        raise ValueError("a new journal needs --sites-file (the federation has not run yet)")
    else:
        with Journal(db, create=False) as j:
            ck = j.checkpoint()
        if ck is None:
            raise ValueError("the journal has no checkpoint yet: pass --sites-file")
        known = set(ck.state.get("sites", {}))
    if request.site not in known:
        raise ValueError(f"unknown site {request.site!r}; the federation has {sorted(known)}")
    with Journal(db, create=args.init) as j:
        ck = j.checkpoint()
        gone = set(ck.state.get("departed-sites", [])) if ck else set()
        if request.site in gone:
            raise ValueError(
                f"site {request.site!r} has already been erased (its data left the model in an earlier round)"
            )
        open_ = [r.id for r in j.requests() if r.site == request.site and r.state in ("pending", "unlearning")]
        if open_:
            raise ValueError(f"site {request.site!r} already has an open request ({open_[0]})")
        j.add(request.id, request.site, "operator", -1, request.reason)
    return f"journaled {request.id}: erase site {request.site!r} (pending)"


def _verify(args: argparse.Namespace) -> int:
    if not args.public_key and not args.state_dir:
        raise ValueError(
            "verify needs the server's public key: --public-key <state-dir>/certificate-key.pub or --state-dir "
            "<state-dir> (a certificate checked only against the key it names proves nothing)"
        )
    key_file = Path(args.public_key) if args.public_key else Path(args.state_dir) / "certificate-key.pub"
    trusted = key_file.read_bytes()
    try:
        payload = verify_file(args.certificate, trusted, request_id=args.request or None)
        signer = key_id(public_key_bytes(trusted))
    except CertificateError as exc:
        print(f"INVALID: {exc}", file=sys.stderr)
        return 1
    req = payload.get("request", {})
    print(f"valid: erasure of site {req.get('site')!r} (request {req.get('id')}), signed by key {signer} ({key_file})")
    print(f"verdict: {payload.get('verdict')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    req = sub.add_parser("request", help="journal an erasure request on a site's behalf")
    req.add_argument("--state-dir", required=True)
    req.add_argument("--site", required=True)
    req.add_argument("--reason", default="")
    req.add_argument("--sites-file", default="", help="the site registry (default: the sites of the last checkpoint)")
    req.add_argument("--init", action="store_true", help="create the journal if the state directory has none")
    st = sub.add_parser("status", help="print the checkpoint, every request, refusal and event")
    st.add_argument("--state-dir", required=True)
    ver = sub.add_parser("verify", help="check an erasure certificate against the server's key (JSON or HTML)")
    ver.add_argument("certificate")
    ver.add_argument("--public-key", default="", help="the server's key (<state-dir>/certificate-key.pub)")
    ver.add_argument("--state-dir", default="", help="the service's state dir (its certificate-key.pub is used)")
    ver.add_argument("--request", default="", help="the request id the certificate must be for")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "verify":
            return _verify(args)
        if args.cmd == "status":
            from .service import describe

            print(describe(args.state_dir), end="")
        else:
            print(_request(args))
    except (RequestError, JournalError, ValueError, OSError, sqlite3.Error) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
