"""benchmarks/worker_scaling.py runs end to end and prints its table (figures not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_worker_scaling_prints_a_row_per_worker_count(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "worker_scaling.py"),
        "--workers", "1,2", "--seconds", "0.5", "--warmup", "0.5",
        "--cache-dir", str(cache_dir), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [row["workers"] for row in rows] == [1, 2]
    for row in rows:
        assert row["frames_per_s"] > 0
        assert row["server_cpu_us_per_frame"] > 0
    assert "workers  frames/s  x one worker  efficiency" in done.stdout
