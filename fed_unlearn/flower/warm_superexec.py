"""A SuperExec whose ClientApp processes start warm: forked from a parent that imported torch once.

In subprocess isolation, Flower's SuperExec starts a fresh ``flwr-clientapp`` process for
every task (message) a SuperNode receives, and each one imports torch again: about 3 s of
CPU per message on a small machine, several messages per site per round. This SuperExec
runs the same loop with the same plugin (Flower's ``AutoExecPlugin``, which acquires the
task and hands it over with its token) but launches each task as a ``fork()`` of itself
after importing the heavy libraries once; the child runs Flower's own ``run_clientapp``
against the SuperNode's Runtime API, exactly as ``flwr-clientapp`` would, and exits. Each
task is still its own process (its memory, its crash), the app code is loaded from the run's
FAB in the child, and nothing of Flower is patched.

Start the SuperNode with ``--isolation process`` and this next to it::

    flower-supernode --isolation process --port 9094 ...
    python -m fed_unlearn.flower.warm_superexec --runtime-api-address 127.0.0.1:9094 --insecure \\
        --parent-pid <the SuperNode's pid>

POSIX only (``fork``). Pre-import only third-party libraries (``--preload``): the app's own
modules must come from the FAB, so they are imported in the child.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

#: Libraries imported once in the parent (the slow part of a ClientApp's start). ``torch._dynamo``
#: (~2 s here) is what ``import torch`` leaves to the first optimizer a task builds.
DEFAULT_PRELOAD = ("torch", "torch._dynamo", "numpy", "scipy.special", "scipy.stats", "sklearn.metrics")
#: Seconds between task polls (Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` overrides it).
DEFAULT_POLL_INTERVAL = 0.1


class ForkExecutor:
    """A SuperExec executor that runs each task in a child forked from this (warm) process."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(
        self, supported_task_types: set[Any], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[Any], set[str]]:
        """Every task type can start at once (no capacity gate), like Flower's subprocess executor."""
        return supported_task_types, set()

    def wait_for_capacity(self, *args: Any, **kwargs: Any) -> None:
        """No capacity gate."""

    def launch(self, spec: Any) -> Any:
        """Fork; the child runs the task as ``flwr-clientapp`` would and exits with its code."""
        from flwr.supercore.superexec.executor import LaunchResult

        pid = os.fork()
        if pid:
            self.children.add(pid)
            return LaunchResult.accepted()
        code, t0 = 1, time.perf_counter()
        try:
            from flwr.supercore.tls import validate_and_resolve_root_certificates
            from flwr.supernode.runtime.run_clientapp import run_clientapp

            run_clientapp(
                runtime_api_address=spec.runtime_api_address,
                token=spec.token,
                insecure=spec.insecure,
                certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
                parent_pid=spec.parent_pid,
                runtime_dependency_install=spec.runtime_dependency_install,
            )
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001  (the child must exit, never return into the parent's loop)
            traceback.print_exc()
        finally:
            print(f"task {spec.task_id}: exit {code} after {time.perf_counter() - t0:.2f} s", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def reconcile(self) -> None:
        """Reap finished children (no zombies)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Nothing to release: children finish their task on their own."""


def serve(
    runtime_api_address: str,
    insecure: bool,
    root_certificates_path: str | None = None,
    parent_pid: int | None = None,
    preload: Sequence[str] = DEFAULT_PRELOAD,
) -> None:
    """Import ``preload``, then acquire tasks from the SuperNode's Runtime API and fork one child per task."""
    for name in preload:
        importlib.import_module(name)
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: E402  (after the preload, on purpose)
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.plugin import AutoExecPlugin
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp  # noqa: F401  (each task's runtime, ~0.6 s)

    interval = float(os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", DEFAULT_POLL_INTERVAL))
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    executor = ForkExecutor()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    plugin = AutoExecPlugin(
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates_path,
        runtime_dependency_install=False,
        executor=executor,
    )
    try:
        while True:
            executor.reconcile()
            types, hashes = executor.get_eligible_capacity(set(plugin.supported_task_types))
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=types, agentapp_fab_hashes=hashes))
            if res.HasField("task") and res.token:
                plugin.launch_task(token=res.token, task=res.task)
            time.sleep(interval)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point (the arguments of ``flower-superexec`` that a SuperNode passes it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    tls = ap.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback)")
    tls.add_argument("--root-certificates", default=None, help="CA of the Runtime API's TLS certificate")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    ap.add_argument(
        "--preload", default=",".join(DEFAULT_PRELOAD), help="third-party modules to import once (comma-separated)"
    )
    args = ap.parse_args(argv)
    if not hasattr(os, "fork"):
        print("error: the warm SuperExec needs fork() (POSIX)", file=sys.stderr)
        return 2
    preload = [m.strip() for m in args.preload.split(",") if m.strip()]
    serve(args.runtime_api_address, args.insecure, args.root_certificates, args.parent_pid, preload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
