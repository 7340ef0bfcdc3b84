"""A ServerApp that waits for every node and sends each one query: the least a federation does."""

from __future__ import annotations

import time

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Every node of the federation answers one query."""
    expected = int(context.run_config.get("num-nodes", 0)) or None
    deadline = time.monotonic() + float(context.run_config["node-wait-seconds"])
    nodes = list(grid.get_node_ids())
    while (not nodes or (expected and len(nodes) < expected)) and time.monotonic() < deadline:
        time.sleep(0.1)
        nodes = list(grid.get_node_ids())
    replies = list(grid.send_and_receive([Message(RecordDict(), n, "query") for n in nodes], timeout=600))
    failed = [r.metadata.src_node_id for r in replies if r.has_error()]
    if len(replies) != len(nodes) or failed:
        raise RuntimeError(f"{len(replies)} replies from {len(nodes)} nodes; errors from {failed}")
