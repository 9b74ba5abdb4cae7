"""benchmarks/stream_backpressure.py runs end to end and prints its table (figures not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stream_backpressure_prints_a_row_per_way(tmp_path: Path) -> None:
    out = tmp_path / "backpressure.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "stream_backpressure.py"),
        "--cameras", "2", "--seconds", "1.5", "--rounds", "1", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())["summary"]
    assert list(summary) == ["drop-oldest", "drop-oldest+max-age", "hints+max-age"]
    for row in summary.values():
        assert row["answered_per_s"] > 0
        assert row["bytes_sent_per_answered"] > 0
    # Only the session that follows hints skips frames at capture.
    assert summary["drop-oldest"]["skipped_at_capture"] == 0
    assert summary["hints+max-age"]["skipped_at_capture"] > 0
    assert "hints against drop-oldest" in done.stdout
