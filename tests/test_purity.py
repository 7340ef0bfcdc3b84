"""The library stays free of Flower: its math is testable without flwr or Ray."""

import subprocess
import sys


def test_library_imports_no_flwr():
    code = (
        "import sys\n"
        "import fed_unlearn, fed_unlearn.aggregation, fed_unlearn.unlearning, fed_unlearn.metrics\n"
        "import fed_unlearn.evaluation, fed_unlearn.config, fed_unlearn.report, fed_unlearn.gold_cache\n"
        "from fed_unlearn.data import load_digits\n"
        "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.') or m == 'ray')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
