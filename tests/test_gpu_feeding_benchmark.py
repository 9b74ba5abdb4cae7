"""benchmarks/gpu_feeding.py runs end to end (tiny settings) and labels its figures SIMULATED.

The figures are not asserted here (a loaded 2-core machine); the benchmark itself checks the
acceptance lines on a real run and prints which hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_feeding_measures_every_design_and_checks_the_acceptance_lines(
    cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feeding.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "gpu_feeding.py"),
        "--counts", "2", "--seconds", "0.5", "--warmup", "0.5", "--rounds", "1",
        "--handoff-rounds", "2",
        "--cache-dir", str(cache_dir), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    designs = {row["design"] for row in results["rows"]}
    assert designs == {"per-worker", "per-worker+mps", "shared", "null-per-worker", "null-shared"}
    for row in results["rows"]:
        assert row["frames_per_s"] > 0, row
        assert row["server_cpu_us_per_frame"] > 0, row
        if not row["design"].startswith("null"):
            assert row["SIMULATED_device_us_per_frame"] > 0, row
            assert 0 < row["SIMULATED_device_busy"] <= 1.05, row
            assert sum(row["batches_by_size"].values()) > 0, row
    # Every acceptance line is checked and reported, whichever way it came out.
    assert len(results["checks"]) == 3  # two against per-worker at N=2, the hand-off's CPU
    assert len(results["notes"]) == 2  # against per-worker+mps
    # The hand-off: both servers, loaded in turn, one window each per round; the cost is the
    # median of the rounds' paired differences, reported with their spread.
    handoff = [row for row in results["rows"] if row["design"].startswith("null")]
    assert sorted((row["round"], row["design"]) for row in handoff) == [
        (r, d) for r in range(2) for d in ("null-per-worker", "null-shared")
    ]
    assert results["handoff"]["rounds"] == 2
    assert len(results["handoff"]["extra_us_per_frame"]) == 2
    assert "SIMULATED device" in done.stdout
    assert "hand-off costs" in done.stdout
