"""End to end through `flwr run` on Flower's Ray simulation engine (slow: ~30-60 s each).

The methods themselves are tested on the in-process engine (tests/test_experiment.py), which
runs the same ClientApp code; here: the launcher, Ray (private and an existing cluster), the
harness across engines, with the same numbers as in-process.

The launcher starts a private SuperLink, submits the app with `flwr run`, and
reports the run's final status (not `flwr run`'s exit code, which is 0 even for a
failed run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = "dataset='digits' num-server-rounds=4 unlearn.round=3 unlearn.recovery='fixed'"
# a method with a client routine and two unlearning rounds (class deletion)
TRW = "dataset='digits' num-server-rounds=5 unlearn.round=3 unlearn.method='trw' unlearn.scenario='class'"
TRW += " unlearn.class=3"


def launch(tmp_path: Path, run_config: str, clients: int = 3) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.run_experiment",
            "--num-clients",
            str(clients),
            "--results-dir",
            str(tmp_path),
            "--run-config",
            run_config,
            "--timeout",
            "600",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.e2e
def test_flwr_run_simulation_produces_the_report(tmp_path):
    proc = launch(tmp_path, SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished:completed" in proc.stdout
    (res_file,) = tmp_path.glob("*/results.json")
    res = json.loads(res_file.read_text())
    assert set(res["report"]) == {"original", "unlearned", "gold"}
    assert res["report"]["gold"]["kl-forget"] == 0.0
    assert res["train-history"]["4"]["clients"] == 2  # the departed client no longer trains
    assert (res_file.parent / "accuracy.png").is_file()
    assert res["config"]["dataset"] == "digits" and res["recovery"]["rounds-run"] == 1
    # Ray ran the same ClientApp code: the in-process engine gives the same numbers
    from simulations.inprocess import run_inprocess

    local = run_inprocess(str(ROOT), 3, f"{SMALL} results-dir='{tmp_path / 'local'}'")
    for model in ("original", "unlearned", "gold"):
        for key, value in res["report"][model].items():
            assert local["report"][model][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (model, key)


@pytest.mark.e2e
def test_failed_run_is_reported_as_failed(tmp_path):
    # this repository's app: a bad setting is refused before the run is submitted (the SuperLink it
    # started meanwhile is stopped)
    proc = launch(tmp_path, SMALL + " unlearn.departing='9'")
    assert proc.returncode == 2 and not proc.stdout
    assert "'unlearn.departing' names client(s) [9], but there are 3" in proc.stderr
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert not left.stdout.strip(), f"a process of the refused run is still running: {left.stdout}"
    # another app, which the launcher cannot check beforehand, fails inside the run: Flower's
    # `flwr run` would exit 0; the launcher reads the run's status and exits 1
    app = ROOT / "tests" / "own_app"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run_experiment", "--app", str(app), "--num-clients", "3"]
        + ["--results-dir", str(tmp_path), "--run-config", "departing=9 num-server-rounds=2 departure-round=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished:failed" in proc.stdout and "no connected node has partition-id=9" in proc.stderr


@pytest.mark.e2e
def test_harness_grid_is_summarised_resumable_and_engine_independent(tmp_path):
    """2 methods x 1 scenario (sample deletion) x 2 seeds through flwr run on Ray; in-process gives the same numbers."""
    grid = [
        "--methods",
        "puf",
        "retrain",
        "--scenarios",
        "samples-random",
        "--seeds",
        "0",
        "1",
        "--num-clients",
        "3",
        "--audit-references",
        "2",
        "--run-config",
        "dataset='digits' num-server-rounds=5 unlearn.round=3 unlearn.recovery='until-gold'",
    ]
    cmd = [
        sys.executable,
        "-m",
        "simulations.harness",
        *grid,
        "--engine",
        "ray",
        "--results-dir",
        str(tmp_path / "ray"),
    ]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "ray" / "harness"
    data = json.loads((out / "harness.json").read_text())
    stats = data["statistics"]["samples-random"]
    assert set(stats) == {"original", "puf", "retrain", "gold", "gold-twin"} and data["engine"] == "ray"
    assert stats["gold-twin"]["kl-forget"]["mean"] > 0  # a retraining with other seeds is not the gold
    assert stats["puf"]["average-gap"]["n"] == 2 and stats["gold"]["average-gap"]["mean"] == 0.0
    # retraining with the gold's seeds is the gold (until-gold recovery: no extra round after it)
    assert stats["retrain"]["l2-to-gold"]["mean"] == 0.0 and stats["retrain"]["recovery-rounds"]["mean"] == 0.0
    for f in ("harness.png", "harness_samples-random.png", "harness.csv", "harness.md"):
        assert (out / f).is_file()
    cached = [p.name for p in (tmp_path / "ray" / "gold-cache").iterdir()]
    # one gold, its twin, one original and two reference federations per seed, shared by both methods
    kinds = [
        n.split("-")[0] if n.startswith(("original-", "reference-")) else "twin" if n.endswith("-twin") else "gold"
        for n in cached
    ]
    assert [kinds.count(k) for k in ("gold", "twin", "original", "reference")] == [2, 2, 2, 4]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already done, skipped") == 4
    local = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.harness",
            *grid,
            "--engine",
            "inprocess",
            "--results-dir",
            str(tmp_path / "local"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    same = json.loads((tmp_path / "local" / "harness" / "harness.json").read_text())["statistics"]["samples-random"]
    for col in stats:
        for key in ("test-acc", "forget-acc", "mia-auc", "kl-forget", "l2-to-gold", "relearn-steps", "rmia-auc"):
            if stats[col][key]["n"]:  # the twin is neither probed for relearning nor audited
                assert same[col][key]["mean"] == pytest.approx(stats[col][key]["mean"], abs=1e-9), (col, key)


def stop_ray_head(ray_dir: Path, port: int) -> None:
    """Stop the Ray head started on ``ray_dir`` / ``port`` by PID, its workers included.

    ``ray stop`` would stop every Ray process of the machine, other runs' included. The head's
    daemons name its temp dir or its GCS address on their command lines; the rest descend
    from them.
    """
    from simulations.deploy import descendants, terminate

    roots = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(str(ray_dir) in a or a.endswith(f":{port}") for a in args):
            roots.append(int(cmdline.parent.name))
    terminate(list(dict.fromkeys(roots + [d for r in roots for d in descendants(r)])), grace=10.0)


@pytest.mark.e2e
def test_a_simulation_runs_on_an_existing_ray_cluster_with_the_same_numbers(tmp_path):
    import os
    import shutil
    import tempfile

    from simulations.run_experiment import executable, free_port

    port = free_port()
    ray_dir = Path(tempfile.mkdtemp(prefix="fu-rh-"))  # short: Ray's unix sockets live there
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [executable("ray"), "start", "--head", "--port", str(port), "--num-cpus", "2"]
    head += ["--include-dashboard", "false", "--temp-dir", str(ray_dir), "--disable-usage-stats"]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "simulations.run_experiment", "--num-clients", "3", "--results-dir"]
            + [str(tmp_path), "--run-config", TRW, "--ray-address", f"127.0.0.1:{port}", "--timeout", "600"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # the run's driver attached to this cluster (a private Ray would log elsewhere)
        assert list((ray_dir / "session_latest" / "logs").glob("python-core-driver-*"))
    finally:
        stop_ray_head(ray_dir, port)
        shutil.rmtree(ray_dir, ignore_errors=True)
    (res_file,) = tmp_path.glob("*/results.json")
    res = json.loads(res_file.read_text())
    # TRW's client routine ran on the cluster's workers: its two rounds, the class forgotten
    assert res["method"]["name"] == "trw" and res["recovery"]["unlearning-rounds"] == 2
    assert res["report"]["unlearned"]["forget-acc"] < 0.05
    from simulations.inprocess import run_inprocess

    local = run_inprocess(str(ROOT), 3, f"{TRW} results-dir='{tmp_path / 'local'}'")
    for model in ("original", "unlearned", "gold"):
        for key, value in res["report"][model].items():
            assert local["report"][model][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (model, key)
