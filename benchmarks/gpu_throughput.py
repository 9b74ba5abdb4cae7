"""TensorRT FP16 throughput and latency of the served ResNet-50 per batch size.

    uv run python benchmarks/gpu_throughput.py [--onnx model.onnx] [--batches 1,8,32,64,128]

Builds (or reuses) one engine whose profile covers the largest batch, then for each batch size
measures, with host<->device copies included:

* latency: one ``infer`` at a time (p50 / p99 of wall time per batch), and
* pipelined throughput: two batches in flight through ``submit``, so one batch's copies
  overlap the other's compute, as a busy server would run.

Exits with a clear message (status 2) on machines that cannot run TensorRT.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from framecast_server.backends.tensorrt import (
    EngineSettings,
    create_tensorrt_backend,
    tensorrt_unavailable_reason,
)
from numpy.typing import NDArray

if TYPE_CHECKING:
    from framecast_server.backends.tensorrt.backend import TensorRTBackend

logger = logging.getLogger("gpu_throughput")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, help="served ONNX file (default: prepare the model)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".framecast-cache"))
    parser.add_argument("--batches", default="1,8,32,64,128", help="comma-separated sizes")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed run per batch size")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches per size")
    return parser.parse_args(argv)


def measure_latency(
    backend: TensorRTBackend, images: NDArray[np.uint8], seconds: float
) -> list[float]:
    """Wall times of sequential infer calls for ``seconds``."""
    infer = backend.infer
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        infer(images)
        times.append(time.perf_counter() - start)
    return times


def measure_pipelined(backend: TensorRTBackend, images: NDArray[np.uint8], seconds: float) -> float:
    """Images/s with two batches in flight."""
    submit = backend.submit
    in_flight: deque[Future[NDArray[np.float32]]] = deque()
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        while len(in_flight) < 2:
            in_flight.append(submit(images))
        in_flight.popleft().result()
        done += len(images)
    for future in in_flight:
        future.result()
        done += len(images)
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; 2 if this machine cannot run TensorRT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        logger.error("%s", reason)
        logger.error("gpu_throughput needs an NVIDIA GPU; nothing was measured")
        return 2
    batches = sorted({int(b) for b in args.batches.split(",")})
    onnx_path = args.onnx
    if onnx_path is None:
        from framecast_server.model import ModelSource, prepare_model

        onnx_path = prepare_model(ModelSource(), args.cache_dir).onnx_path
    settings = EngineSettings(max_batch=max(batches))
    # create_tensorrt_backend is typed as the Backend protocol; submit() is TensorRT's own.
    backend = cast("TensorRTBackend", create_tensorrt_backend(onnx_path, settings, args.cache_dir))
    rng = np.random.default_rng(0)
    rows = []
    try:
        for n in batches:
            images = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
            for _ in range(args.warmup):
                backend.infer(images)
            times = np.array(measure_latency(backend, images, args.seconds / 2)) * 1e3
            throughput = measure_pipelined(backend, images, args.seconds / 2)
            rows.append((n, float(np.median(times)), float(np.percentile(times, 99)), throughput))
    finally:
        backend.close()
    print(
        f"TensorRT FP16 ResNet-50 on {backend.info.device} (engine max batch {settings.max_batch})"
    )
    print(f"{'batch':>5}  {'p50 ms':>8}  {'p99 ms':>8}  {'seq img/s':>10}  {'pipelined img/s':>15}")
    for n, p50, p99, throughput in rows:
        print(f"{n:>5}  {p50:>8.2f}  {p99:>8.2f}  {n / p50 * 1e3:>10.0f}  {throughput:>15.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
