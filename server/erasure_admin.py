"""Operator tool for a deployed federation's erasure journal.

    python -m server.erasure_admin request --state-dir results/service --site hospital-b --reason "legal request"
    python -m server.erasure_admin status --state-dir results/service

``request`` journals an erasure on a site's behalf (``requested_by = operator``); the
running service serves it at its next round. The site must exist: in the site registry
(``--sites-file``) or, without one, in the federation the journal's checkpoint records.
A bad request changes nothing and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fed_unlearn.erasure import RequestError, SiteRegistry, new_request
from fed_unlearn.journal import Journal


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    req = sub.add_parser("request", help="journal an erasure request on a site's behalf")
    req.add_argument("--state-dir", required=True)
    req.add_argument("--site", required=True)
    req.add_argument("--reason", default="")
    req.add_argument("--sites-file", default="", help="the site registry (default: the sites of the last checkpoint)")
    st = sub.add_parser("status", help="print the checkpoint, every request and every refusal")
    st.add_argument("--state-dir", required=True)
    args = ap.parse_args(argv)
    db = Path(args.state_dir) / "journal.sqlite"
    if args.cmd == "status":
        from .service import describe

        if not db.exists():
            print(f"error: no journal at {db}", file=sys.stderr)
            return 2
        print(describe(args.state_dir), end="")
        return 0
    try:
        request = new_request(args.site, args.reason)
        if args.sites_file:
            known = set(SiteRegistry.from_file(args.sites_file).sites)
        else:
            if not db.exists():
                raise ValueError(f"no journal at {db}: start the service once or pass --sites-file")
            with Journal(db) as j:
                ck = j.checkpoint()
            if ck is None:
                raise ValueError("the journal has no checkpoint yet: pass --sites-file")
            known = set(ck.state.get("sites", {}))
        if request.site not in known:
            raise ValueError(f"unknown site {request.site!r}; the federation has {sorted(known)}")
    except (RequestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with Journal(db) as j:
        j.add(request.id, request.site, "operator", -1, request.reason)
    print(f"journaled {request.id}: erase site {request.site!r} (pending)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
