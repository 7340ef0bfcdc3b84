"""A site asks to be forgotten: write an erasure request into its SuperNode's inbox.

    python -m clients.request_erasure --inbox /srv/site-b/erasure --site hospital-b --reason "patient withdrawal"
    python -m clients.request_erasure --inbox /srv/site-b/erasure --status

The inbox is the folder named by the SuperNode's node-config ``erasure-inbox``. At its
next poll the server journals the request (on disk) and acknowledges it; the file then
moves from ``pending/`` to ``acknowledged/`` (or ``refused/``). Any error is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fed_unlearn.erasure import RequestError, new_request, parse_request, read_inbox_file, submit_to_inbox


def status(inbox: Path) -> list[str]:
    """One line per file in the inbox's folders; unreadable or malformed files are said so, not fatal.

    Files are read as a poll reads them: links are not followed, at most the size of a request.
    """
    lines = []
    for folder in ("pending", "acknowledged", "refused"):
        where = inbox / folder
        for name in sorted(os.listdir(where)) if where.is_dir() else []:
            if name.startswith("."):
                continue
            entry = read_inbox_file(where, name)
            if entry.problem:
                lines.append(f"{folder:12s} {entry.name}: unreadable ({entry.problem})")
            else:
                req = parse_request(entry.text)
                lines.append(f"{folder:12s} {req.id} site={req.site} reason={req.reason!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inbox", required=True, help="the SuperNode's erasure-inbox folder")
    ap.add_argument("--site", help="this site's name, as registered")
    ap.add_argument("--reason", default="", help="free text for the audit trail")
    ap.add_argument("--status", action="store_true", help="list the requests in the inbox and exit")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    inbox = Path(args.inbox)
    try:
        if inbox.exists() and not inbox.is_dir():
            raise ValueError(f"--inbox {inbox} is a file, not a folder")
        if args.status:
            print("\n".join(status(inbox)) if inbox.is_dir() else f"no inbox at {inbox} yet")
            return 0
        if not args.site:
            raise ValueError("--site is required to make a request")
        req = new_request(args.site, args.reason)
        path = submit_to_inbox(inbox, req)
    except (RequestError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"id": req.id, "site": req.site, "file": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
