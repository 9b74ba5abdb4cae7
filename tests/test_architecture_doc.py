"""docs/architecture.md names modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()
SOURCES = [
    p.relative_to(ROOT).as_posix()
    for p in ROOT.glob("*/src/**/*.py")
    if ".venv" not in p.parts and "_proto" not in p.parts
]


def test_every_module_the_page_names_exists() -> None:
    checked = 0
    for line in DOC.splitlines():
        for name in re.findall(r"`([\w/]+\.py)`", line):
            checked += 1
            found = (ROOT / name).is_file() or any(s.endswith("/" + name) for s in SOURCES)
            assert found, f"{name} (in: {line.strip()})"
    assert checked > 30


def test_the_page_walks_the_four_calls() -> None:
    for call in ("Classify", "ClassifyStream", "ModelInfer", "ModelStreamInfer"):
        assert f"\n### {call}" in DOC, call
    assert "## The layering rule" in DOC
    assert "## Rooms" in DOC
