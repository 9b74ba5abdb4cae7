"""Benchmark inputs: synthetic frames, an image directory or a video, preprocessed once.

The load generator shares two CPU cores with everything else on an edge box (and in CI with
the server), so it must not decode and resize on every request. Each input is preprocessed
once, up front, and that one preprocessing is timed: the report shows what a real client
would spend per image, while requests reuse the preprocessed arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from framecast_client.sources import IMAGE_SUFFIXES
from numpy.typing import NDArray

Preprocess = Callable[[Any], NDArray[np.uint8]]


class InputError(ValueError):
    """The benchmark input cannot be used; the message says why."""


@dataclass(frozen=True)
class PreparedInputs:
    """Preprocessed inputs and what preprocessing each one cost."""

    frames: NDArray[np.uint8]  # [P, H, W, 3], ready to send
    preprocess_ms: NDArray[np.float64]  # [P], client preprocessing of each input
    source: str  # what the inputs are, for the report

    def __len__(self) -> int:
        return int(self.frames.shape[0])


@dataclass(frozen=True)
class Payload:
    """One request's images and the client preprocessing they stand for."""

    batch: NDArray[np.uint8]  # [N, H, W, 3]
    preprocess_ms: float  # sum over the N images

    @property
    def images(self) -> int:
        """N, the number of images in the request."""
        return int(self.batch.shape[0])


def synthetic_sources(
    count: int, width: int, height: int, seed: int = 0
) -> Iterator[NDArray[np.uint8]]:
    """``count`` random uint8 RGB frames of ``width`` x ``height``, like raw camera frames."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def directory_sources(directory: Path, limit: int) -> Iterator[bytes]:
    """The encoded bytes of up to ``limit`` images in ``directory`` (sorted by name).

    Bytes, not paths: the disk read is left out of the preprocessing time, the decode is in.
    """
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise InputError(f"{directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for path in files[:limit]:
        yield path.read_bytes()


def video_sources(path: Path, limit: int) -> Iterator[NDArray[np.uint8]]:
    """Up to ``limit`` decoded RGB frames of a video (needs PyAV, the extra ``video``)."""
    try:
        import av  # optional: only video input needs it
    except ImportError as exc:
        raise InputError(
            "video input needs PyAV: pip install 'av>=12' (the bench's 'video' extra) "
            "(or benchmark with an image directory or synthetic frames)"
        ) from exc
    with av.open(str(path)) as container:
        n = 0
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")
            n += 1
            if n >= limit:
                break
    if n == 0:
        raise InputError(f"{path}: no video frames decoded")


def prepare_inputs(
    sources: Iterator[Any] | Sequence[Any],
    preprocess: Preprocess,
    source: str,
    clock: Callable[[], float] = time.perf_counter,
) -> PreparedInputs:
    """Preprocess every source once, timing each preprocessing.

    The first input is preprocessed once more, untimed, before the timed pass: the first
    call pays one-off costs (lazy imports, allocator growth) no steady-state client pays.
    """
    items = list(sources)
    if not items:
        raise InputError(f"no inputs from {source}")
    preprocess(items[0])
    frames: list[NDArray[np.uint8]] = []
    times: list[float] = []
    for item in items:
        started = clock()
        frame = preprocess(item)
        times.append((clock() - started) * 1000.0)
        frames.append(frame)
    return PreparedInputs(
        frames=np.ascontiguousarray(np.stack(frames)),
        preprocess_ms=np.asarray(times, dtype=np.float64),
        source=source,
    )


def make_payloads(
    inputs: PreparedInputs, batch_size: int, memory_budget_bytes: int = 64 * 2**20
) -> list[Payload]:
    """Requests of ``batch_size`` images cycling through the inputs, built once.

    Consecutive payloads take consecutive inputs, so every input is sent about equally
    often and the load loop only picks the next payload. Unary payloads are views (no
    copy); batches are copied, at most ``memory_budget_bytes`` of them (at least one).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = len(inputs)
    if batch_size == 1:
        return [
            Payload(batch=inputs.frames[i : i + 1], preprocess_ms=float(inputs.preprocess_ms[i]))
            for i in range(p)
        ]
    per_payload = batch_size * int(np.prod(inputs.frames.shape[1:]))
    n = max(1, min(p, memory_budget_bytes // per_payload))
    payloads: list[Payload] = []
    for j in range(n):
        idx = [(j * batch_size + k) % p for k in range(batch_size)]
        payloads.append(
            Payload(
                batch=np.ascontiguousarray(inputs.frames[idx]),
                preprocess_ms=float(inputs.preprocess_ms[idx].sum()),
            )
        )
    return payloads
