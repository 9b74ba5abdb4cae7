"""What a gpu_check.sh run proved, from its logs: the exit status and the lines that say so.

Usage: python scripts/gpu_check_verdict.py LOG_DIR

Reads the JUnit XML of the `cuda` and `gpu` suites (LOG_DIR/cuda.xml, LOG_DIR/gpu.xml) and the
TensorRT availability line (LOG_DIR/trt.log), prints one "proved:" or "NOT proven:" line per
claim, and exits 0 only when the TensorRT suite ran tests on this GPU; 4 (partial) when it did
not, whatever else ran. Called by gpu_check.sh after every step passed; standard library only,
since it runs in the GPU host's bare environment.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FULL = 0
PARTIAL = 4
TRT_AVAILABLE = "TensorRT backend available"


def executed(junit: Path) -> tuple[int, int]:
    """(tests that ran, tests in all) in a pytest JUnit XML file; (0, 0) when it is absent."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return 0, 0
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return total - skipped, total


def verdict(logs: Path) -> tuple[int, list[str]]:
    """The exit status and the summary lines for the run whose logs are in ``logs``."""
    lines: list[str] = []
    trt_log = logs / "trt.log"
    trt_lines = trt_log.read_text().splitlines() if trt_log.is_file() else []
    trt = trt_lines[-1].strip() if trt_lines else "TensorRT availability was not checked"
    cuda_ran, cuda_total = executed(logs / "cuda.xml")
    gpu_ran, gpu_total = executed(logs / "gpu.xml")
    if cuda_ran:
        lines.append(
            f"proved:     CUDA half of the backend on this GPU ({cuda_ran}/{cuda_total} cuda "
            "tests ran: pinned copies, two streams, blocking waits, sticky errors)"
        )
    else:
        lines.append(f"NOT proven: the CUDA half of the backend (0/{cuda_total} cuda tests ran)")
    trt_ran = trt == TRT_AVAILABLE and gpu_ran > 0
    if trt_ran:
        lines.append(
            f"proved:     TensorRT engine build, FP16 accuracy and serving on this GPU "
            f"({gpu_ran}/{gpu_total} gpu tests ran)"
        )
    else:
        lines.append(
            "NOT proven: TensorRT engine build, FP16 accuracy and serving on this GPU "
            f"({gpu_ran}/{gpu_total} gpu tests ran; {trt})"
        )
    lines.append(
        "NOT proven: front-end-to-GPU feeding (frames/s, batch sizes, GPU utilisation): the GPU "
        "stand-in benchmark does not exist yet"
    )
    return (FULL if trt_ran else PARTIAL), lines


def main(argv: list[str]) -> int:
    """Print the verdict's lines; return its status (2 on a usage error)."""
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/gpu_check_verdict.py LOG_DIR", file=sys.stderr)
        return 2
    status, lines = verdict(Path(argv[0]))
    for line in lines:
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
