"""The README is a front door: small, its links resolve, its example is the example app's code."""

from __future__ import annotations

import re
from pathlib import Path

TIER = "unit"  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*/README.md"))]


def test_readme_is_at_most_15_kb():
    assert (ROOT / "README.md").stat().st_size <= 15 * 1024


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an address outside the repository
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md":
                slugs = {
                    re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                    for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
                }
                if anchor not in slugs:
                    broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_serverapp_is_the_example_apps():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Use fed-unlearn in your own Flower app.*?```python\n(.*?)```", readme, flags=re.S).group(1)
    example = (ROOT / "examples/quickstart-unlearning/quickstart_unlearning/server_app.py").read_text()
    assert block.strip() in example
