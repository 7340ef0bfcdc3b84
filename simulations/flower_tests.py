"""Run Flower's own strategy unit tests against the strategies wrapped for unlearning.

Flower's repository keeps unit tests next to its strategies
(``framework/py/flwr/serverapp/strategy/*_test.py``). This check copies them into a
temporary directory (never into this repository), makes their relative imports point at
the installed ``flwr``, and runs them twice: as they are, and with every strategy class
they import replaced by ``Unlearning(<that strategy>(...), method="puf")``. The wrapped
strategy passes what the bare one passes: ordinary rounds are the wrapped strategy's,
attributes it does not own are forwarded, calls without ``configure_train`` are ordinary
rounds.

    python -m simulations.flower_tests --flower ~/src/flower           # a checkout
    python -m simulations.flower_tests --flower /path/to/flower.git    # a bare git directory

Needs ``pytest`` and ``parameterized`` (``pip install parameterized``). Exit code 0 when the
wrapped run passes every test the bare run passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = "framework/py/flwr/serverapp/strategy"

SHIM = '''\
import functools

from flwr.serverapp.strategy import Strategy

from fed_unlearn.flower import Unlearning


def wrap(obj):
    """A strategy class -> a factory of the same strategy wrapped for unlearning; anything else unchanged."""
    if isinstance(obj, type) and issubclass(obj, Strategy):

        @functools.wraps(obj)
        def make(*args, **kwargs):
            return Unlearning(obj(*args, **kwargs), method="puf")

        return make
    return obj
'''

_IMPORT = re.compile(r"^from \.([\w.]*) import (\([\w,\s]+?\)|[\w, ]+)$", re.M)


def read_tests(flower: Path) -> dict[str, str]:
    """``{file name: source}`` of Flower's strategy tests, from a checkout or a bare git directory."""
    folder = flower / TESTS
    if folder.is_dir():
        return {p.name: p.read_text() for p in sorted(folder.glob("*_test.py"))}
    git = ["git", "--git-dir", str(flower)]
    names = subprocess.run([*git, "ls-tree", "--name-only", f"HEAD:{TESTS}"], capture_output=True, text=True)
    if names.returncode:
        raise SystemExit(f"no Flower strategy tests under {flower} ({TESTS}): {names.stderr.strip()}")
    out = {}
    for name in names.stdout.split():
        if name.endswith("_test.py"):
            out[name] = subprocess.run([*git, "show", f"HEAD:{TESTS}/{name}"], capture_output=True, text=True).stdout
    return out


def rewrite(source: str, wrap: bool) -> str:
    """Relative imports made absolute; with ``wrap``, the imported strategy classes rebound to wrapped factories."""
    names: list[str] = []

    def absolute(m: re.Match[str]) -> str:
        module, what = m.group(1), m.group(2).strip("()")
        items = [w.strip() for w in what.replace("\n", " ").split(",") if w.strip()]
        if module.endswith("_test"):
            return f"from {module} import {', '.join(items)}"
        if module.startswith("."):  # from ..exception import X
            return f"from flwr.serverapp{'.' + module[1:] if module[1:] else ''} import {', '.join(items)}"
        names.extend(items)
        return f"from flwr.serverapp.strategy.{module} import {', '.join(items)}"

    text = _IMPORT.sub(absolute, source)
    if wrap and names:
        lines = text.split("\n")
        last = max(i for i, line in enumerate(lines) if line.startswith("from "))
        lines[last + 1 : last + 1] = ["from unlearning_shim import wrap as _wrap"] + [
            f"{n} = _wrap({n})" for n in names
        ]
        text = "\n".join(lines)
    return text


def run(tests: dict[str, str], wrap: bool, workdir: Path) -> tuple[set[str], set[str]]:
    """Pass and fail node ids of one pytest run."""
    workdir.mkdir(parents=True)
    for name, source in tests.items():
        (workdir / name).write_text(rewrite(source, wrap))
    (workdir / "unlearning_shim.py").write_text(SHIM)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-n", "0", "-o", "addopts=", "."],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    passed = set(re.findall(r"^PASSED (\S+)", proc.stdout, re.M))
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M))
    if not passed and not failed:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return passed, failed


def main(argv: list[str] | None = None) -> int:
    """Run the check; print the counts and any test the wrapped strategy fails."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flower", type=Path, required=True, help="a Flower checkout or bare git directory")
    args = ap.parse_args(argv)
    tests = read_tests(args.flower)
    if not tests:
        print(f"no *_test.py under {args.flower / TESTS}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        bare_ok, bare_bad = run(tests, False, Path(tmp) / "bare")
        wrap_ok, wrap_bad = run(tests, True, Path(tmp) / "wrapped")
    print(f"Flower's strategy tests ({len(tests)} files): bare {len(bare_ok)} passed, {len(bare_bad)} failed")
    print(f"wrapped with Unlearning(..., method='puf'): {len(wrap_ok)} passed, {len(wrap_bad)} failed")
    lost = sorted(bare_ok - wrap_ok)
    for t in lost:
        print(f"  fails only wrapped: {t}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
