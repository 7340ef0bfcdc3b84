"""What a user installs: the fed_unlearn library only, importable from a wheel in a fresh environment."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_the_wheel_holds_the_library_only_and_imports_in_a_fresh_venv(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("fed_unlearn-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert "fed_unlearn" in tops
    assert not tops & {"server", "clients", "simulations", "tests", "examples"}, tops
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300
    )
    # the dependencies (flwr, torch, ...) come from this environment's site-packages, behind the fresh venv's own
    deps = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path.append({deps!r}); import fed_unlearn, fed_unlearn.flower, fed_unlearn.protocol; "
        "from fed_unlearn.flower import Unlearning, add_unlearning; print(fed_unlearn.__file__)"
    )
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(venv)), out.stdout
    for name in ("server", "clients", "simulations"):
        assert not list((venv / "lib").glob(f"python*/site-packages/{name}"))
