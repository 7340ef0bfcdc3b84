"""The library stays free of Flower: its math is testable without flwr or Ray."""

import subprocess
import sys


def test_library_imports_no_flwr():
    code = (
        "import importlib, pkgutil, sys\n"
        "import fed_unlearn\n"
        "mods = [m.name for m in pkgutil.walk_packages(fed_unlearn.__path__, 'fed_unlearn.')]\n"
        "assert 'fed_unlearn.unlearning.federaser' in mods and 'fed_unlearn.deletion' in mods, mods\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.') or m == 'ray')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
