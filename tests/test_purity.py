"""The library stays free of Flower: its math is testable without flwr or Ray; only fed_unlearn.flower imports it."""

import subprocess
import sys

TIER = "unit"  # see tests/conftest.py


def test_library_imports_no_flwr():
    code = (
        "import importlib, pathlib, sys\n"
        "import fed_unlearn\n"
        "root = pathlib.Path(fed_unlearn.__file__).parent\n"
        "mods = ['fed_unlearn.' + '.'.join(p.relative_to(root).with_suffix('').parts).removesuffix('.__init__')\n"
        "        for p in sorted(root.rglob('*.py'))]\n"
        "assert 'fed_unlearn.unlearning.federaser' in mods and 'fed_unlearn.flower.strategy' in mods, mods\n"
        "for m in mods:\n"
        "    if not m.startswith('fed_unlearn.flower'):\n"
        "        importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.') or m == 'ray')\n"
        "assert not bad, bad\n"
        "import fed_unlearn.flower\n"
        "assert 'flwr' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
