"""Run a Flower app (by default this repository's) with ``flwr run`` on a private local simulation SuperLink.

What it does, so that one command works on a fresh machine with no network:

1. Sets the environment that keeps Flower and Ray off the network (no telemetry,
   no update check, no runtime dependency installation, Ray bound to 127.0.0.1 with
   its temp dir and bootstrap config inside the run folder).
2. Uses a private ``FLWR_HOME`` and free ports, and starts the simulation SuperLink
   itself (the command ``flwr run`` would start), so it never reuses or disturbs
   another SuperLink and can stop it afterwards by PID.
3. Calls ``flwr run <app> local --stream`` with the run-config overrides and the
   number of SuperNodes, then checks the run's final status with ``flwr list``
   (``flwr run --stream`` exits 0 even when the run failed) and exits non-zero if
   the run did not finish successfully.

Usage::

    python -m simulations.run_experiment                       # the default experiment
    python -m simulations.run_experiment --num-clients 10 \\
        --run-config "unlearn.departing='0,3' puf.variant='special'"
    python -m simulations.run_experiment --app examples/quickstart-unlearning --num-clients 3   # another app
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def quiet_env(flwr_home: Path, ray_tmp: Path) -> dict[str, str]:
    """Environment for Flower + Ray that contacts nothing but 127.0.0.1.

    ``ray_tmp`` must be a short path: Ray puts unix sockets there, limited to 107 bytes.
    """
    home = flwr_home / "home"
    home.mkdir(parents=True, exist_ok=True)
    # An empty Ray bootstrap config stops Ray probing cloud metadata endpoints.
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_TMPDIR": str(ray_tmp),
            "MPLBACKEND": "Agg",
            "PYTHONUNBUFFERED": "1",
            # The SuperLink spawns flower-superexec, flwr-serverapp, ... by name: use this env's.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
    )
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def executable(name: str) -> str:
    """An executable of this Python environment (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def stage_app(app: Path, dest: Path) -> Path:
    """A copy of the Flower app ``app`` in ``dest`` without what its ``.gitignore`` leaves out of a FAB.

    ``flwr run <dir>`` walks every file under ``dir`` (resolving each path) before it applies
    ``.gitignore``: with a virtual environment inside the app that is tens of thousands of
    files and about 5 s per run. The copy holds the files Flower would consider (ignored
    directories pruned, symlinks skipped as Flower skips them), so it builds the same FAB.
    """
    import pathspec

    ignore = app / ".gitignore"
    spec = pathspec.GitIgnoreSpec.from_lines(ignore.read_text().splitlines() if ignore.is_file() else [])
    if dest.exists():
        shutil.rmtree(dest)
    for dirpath, dirnames, filenames in os.walk(app, followlinks=False):
        rel = Path(dirpath).relative_to(app)
        dirnames[:] = [
            d for d in dirnames if d != ".git" and not spec.match_file(f"{(rel / d).as_posix()}/".lstrip("./"))
        ]
        for name in filenames:
            src = Path(dirpath) / name
            relative = (rel / name).as_posix()
            if src.is_symlink() or spec.match_file(relative):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def launch_superlink(env: dict[str, str], flwr_home: Path) -> subprocess.Popen:
    """Start a simulation SuperLink on the ports in ``env`` (not waiting for it: see :func:`wait_healthy`)."""
    http_port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    control = f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}"
    log_file = flwr_home / "local-superlink" / "superlink.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        executable("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        control,
        "--host",
        "127.0.0.1",
        "--port",
        http_port,
        "--database",
        str(flwr_home / "local-superlink" / "state.db"),
        "--log-file",
        str(log_file),
    ]
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=str(PROJECT_ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_healthy(proc: subprocess.Popen, env: dict[str, str], flwr_home: Path, timeout: float = 60.0) -> None:
    """Wait for a launched SuperLink's health endpoint; raise if it exits or stays unhealthy (the caller stops it)."""
    import urllib.request

    http_port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    log_file = flwr_home / "local-superlink" / "superlink.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"flower-superlink not healthy within {timeout:.0f}s; see {log_file}")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process and its session (SuperLink spawns the ServerApp and Ray)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


def run_status(env: dict[str, str], run_id: str) -> str:
    """The status string ``flwr list`` reports for ``run_id`` (e.g. ``finished:completed``)."""
    out = subprocess.run(
        [executable("flwr"), "list", "local", "--run-id", run_id, "--format", "json"],
        env=env,
        cwd=str(PROJECT_ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
    except (ValueError, KeyError):
        return f"unknown ({out.stdout.strip()[:200]} {out.stderr.strip()[:200]})"
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def preflight(overrides: str, num_clients: int) -> None:
    """Check this repository's run config and data before anything starts (one line on failure).

    Raises
    ------
    ValueError
        Naming the key, file or client that is wrong.
    """
    from fed_unlearn.config import ExperimentConfig, ServiceConfig, mode_of
    from fed_unlearn.flower import as_dataset
    from fed_unlearn.task import load_task
    from fed_unlearn.unlearning import config_from_run_config, make_method

    from .inprocess import fused_run_config

    try:
        rc = fused_run_config(str(PROJECT_ROOT), overrides)
    except (ValueError, KeyError, TypeError) as exc:  # Flower's own parser: unknown keys, bad syntax
        raise ValueError(f"--run-config: {exc}") from None
    mode = mode_of(rc)
    cfg = ExperimentConfig.from_run_config(rc)
    make_method(cfg.request.method, rc)
    if mode == "service":
        config_from_run_config(ServiceConfig, rc, "service")
        return
    unknown = sorted(c for c in cfg.request.departing if c >= num_clients)
    if unknown:
        raise ValueError(
            f"run-config 'unlearn.departing' names client(s) {unknown}, but there are {num_clients} "
            f"(ids 0..{num_clients - 1})"
        )
    task = load_task(cfg.data.task)
    for pid in range(num_clients):  # the clients will load the same data: fail here, naming the file or key
        try:
            train, held = (
                as_dataset(d, f"client {pid} {part}")
                for d, part in zip(task.data(pid, num_clients, rc), ("train data", "held-out data"), strict=False)
            )
        except (OSError, ValueError) as exc:
            raise ValueError(f"client {pid}'s data: {exc}") from None
        classes = max(train.num_classes, held.num_classes)
        if cfg.request.deletion.by_class and cfg.request.deletion.forget_class >= classes and task.builtin:
            raise ValueError(
                f"run-config 'unlearn.class' is {cfg.request.deletion.forget_class}, but the data has {classes} classes"
            )


class LogFilter:
    """Print a run's log lines as they come; keep tracebacks out of sight (``--debug`` shows them)."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug
        self.in_traceback = False
        self.error = ""

    def __call__(self, line: str) -> None:
        text = line.rstrip("\n")
        if "Traceback (most recent call last)" in text:
            self.in_traceback = True
        elif (
            self.in_traceback
            and text
            and not text.startswith((" ", "\t"))
            and ":" in text
            and not text.lstrip().startswith("File ")
        ):
            self.in_traceback = False
            self.error = text.split("  ", 1)[-1].strip()  # the exception line ends the traceback
            if not self.debug:
                print(f"error: {self.error}", flush=True)
                return
        if self.debug or not self.in_traceback:
            print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-clients", type=int, default=5, help="SuperNodes in the simulation (default 5)")
    ap.add_argument(
        "--cpus-per-client", type=int, default=1, help="Ray CPUs per client (default 1; Flower takes integers)"
    )
    ap.add_argument("--run-config", default="", help="run-config overrides, e.g. \"unlearn.departing='0,3'\"")
    ap.add_argument("--app", default=str(PROJECT_ROOT), help="the Flower app to run (default: this repository's)")
    ap.add_argument("--results-dir", default=str(PROJECT_ROOT / "results"), help="where results go (default ./results)")
    ap.add_argument("--flwr-home", default="", help="FLWR_HOME to use (default: a fresh one under results-dir)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is abandoned")
    ap.add_argument(
        "--ray-address",
        default="",
        help="an existing Ray cluster to run the simulation on (host:port of its head, as `ray start --head` "
        "prints); default: a private Ray instance",
    )
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = ap.parse_args(argv)
    if args.num_clients < 2:
        ap.error("--num-clients must be >= 2 (one departs, at least one remains)")

    results = Path(args.results_dir).resolve()
    flwr_home = Path(args.flwr_home).resolve() if args.flwr_home else results / ".flwr" / f"run-{os.getpid()}"
    if flwr_home.exists() and not args.flwr_home:
        shutil.rmtree(flwr_home)
    ray_tmp = Path(tempfile.mkdtemp(prefix="fu-ray-"))
    env = quiet_env(flwr_home, ray_tmp)
    if args.ray_address:
        # Flower's Ray backend calls ray.init(), which joins the cluster named by RAY_ADDRESS
        env["RAY_ADDRESS"] = args.ray_address
        env.pop("RAY_TMPDIR", None)  # the cluster's own session directory is used
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')

    app = Path(args.app).resolve()
    if not (app / "pyproject.toml").is_file():
        ap.error(f"--app {app}: no pyproject.toml there (a Flower app needs one)")
    # the SuperLink boots (about 2 s of imports) while the run config and the data are checked
    superlink = launch_superlink(env, flwr_home)
    if app == PROJECT_ROOT:
        try:
            preflight(args.run_config, args.num_clients)
        except Exception as exc:  # noqa: BLE001  (one line for the user; --debug shows where)
            stop_process(superlink)
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if args.debug:
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 2
    overrides = ""
    if app == PROJECT_ROOT:  # this repository's app writes its results where asked
        overrides = f"results-dir='{results}'"
        if "gold-cache-dir" not in args.run_config:  # the caller may share a cache between runs
            overrides += f" gold-cache-dir='{results / 'gold-cache'}'"
    if args.run_config.strip():
        overrides = f"{overrides} {args.run_config.strip()}".strip()
    federation = f"num-supernodes={args.num_clients} client-resources-num-cpus={args.cpus_per_client}"

    try:
        wait_healthy(superlink, env, flwr_home)
        staged = stage_app(app, flwr_home / "app")
        cmd = [executable("flwr"), "run", str(staged), "local", "--format", "json", "--federation-config", federation]
        if overrides:
            cmd += ["--run-config", overrides]
        print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
        sub = subprocess.run(cmd, env=env, cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=120)
        try:
            run_id = json.loads(sub.stdout[sub.stdout.index("{") :])["run-id"]
        except (ValueError, KeyError, TypeError):
            print(sub.stdout, sub.stderr, file=sys.stderr)
            return 2
        print(f"run {run_id} submitted; streaming its log", flush=True)
        stream = subprocess.Popen(
            [executable("flwr"), "log", str(run_id), "local", "--stream"],
            env=env,
            cwd=str(PROJECT_ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        shown = LogFilter(args.debug)

        def show_all() -> None:
            for line in stream.stdout or []:
                shown(line)

        reader = threading.Thread(target=show_all, daemon=True)
        reader.start()
        deadline = time.monotonic() + args.timeout
        status = run_status(env, run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            # the status is asked (a flwr process each time) every 10 s while the log streams; the
            # SuperLink ends the stream once the run is finished, so the next answer is final then
            with contextlib.suppress(subprocess.TimeoutExpired):
                stream.wait(timeout=10.0)
            status = run_status(env, run_id)
            if stream.poll() is not None and not status.startswith("finished"):
                time.sleep(0.5)  # the stream broke off early: ask again shortly
        if stream.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                stream.wait(timeout=1.0)  # let the log stream print the last lines
            stop_process(stream, grace=3.0)
        reader.join(timeout=5.0)
        print(f"run {run_id}: {status}", flush=True)
        if status != "finished:completed":
            why = f": {shown.error}" if shown.error else ""
            print(
                f"the run did not complete{why} (SuperLink log: {flwr_home / 'local-superlink' / 'superlink.log'}; "
                "--debug shows tracebacks)",
                file=sys.stderr,
            )
            return 1
        print(f"results in {results}")
        return 0
    finally:
        stop_process(superlink)
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
