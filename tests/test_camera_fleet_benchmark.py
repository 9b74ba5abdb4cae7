"""benchmarks/camera_fleet.py end to end, short: every side measured or skipped with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from triton_local import find_triton_python  # noqa: E402


@pytest.mark.slow
def test_camera_fleet_prints_the_table_side_by_side(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "camera_fleet.json"
    # The real Triton where this host has one (.venv-triton, $FRAMECAST_TRITON_PYTHON), else
    # the skip and its reason, as the benchmark prints it.
    python, _ = find_triton_python(None)
    command = [
        sys.executable, str(ROOT / "benchmarks" / "camera_fleet.py"),
        "--cameras", "1,2", "--max-cameras", "2", "--warmup", "0.2", "--window", "0.3",
        "--max-windows", "2", "--no-onnxruntime", "--triton-python", python or sys.executable,
        "--cache-dir", str(cache_dir), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cameras at 30 fps within p99 100 ms and 1% drops" in done.stdout
    results = json.loads(out.read_text())["results"]
    sides = ["framecast null (framecast.v1)", "framecast null (OIP)"]
    triton = "triton null (OIP, python backend)"
    if python is None:
        assert f"{triton} skipped: nvidia-pytriton is not importable" in done.stdout
    else:
        sides.append(triton)
    assert "framecast onnxruntime skipped: --no-onnxruntime" in done.stdout
    assert sorted(results) == sorted(sides)
    for side in sides:
        result = results[side]
        assert [s["cameras"] for s in result["sweep"]] == [1, 2]
        assert all(s["answered_fps"] > 0 for s in result["sweep"])
        assert result["find_max"]["tried"]  # the search ran, whatever it found
        row = next(line for line in done.stdout.splitlines() if line.startswith(side))
        assert f"{result['find_max']['max_cameras']}" in row.split()[len(side.split())]
