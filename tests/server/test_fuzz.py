"""A seeded fuzz of every method of a real `framecast serve` process (benchmarks/fuzz_long.py).

Malformed messages of every kind get a clear status, never UNKNOWN or INTERNAL, nor a traceback
in the server's log; a good request succeeds after every batch of cases; the server's memory
stays flat and it exits 0 on SIGTERM. The long run (50,000 cases) is the same script.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = 6000  # over six method groups: 1,000 each, a few seconds in all


@pytest.mark.slow
def test_malformed_messages_get_clear_statuses_and_the_server_keeps_serving(
    cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fuzz.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "fuzz_long.py"), "--cases", str(CASES),
        "--seed", "11", "--cache-dir", str(cache_dir), "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert out.exists(), done.stderr
    report = json.loads(out.read_text())
    assert report["cases"] == CASES
    assert report["unknown_or_internal"] == 0, report["codes"]
    assert report["tracebacks"] == 0, done.stderr
    assert report["long_details"] == 0
    assert report["streams_failed"] == 0
    assert report["good_failed"] == 0
    assert report["codes"]["INVALID_ARGUMENT"] > CASES // 4  # most cases are malformed
    assert report["stream_frame_codes"]["INVALID_ARGUMENT"] > 0
    assert report["rss_end_mb"] < report["rss_start_mb"] + 64
    assert report["exit_code"] == 0
    assert done.returncode == 0, done.stdout
