"""Wire encodings side by side: bytes, CPU and frames/s per frame, and what JPEG costs in accuracy.

For each encoding (raw, PNG, JPEG at a few qualities) the same prepared 224x224 frames are
sent to a real server, in alternating rounds so a busy machine slows them alike:

* bytes/frame: the image bytes on the wire (the request framing adds a few dozen);
* client CPU/frame: this process's CPU time per frame (encoding, gRPC, protobuf);
* server CPU/frame: the server process's CPU time per frame (from /proc: decoding, gRPC,
  protobuf, batching), against a ``--backend null`` server so the model does not drown it;
* frames/s: one client sending batches of ``--batch`` frames back to back over loopback,
  where bandwidth is free: on a slow link the bytes column decides instead.

Accuracy against raw: the mean absolute difference of the decoded pixels from the prepared
frame, and, from an ONNX Runtime server (the default model; offline: seeded random weights,
which still shows how far compression moves the outputs), how often the top-1 class is the
same as raw's and how much of raw's top-5 is kept.

    uv run python benchmarks/wire_encodings.py [--frames 64] [--rounds 3] [--batch 8]

The frames are photo-like (smooth shading, shapes with soft edges, sensor noise), prepared
from 1280x720 pictures by the client's own preprocessing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from framecast_client import Client, wire
from framecast_client.preprocess import PreprocessSpec, preprocess
from framecast_server.process.background import BackgroundServer
from framecast_server.service.codecs import requests
from framecast_server.settings import ServerSettings, default_cache_dir
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter
from serve_process import cpu_seconds, running, serve_command, wait_health

ENCODINGS: dict[str, wire.Encoding] = {
    "raw": wire.Encoding("raw"),
    "png": wire.Encoding("png"),
    "jpeg q95": wire.Encoding("jpeg", 95),
    "jpeg q90": wire.Encoding("jpeg", 90),
    "jpeg q75": wire.Encoding("jpeg", 75),
}


def photo_frames(count: int, spec: PreprocessSpec) -> NDArray[np.uint8]:
    """``count`` prepared frames of photo-like 1280x720 pictures."""
    rng = np.random.default_rng(0)
    frames = np.empty((count, spec.input_height, spec.input_width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:720, 0:1280].astype(np.float32)
    for i in range(count):
        base = rng.uniform(30, 200, 3)
        light = 50 * np.sin(x / rng.uniform(80, 300) + i) * np.cos(y / rng.uniform(60, 200))
        rgb = np.stack([base[c] + light * (0.6 + 0.2 * c) + 60 * y / 720 for c in range(3)], -1)
        picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, 1200)), int(rng.integers(0, 650))
            w, h = int(rng.integers(40, 400)), int(rng.integers(40, 300))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
            draw.rectangle((x0 + w // 3, y0, x0 + w // 2, y0 + h // 2), fill=colour[::-1])
        soft = np.asarray(picture.filter(ImageFilter.GaussianBlur(1.2))).astype(np.float32)
        noisy = np.clip(soft + rng.normal(0, 3, soft.shape), 0, 255).astype(np.uint8)
        frames[i] = preprocess(noisy, spec)
    return frames


@contextmanager
def null_server(tmp: Path, max_batch: int) -> Iterator[tuple[str, int]]:
    """A ``framecast serve --backend null`` process, serving; yields its address and pid."""
    port_file = tmp / "port"
    command = serve_command(port_file, tmp / "cache", "--max-batch", str(max_batch))
    with running(command, port_file) as (address, pid):
        wait_health(address)
        yield address, pid


def measure_round(
    address: str,
    pid: int,
    encoding: wire.Encoding,
    frames: NDArray[np.uint8],
    batch: int,
    passes: int,
) -> tuple[float, float, float]:
    """Client CPU us/frame, server CPU us/frame and frames/s over ``passes`` passes."""
    with Client(address, timeout=60, wire=encoding.name, quality=encoding.quality) as client:
        client.classify_preprocessed(frames[:batch], top_k=1)  # connect and warm up
        server_before, client_before = cpu_seconds(pid), time.process_time()
        started = time.perf_counter()
        for _ in range(passes):
            for start in range(0, len(frames), batch):
                client.classify_preprocessed(frames[start : start + batch], top_k=1)
        wall = time.perf_counter() - started
        server_cpu = cpu_seconds(pid) - server_before
        client_cpu = time.process_time() - client_before
    n = len(frames) * passes  # /proc counts in 10 ms ticks: enough frames to resolve them
    return client_cpu / n * 1e6, server_cpu / n * 1e6, n / wall


def accuracy(
    frames: NDArray[np.uint8], cache_dir: Path, batch: int
) -> dict[str, tuple[float, float, float]]:
    """Per encoding: decoded pixels' mean abs difference, top-1 agreement, top-5 overlap."""
    settings = ServerSettings(
        port=0, backend="onnxruntime", allow_download=False, cache_dir=cache_dir, max_batch=batch
    )
    results: dict[str, list[list[int]]] = {}
    with BackgroundServer(settings) as server:
        for name, encoding in ENCODINGS.items():
            with Client(
                server.address, timeout=120, wire=encoding.name, quality=encoding.quality
            ) as client:
                served = client.classify_preprocessed(frames, top_k=5)
            results[name] = [[p.index for p in r.predictions] for r in served]
    report = {}
    for name, encoding in ENCODINGS.items():
        decoded = np.stack(
            [
                requests.image_from_proto(wire.image_to_proto(f, encoding), height=224, width=224)
                for f in frames
            ]
        )
        mad = float(np.abs(decoded.astype(np.int16) - frames).mean())
        top1 = np.mean([a[0] == b[0] for a, b in zip(results[name], results["raw"], strict=True)])
        top5 = np.mean(
            [len(set(a) & set(b)) / 5 for a, b in zip(results[name], results["raw"], strict=True)]
        )
        report[name] = (mad, float(top1), float(top5))
    return report


def main() -> None:
    """Measure every encoding and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=64, help="distinct frames per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--batch", type=int, default=8, help="frames per request")
    parser.add_argument("--passes", type=int, default=8, help="passes over the frames a round")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="model cache for the accuracy server"
    )
    parser.add_argument("--skip-accuracy", action="store_true", help="no ONNX Runtime server")
    args = parser.parse_args()
    # Each client would log the server's random-weights warning: once is enough, below.
    logging.getLogger("framecast_client.client").setLevel(logging.ERROR)

    spec = PreprocessSpec(resize_size=232)  # the default model's
    frames = photo_frames(args.frames, spec)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ENCODINGS}
    with tempfile.TemporaryDirectory() as tmp, null_server(Path(tmp), args.batch) as (addr, pid):
        for _ in range(args.rounds):
            for name, encoding in ENCODINGS.items():
                samples[name].append(
                    measure_round(addr, pid, encoding, frames, args.batch, args.passes)
                )
    quality = (
        {}
        if args.skip_accuracy
        else accuracy(frames, args.cache_dir or default_cache_dir(), args.batch)
    )

    print(
        f"{args.frames} photo-like 224x224 frames x {args.passes} passes, batches of "
        f"{args.batch}, loopback, medians of {args.rounds} alternating rounds; server: "
        "--backend null (CPU, frames/s), ONNX Runtime (accuracy; offline: random weights)"
    )
    print(
        f"{'encoding':<10} {'bytes/frame':>11} {'vs raw':>7} {'client CPU':>11} "
        f"{'server CPU':>11} {'frames/s':>9} {'pixel MAD':>9} {'top-1 same':>10} {'top-5 kept':>10}"
    )
    raw_bytes = float(frames[0].nbytes)
    for name, encoding in ENCODINGS.items():
        sizes = [wire.encoded_size(frame, encoding) for frame in frames]
        size = statistics.mean(sizes)
        client_us, server_us, fps = (
            statistics.median(values) for values in zip(*samples[name], strict=True)
        )
        if name in quality:
            mad, top1, top5 = quality[name]
            accuracy_columns = f"{mad:9.2f} {top1:10.0%} {top5:10.0%}"
        else:
            accuracy_columns = f"{'-':>9} {'-':>10} {'-':>10}"
        print(
            f"{name:<10} {size:11,.0f} {size / raw_bytes:6.1%} {client_us:8.0f} us "
            f"{server_us:8.0f} us {fps:9,.0f} {accuracy_columns}"
        )


if __name__ == "__main__":
    main()
