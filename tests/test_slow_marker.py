"""The README's way to skip slow tests locally: ``pytest -m "not slow"`` (CI runs them all)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOW_ONLY = "tests/server/test_under_load.py"  # every test in it is marked slow
NONE_SLOW = "tests/test_layering.py"  # none is


def collected(*args: str) -> list[str]:
    """The test ids pytest collects with ``args`` (strict markers: a typo'd marker fails)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *args, SLOW_ONLY, NONE_SLOW],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_not_slow_leaves_out_the_slow_tests_and_keeps_the_others() -> None:
    everything = collected()
    quick = collected("-m", "not slow")
    slow = [test for test in everything if test.startswith(SLOW_ONLY)]
    assert len(slow) >= 2, everything
    assert quick == [test for test in everything if not test.startswith(SLOW_ONLY)]
    assert any(test.startswith(NONE_SLOW) for test in quick), quick
