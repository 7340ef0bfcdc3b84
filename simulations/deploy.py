"""A real deployment on loopback: one SuperLink and N SuperNodes as separate processes.

    python -m simulations.deploy demo                       # the whole runbook, TLS + node authentication
    python -m simulations.deploy up --dir DEPLOY --sites 3  # start (and register) everything, then leave it running
    python -m simulations.deploy run --dir DEPLOY --rounds 6
    python -m simulations.deploy request --dir DEPLOY --site site-1
    python -m simulations.deploy status --dir DEPLOY
    python -m simulations.deploy down --dir DEPLOY

What ``up`` does, step by step (each step is also what an operator does by hand; the
README's runbook shows the commands):

1. TLS (default on): a private CA, and a SuperLink certificate for ``127.0.0.1`` and
   ``localhost`` signed by it (``DIR/certs``); SuperLink ``--ssl-*``, SuperNodes and the
   ``flwr`` CLI ``root-certificates``. ``--insecure`` turns it off.
2. Node authentication (default on): an EC (P-384) key pair per site (``DIR/keys``), the
   SuperLink started with ``--enable-supernode-auth``, each public key registered with
   ``flwr supernode register`` (which returns the node id), and the **site registry**
   ``DIR/sites.json`` (site -> node id, partition) the ServerApp checks requests against.
3. The SuperLink (``--database DIR/superlink.db``: registrations survive a restart) and
   one SuperNode per site with its own ``--node-config`` (``partition-id``,
   ``num-partitions``, ``site``, ``erasure-inbox``, optionally ``data-file``), each with
   its own ClientAppIo port.
4. ``DIR/flwr/config.toml``: the ``deploy`` federation for ``flwr run . deploy``.

``run`` submits the same app as the simulation (``mode = "service"``), waits for the run
to finish and checks its status with ``flwr list``. PIDs are kept in ``DIR/deployment.json``;
``down`` stops everything by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shlex
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .run_experiment import PROJECT_ROOT, executable, free_port, quiet_env, stage_app

FEDERATION = "deploy"


def exited(pid: int) -> bool:
    """Whether ``pid`` has ended: reaped if it is this process's child, or gone / a zombie otherwise.

    ``os.kill(pid, 0)`` alone succeeds on a zombie, so an unreaped child would look alive.
    """
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass  # not our child: ask /proc
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def terminate(pids: list[int], group: bool = False, grace: float = 5.0) -> None:
    """SIGTERM ``pids`` (their process groups if ``group``), then SIGKILL what is left after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if not exited(p)]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p, sig) if group else os.kill(p, sig)
        deadline = time.monotonic() + grace
        while live and time.monotonic() < deadline and not all(exited(p) for p in live):
            time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``), children first-level before theirs.

    The SuperLink starts its SuperExec in a *new session* and the SuperExec starts the
    ServerApp process, so a signal to the SuperLink's process group does not reach the
    ServerApp; this walk does.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


# -- credentials ------------------------------------------------------------------------------
def _san(host: str) -> Any:
    """A subject-alternative-name entry: an IP address, or a DNS name."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls(folder: Path, hosts: Sequence[str] = ()) -> dict[str, Path]:
    """A self-signed CA and a server certificate signed by it (PEM files).

    The certificate is valid for 127.0.0.1, localhost and every name or IP in ``hosts``: the
    addresses the SuperNodes of other machines use to reach the SuperLink.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP384R1())

    def write_key(k: Any, path: Path) -> None:
        path.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fed-unlearn deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = key()
    srv = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(["localhost", "127.0.0.1", *hosts])]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    write_key(srv_key, paths["key"])
    return paths


def make_node_keys(folder: Path, site: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for a SuperNode in OpenSSH format: (private key, public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    k = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / f"{site}", folder / f"{site}.pub"
    priv.write_bytes(
        k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    priv.chmod(0o600)
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return priv, pub


# -- the deployment ---------------------------------------------------------------------------
@dataclass
class Deployment:
    """One loopback deployment, its processes and files (persisted in ``DIR/deployment.json``)."""

    dir: str
    sites: list[str]
    tls: bool = True
    auth: bool = True
    port: int = 0
    node_ids: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    data_files: dict[str, str] = field(default_factory=dict)
    #: Extra node-config entries per site (``key='value'`` strings).
    node_extra: dict[str, str] = field(default_factory=dict)
    #: The Flower app to run (default: this repository's).
    app: str = ""
    #: How SuperNodes start ClientApp tasks: ``subprocess`` (Flower's SuperExec, a fresh process
    #: per message) or ``warm`` (:mod:`fed_unlearn.flower.warm_superexec`, forked from a warm parent).
    executor: str = "subprocess"
    #: Seconds between SuperExec task polls (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; "" = Flower's default 1 s).
    poll_interval: str = ""

    # paths
    @property
    def root(self) -> Path:  # noqa: D102
        return Path(self.dir)

    @property
    def flwr_home(self) -> Path:  # noqa: D102
        return self.root / "flwr"

    def inbox(self, site: str) -> Path:
        """The site's erasure inbox (its SuperNode's node-config ``erasure-inbox``)."""
        return self.root / "sites" / site / "erasure-inbox"

    @property
    def registry(self) -> Path:  # noqa: D102
        return self.root / "sites.json"

    @property
    def state_dir(self) -> Path:
        """The service's journal, checkpoint and audit reports."""
        return self.root / "service"

    def save(self) -> None:
        """Write ``deployment.json``."""
        (self.root / "deployment.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> Deployment:
        """Read ``deployment.json`` (written by ``up``).

        Raises
        ------
        ValueError
            If it is missing or is not a deployment's description (naming the file).
        """
        path = Path(folder) / "deployment.json"
        if not path.is_file():
            raise ValueError(f"no deployment in {folder} ({path.name} is missing): start one with `up --dir {folder}`")
        try:
            fields = json.loads(path.read_text())
            if not isinstance(fields, dict):
                raise TypeError("not a JSON object")
            return cls(**fields)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not a deployment written by `up` ({exc})") from None

    def env(self) -> dict[str, str]:
        """The offline environment for every process (shared FLWR_HOME for the CLI)."""
        ray_tmp = self.root / "tmp"
        ray_tmp.mkdir(parents=True, exist_ok=True)
        env = quiet_env(self.flwr_home, ray_tmp)
        if self.poll_interval:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = self.poll_interval
        return env

    def _log(self, name: str) -> Any:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return open(logs / f"{name}.log", "ab")

    # processes
    def superlink_cmd(self) -> list[str]:
        """The SuperLink command line."""
        cmd = [
            executable("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--isolation",
            "subprocess",
            "--database",
            str(self.root / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            certs = self.root / "certs"
            cmd += [
                "--ssl-ca-certfile",
                str(certs / "ca.crt"),
                "--ssl-certfile",
                str(certs / "server.crt"),
                "--ssl-keyfile",
                str(certs / "server.key"),
            ]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        return cmd

    def start_superlink(self, timeout: float = 90.0) -> int:
        """Start the SuperLink and wait until its API answers; returns its PID."""
        proc = self._spawn("superlink", self.superlink_cmd())
        self.save()
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context(cafile=str(self.root / "certs" / "ca.crt")) if self.tls else None
        scheme = "https" if self.tls else "http"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {self.root / 'logs'}")
            try:
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.port}/health", timeout=1.0, context=ctx) as r:
                    if r.status == 200:
                        return proc.pid
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"SuperLink not healthy within {timeout:.0f}s; see {self.root / 'logs'}")

    def node_config(self, site: str) -> str:
        """The ``--node-config`` of a site's SuperNode."""
        i = self.sites.index(site)
        parts = [
            f"partition-id={i}",
            f"num-partitions={len(self.sites)}",
            f"site='{site}'",
            f"erasure-inbox='{self.inbox(site)}'",
        ]
        if site in self.data_files:
            parts.append(f"data-file='{self.data_files[site]}'")
        if site in self.node_extra:
            parts.append(self.node_extra[site])
        return " ".join(parts)

    def supernode_cmd(self, site: str, clientappio_port: int) -> list[str]:
        """A site's SuperNode command line."""
        cmd = [
            executable("flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--node-config",
            self.node_config(site),
            "--port",
            str(clientappio_port),
            "--isolation",
            "process" if self.executor == "warm" else "subprocess",
        ]
        cmd += ["--root-certificates", str(self.root / "certs" / "ca.crt")] if self.tls else ["--insecure"]
        if self.auth:
            cmd += ["--auth-supernode-private-key", str(self.root / "keys" / site)]
        return cmd

    def start_supernode(self, site: str) -> int:
        """Start one site's SuperNode; returns its PID."""
        self.inbox(site).mkdir(parents=True, exist_ok=True)
        port = free_port()
        pid = self._spawn(f"supernode-{site}", self.supernode_cmd(site, port)).pid
        if self.executor == "warm":  # the SuperNode expects its SuperExec to be started next to it
            cmd = [sys.executable, "-m", "fed_unlearn.flower.warm_superexec", "--runtime-api-address"]
            self._spawn(f"superexec-{site}", [*cmd, f"127.0.0.1:{port}", "--insecure", "--parent-pid", str(pid)])
        self.save()
        return pid

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start a process in its own session, logging to ``logs/<name>.log``; recorded in ``pids``."""
        proc = subprocess.Popen(
            cmd,
            env=self.env(),
            cwd=str(PROJECT_ROOT),
            stdout=self._log(name),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pids[name] = proc.pid
        return proc

    def restart_supernode(self, site: str, timeout: float = 240.0, settle: float = 10.0) -> int:
        """Restart a site's SuperNode the way a process supervisor would, until it stays up.

        After a ``kill -9`` the SuperLink keeps the node online until its heartbeat expires
        (about two heartbeat intervals, ~60 s by default) and refuses to activate it again in
        the meantime: the new SuperNode exits with code 305. Like ``systemd`` with
        ``Restart=on-failure``, this starts it again until it survives ``settle`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            pid = self.start_supernode(site)
            time.sleep(settle)
            if not exited(pid) or time.monotonic() > deadline:
                return pid
            time.sleep(settle)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment."""
        return subprocess.run(
            [executable("flwr"), *args],
            env=self.env(),
            cwd=str(PROJECT_ROOT),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def write_cli_config(self) -> None:
        """``FLWR_HOME/config.toml`` with the ``deploy`` federation."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{FEDERATION}"',
            "",
            f"[superlink.{FEDERATION}]",
            f'address = "127.0.0.1:{self.port}"',
        ]
        lines += [f'root-certificates = "{self.root / "certs" / "ca.crt"}"'] if self.tls else ["insecure = true"]
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def register(self, site: str) -> int:
        """``flwr supernode register`` a site's public key; returns the node id the SuperLink assigned."""
        out = self.flwr(
            "supernode",
            "register",
            str(self.root / "keys" / f"{site}.pub"),
            FEDERATION,
            "--name",
            site,
            "--format",
            "json",
        )
        try:
            return int(json.loads(out.stdout[out.stdout.index("{") :])["node-id"])
        except (ValueError, KeyError):
            raise RuntimeError(f"registering {site} failed: {out.stdout[-800:]} {out.stderr[-800:]}") from None

    def up(self) -> None:
        """Credentials, SuperLink, registrations and registry, SuperNodes, CLI config."""
        from fed_unlearn.erasure import SiteRegistry

        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        if self.tls:
            make_tls(self.root / "certs")
        self.write_cli_config()
        self.start_superlink()
        if self.auth:
            for site in self.sites:
                make_node_keys(self.root / "keys", site)
                self.node_ids[site] = self.register(site)
            SiteRegistry({s: {"node-id": self.node_ids[s], "partition-id": i} for i, s in enumerate(self.sites)}).write(
                self.registry
            )
        for site in self.sites:
            self.start_supernode(site)
        self.save()

    def submit(self, run_config: str) -> int:
        """``flwr run . deploy --run-config ...`` (from a staged copy of the app); returns the run id."""
        app = stage_app(Path(self.app or PROJECT_ROOT), self.root / "app")
        cmd = ["run", str(app), FEDERATION, "--format", "json", "--run-config", run_config]
        print("$ flwr", " ".join(shlex.quote(c) for c in cmd), flush=True)
        out = self.flwr(*cmd)
        try:
            return int(json.loads(out.stdout[out.stdout.index("{") :])["run-id"])
        except (ValueError, KeyError):
            raise RuntimeError(f"flwr run failed: {out.stdout[-1500:]} {out.stderr[-1500:]}") from None

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr list`` reports it (``finished:completed`` ...)."""
        out = self.flwr("list", FEDERATION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            runs = json.loads(out.stdout[out.stdout.index("{") :])["runs"]
        except (ValueError, KeyError):
            return "unknown"
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def wait(self, run_id: int, timeout: float = 1800.0) -> str:
        """Wait for the run to finish; returns its final status."""
        deadline = time.monotonic() + timeout
        status = self.status(run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(2.0)
            status = self.status(run_id)
        return status

    def service_config(self, rounds: int, extra: str = "") -> str:
        """The run config of the erasure service on this deployment."""
        rc = f"mode='service' num-server-rounds={rounds} service.state-dir='{self.state_dir}' node-wait-seconds=300.0"
        if self.auth:
            rc += f" service.sites-file='{self.registry}'"
        return f"{rc} {extra}".strip()

    def checked(self, run_config: str) -> str:
        """``run_config`` once the service's settings in it pass their checks (here, before any run is submitted).

        Raises
        ------
        ValueError
            Naming the setting (the same checks the ServerApp makes, minutes earlier).
        """
        if self.app:  # a user's app reads its own settings
            return run_config
        from fed_unlearn.config import ExperimentConfig, ServiceConfig
        from fed_unlearn.unlearning import config_from_run_config
        from server.service import check_service

        from .inprocess import fused_run_config

        rc = fused_run_config(str(PROJECT_ROOT), run_config)
        check_service(ExperimentConfig.from_run_config(rc), config_from_run_config(ServiceConfig, rc, "service"))
        return run_config

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a process by its name in ``pids``, its session and every descendant.

        For the SuperLink that includes the SuperExec and the ServerApp process of a running
        run (they live in another session): ``kill("superlink")`` is a crash of the server.
        """
        pid = self.pids.get(name)
        if pid:
            tree = descendants(pid)
            for p in (pid, *tree):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p, sig) if p == pid else os.kill(p, sig)

    def down(self) -> None:
        """Stop every process by PID (SIGTERM, then SIGKILL), descendants included."""
        for name, pid in list(self.pids.items()):
            for child in descendants(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            terminate([pid], group=True)
            self.pids.pop(name)
        self.save()


def _sites(text: str) -> int:
    n = int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"a federation needs at least 2 sites (one may leave), got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (one line on stderr and 2 for any error)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    certs = sub.add_parser("certs", help="a CA and a SuperLink certificate for the given host names / IPs")
    certs.add_argument("--dir", required=True, help="where ca.crt, server.crt and server.key are written")
    certs.add_argument("--host", action="append", default=[], help="the SuperLink's name or IP (repeatable)")
    for name in ("up", "run", "request", "status", "down", "demo"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=str(PROJECT_ROOT / "results" / "deploy"))
        if name in ("up", "demo"):
            p.add_argument("--sites", type=_sites, default=3)
            p.add_argument("--insecure", action="store_true", help="no TLS")
            p.add_argument("--no-auth", action="store_true", help="no SuperNode authentication (no site registry)")
            p.add_argument(
                "--executor",
                choices=("subprocess", "warm"),
                default="warm",
                help="warm: ClientApp tasks forked from a SuperExec that imported torch once (default); "
                "subprocess: Flower's SuperExec, a fresh process per message",
            )
            p.add_argument(
                "--poll-interval", default="0.1", help="seconds between SuperExec task polls (Flower's default: 1)"
            )
        if name in ("run", "demo"):
            p.add_argument("--rounds", type=int, default=6)
            p.add_argument("--run-config", default="dataset='digits'")
        if name == "request":
            p.add_argument("--site", required=True)
            p.add_argument("--reason", default="")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except Exception as exc:  # noqa: BLE001  (a CLI: one line, the traceback with --debug)
        if args.debug:
            raise
        print(
            f"error: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}", file=sys.stderr
        )
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "certs":
        paths = make_tls(Path(args.dir), args.host)
        print(
            f"CA {paths['ca']} (give it to every site); SuperLink certificate {paths['cert']} and key "
            f"{paths['key']} for {', '.join(['localhost', '127.0.0.1', *args.host])}"
        )
        return 0
    if args.cmd in ("up", "demo"):
        dep = Deployment(
            args.dir,
            [f"site-{i}" for i in range(args.sites)],
            tls=not args.insecure,
            auth=not args.no_auth,
            executor=args.executor,
            poll_interval=args.poll_interval,
        )
        try:
            dep.up()
        except BaseException:
            dep.down()  # nothing half-started is left running
            raise
        print(
            f"SuperLink on 127.0.0.1:{dep.port} (TLS {'on' if dep.tls else 'off'}, "
            f"node auth {'on' if dep.auth else 'off'}); "
            f"sites {dep.node_ids or dep.sites}; state in {dep.root}"
        )
        if args.cmd == "up":
            return 0
        try:
            return demo(dep, args.rounds, args.run_config)
        finally:
            dep.down()
    dep = Deployment.load(args.dir)
    if args.cmd == "down":
        dep.down()
        return 0
    if args.cmd == "request":
        from clients.request_erasure import main as request

        return request(["--inbox", str(dep.inbox(args.site)), "--site", args.site, "--reason", args.reason])
    if args.cmd == "status":
        from server.service import describe

        print(describe(dep.state_dir), end="")
        return 0
    run_id = dep.submit(dep.checked(dep.service_config(args.rounds, args.run_config)))
    status = dep.wait(run_id)
    print(f"run {run_id}: {status}")
    return 0 if status == "finished:completed" else 1


def demo(dep: Deployment, rounds: int, run_config: str) -> int:
    """The runbook end to end: train, site-1 asks to be forgotten, serve, audit."""
    from clients.request_erasure import main as request
    from server.service import describe

    first = max(2, rounds // 2)
    run_id = dep.submit(dep.checked(dep.service_config(first, run_config)))
    print(f"run {run_id}: {dep.wait(run_id)}")
    request(["--inbox", str(dep.inbox(dep.sites[1])), "--site", dep.sites[1], "--reason", "demo: the site leaves"])
    run_id = dep.submit(dep.service_config(rounds, run_config))
    status = dep.wait(run_id)
    print(f"run {run_id}: {status}\n{describe(dep.state_dir)}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
