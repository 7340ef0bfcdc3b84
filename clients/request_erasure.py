"""A site asks to be forgotten: write an erasure request into its SuperNode's inbox.

    python -m clients.request_erasure --inbox /srv/site-b/erasure --site hospital-b --reason "patient withdrawal"
    python -m clients.request_erasure --inbox /srv/site-b/erasure --status

The inbox is the folder named by the SuperNode's node-config ``erasure-inbox``. At its
next poll the server journals the request (on disk) and acknowledges it; the file then
moves from ``pending/`` to ``acknowledged/`` (or ``refused/``). Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fed_unlearn.erasure import RequestError, new_request, submit_to_inbox


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inbox", required=True, help="the SuperNode's erasure-inbox folder")
    ap.add_argument("--site", help="this site's name, as registered")
    ap.add_argument("--reason", default="", help="free text for the audit trail")
    ap.add_argument("--status", action="store_true", help="list the requests in the inbox and exit")
    args = ap.parse_args(argv)
    inbox = Path(args.inbox)
    if args.status:
        for folder in ("pending", "acknowledged", "refused"):
            for f in sorted((inbox / folder).glob("*.json")):
                body = json.loads(f.read_text())
                print(f"{folder:12s} {body['id']} site={body['site']} reason={body.get('reason', '')!r}")
        return 0
    if not args.site:
        ap.error("--site is required to make a request")
    try:
        req = new_request(args.site, args.reason)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = submit_to_inbox(inbox, req)
    print(json.dumps({"id": req.id, "site": req.site, "file": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
