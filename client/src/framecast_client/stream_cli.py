"""``framecast stream``: classify a camera, a video or a directory live, and show how it keeps up.

About once a second a line shows the frame rate in (read from the source) and out (results),
the latency percentiles of the last second (client side: from capture to result), the frames
dropped and the reconnections; a summary follows at the end.
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from .cli import add_address_arguments
from .cli_args import positive_float, positive_int
from .client import Client
from .errors import FramecastError
from .security_cli import client_security
from .sources import FrameSource, Paced, SourceError, SyntheticCamera, open_source
from .streaming import (
    DEFAULT_KEEPALIVE_S,
    DEFAULT_MAX_IN_FLIGHT,
    MAX_AGE_LIMIT_S,
    StreamMode,
    StreamSession,
    StreamStats,
    stream_name,
)

logger = logging.getLogger(__name__)

LIVE_INTERVAL_S = 1.0
# Failed inputs named in the summary; the rest are counted.
_MAX_FAILED_SHOWN = 20
_QUOTED = re.compile(r"'[^']*'")
# Latencies kept per live line: more than a second's worth at any realistic frame rate.
_MAX_LATENCIES_PER_LINE = 100_000

EPILOG = """\
examples:
  framecast stream synthetic:1280x720@30 --duration 10     # a synthetic camera
  framecast stream rtsp://camera.local/stream1             # a network camera (needs PyAV)
  framecast stream photos/ --mode lossless                 # every image, in name order
  framecast stream webcam:0 --name dock-3 --max-age 200    # named in `framecast top`, fresh

--mode auto (the default) streams cameras in realtime mode (when the server falls behind, the
oldest unsent frames are dropped: the latest frame wins) and files in lossless mode (every frame
gets a result, in order).
"""


def _keepalive(text: str) -> float | None:
    if text.strip().lower() in ("off", "0"):
        return None
    return positive_float(text)


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    try:
        return stream_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("name ")) from None


def _max_age_ms(text: str) -> float:
    value = positive_float(text)
    if not 1 <= value <= MAX_AGE_LIMIT_S * 1000:
        raise argparse.ArgumentTypeError(
            f"must be from 1 to {MAX_AGE_LIMIT_S * 1000:.0f} ms, got {text!r}"
        )
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``stream`` command to the ``framecast`` command line."""
    p = subparsers.add_parser(
        "stream",
        help="classify a camera, video or image directory live over ClassifyStream",
        description=__doc__,
        epilog=EPILOG,
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="synthetic[:WxH][@FPS], a directory of images, an image or video file, a URL "
        "(rtsp://, http://, ...) or webcam[:N]",
    )
    add_address_arguments(p, timeout=False)
    p.add_argument(
        "--duration",
        type=positive_float,
        default=None,
        help="stop after this many seconds (default: when the source ends, or Ctrl-C)",
    )
    p.add_argument(
        "--fps",
        type=positive_float,
        default=None,
        help="frame rate of the source: the synthetic camera's, or a pace for files "
        "(default: the camera's own; files as fast as the server takes them)",
    )
    p.add_argument(
        "--mode",
        choices=("auto", "realtime", "lossless"),
        default="auto",
        help="realtime drops the oldest frames when the server falls behind; lossless keeps "
        "every frame (default auto: realtime for cameras, lossless for files)",
    )
    p.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=None,
        help="most frames sent and not answered (default: 3 in realtime mode, 8 in lossless)",
    )
    p.add_argument("--top-k", type=positive_int, default=1, help="classes per frame")
    p.add_argument(
        "--keepalive",
        type=_keepalive,
        default=DEFAULT_KEEPALIVE_S,
        metavar="SECONDS",
        help="ping the server after this many seconds without traffic and reconnect when a "
        f"ping goes unanswered as long (default {DEFAULT_KEEPALIVE_S:g}; 'off' for none). "
        "The server takes pings at most every 5 s while no frames flow",
    )
    p.add_argument(
        "--name",
        type=_name,
        default=None,
        help="what the stream is called in the server's stream listing (framecast top); "
        "printable ASCII, cut to 64 characters",
    )
    p.add_argument(
        "--max-age",
        type=_max_age_ms,
        default=None,
        metavar="MS",
        help="the server drops frames older than this many milliseconds (from capture) "
        "before computing them; the summary counts them (default: no limit)",
    )
    p.set_defaults(handler=run)


def _with_fps(source: FrameSource, fps: float | None) -> FrameSource:
    if fps is None:
        return source
    if isinstance(source, SyntheticCamera):
        return SyntheticCamera(source.width, source.height, fps)
    return Paced(source, fps)


def _mode(requested: str, source: FrameSource) -> StreamMode:
    if requested == "realtime" or (requested == "auto" and source.live):
        return "realtime"
    return "lossless"


def run(args: argparse.Namespace) -> int:
    """Handler of ``framecast stream``; returns the exit status."""
    try:
        source = _with_fps(open_source(args.source), args.fps)
    except SourceError as exc:
        print(f"framecast stream: {exc}", file=sys.stderr)
        return 2
    mode = _mode(args.mode, source)
    with source, Client(args.address, **client_security(args)) as client:
        in_flight = args.max_in_flight or DEFAULT_MAX_IN_FLIGHT[mode]
        with client.stream(
            source,
            top_k=args.top_k,
            max_in_flight=in_flight,
            mode=mode,
            keepalive_s=args.keepalive,
            name=args.name,
            max_age=None if args.max_age is None else args.max_age / 1000,
        ) as session:
            # As stream() just read it: no second call. (The client logged its warning.)
            info = client.model_info()
            logger.info(
                "streaming %s to %s (%s on %s), %s mode, at most %d in flight",
                source.description,
                args.address,
                info.name,
                info.backend,
                mode,
                in_flight,
            )
            watch = _Watch(session, names=getattr(source, "paths", None))
            outcome = watch.run(args.duration, sys.stdout)
            stats = session.stats
    print(
        format_summary(
            stats,
            watch,
            source=source.description,
            address=args.address,
            max_age_ms=args.max_age,
        )
    )
    if watch.error is not None:
        print(f"framecast stream: the stream failed: {watch.error}", file=sys.stderr)
        return 1
    return 130 if outcome == "interrupted" else 0


class _Watch:
    """Consumes the session's results on a thread; the caller's thread prints live lines."""

    def __init__(self, session: StreamSession, names: Sequence[object] | None = None) -> None:
        self.session = session
        self.error: BaseException | None = None
        self.labels: collections.Counter[str] = collections.Counter()
        # Per-frame errors by reason, and the frames (by source index) that failed.
        self.reasons: collections.Counter[str] = collections.Counter()
        # Frames the server dropped past the max age, by drop reason: not failed inputs.
        self.stale: collections.Counter[str] = collections.Counter()
        self.failed: list[int] = []
        self.names = names
        self._latencies: collections.deque[float] = collections.deque(
            maxlen=_MAX_LATENCIES_PER_LINE
        )
        self._lock = threading.Lock()
        self._done = threading.Event()

    def _consume(self) -> None:
        try:
            for result in self.session:
                if result.ok:
                    label = result.classification.top.label
                    with self._lock:
                        self._latencies.append(result.latency_ms)
                        self.labels[label] += 1
                elif result.error is not None and result.error.drop_reason:
                    with self._lock:
                        self.stale[result.error.drop_reason] += 1
                elif result.error is not None:
                    error = result.error
                    # Quoted names (the file) are left out, so that one reason groups its frames;
                    # the summary names the failed inputs separately.
                    message = _QUOTED.sub("...", error.message)
                    reason = f"{error.code.name} ({error.origin}): {message}"
                    with self._lock:
                        self.reasons[reason] += 1
                        self.failed.append(result.index)
        except FramecastError as exc:
            self.error = exc
        except Exception as exc:
            logger.exception("the stream failed")
            self.error = exc
        finally:
            self._done.set()

    def _take_latencies(self) -> list[float]:
        with self._lock:
            taken = list(self._latencies)
            self._latencies.clear()
        return taken

    def run(self, duration: float | None, out: TextIO) -> str:
        """Print live lines until the duration passes or the stream ends; the reason."""
        consumer = threading.Thread(target=self._consume, name="framecast-stream-consumer")
        consumer.start()
        started = time.monotonic()
        deadline = None if duration is None else started + duration
        last_tick, last = started, self.session.stats
        tty = out.isatty()
        outcome = "ended"
        try:
            while True:
                next_tick = last_tick + LIVE_INTERVAL_S
                wake = next_tick if deadline is None else min(next_tick, deadline)
                if self._done.wait(max(0.0, wake - time.monotonic())):
                    break
                now = time.monotonic()
                if now >= next_tick:
                    stats = self.session.stats
                    line = format_live_line(last, stats, now - last_tick, self._take_latencies())
                    out.write(f"\r{line}\033[K" if tty else f"{line}\n")
                    out.flush()
                    last_tick, last = now, stats
                if deadline is not None and now >= deadline:
                    outcome = "duration"
                    break
        except KeyboardInterrupt:
            outcome = "interrupted"
        finally:
            self.session.close()
            consumer.join()
            # The last, partial interval: its frames would otherwise be in no live line.
            now = time.monotonic()
            stats = self.session.stats
            if now > last_tick and (stats.read, stats.received) != (
                last.read,
                last.received,
            ):
                line = format_live_line(last, stats, now - last_tick, self._take_latencies())
                out.write(f"\r{line}\033[K" if tty else f"{line}\n")
            if tty:
                out.write("\n")
        return outcome


def _ms(value: float) -> str:
    return "   -   " if math.isnan(value) else f"{value:7.1f}"


def format_live_line(
    before: StreamStats, after: StreamStats, interval_s: float, latencies_ms: list[float]
) -> str:
    """One live line: what happened in the interval, then running totals, kept apart.

    The interval is a second, but the last one of a stream may be shorter: it says how long.
    """
    fps_in = (after.read - before.read) / interval_s
    fps_out = (after.received - before.received) / interval_s
    if latencies_ms:
        p50, p99 = (float(x) for x in np.percentile(latencies_ms, [50, 99]))
    else:
        p50 = p99 = float("nan")
    return (
        f"[{after.elapsed_s:6.1f}s] last {interval_s:3.1f}s: in {fps_in:6.1f} fps, "
        f"out {fps_out:6.1f} fps, p50 {_ms(p50)} ms, p99 {_ms(p99)} ms || "
        f"totals: in flight {after.in_flight:3d}, dropped {after.dropped}, "
        f"errors {after.errors}, disconnects {after.disconnects}"
    )


def format_summary(
    stats: StreamStats,
    watch: _Watch,
    *,
    source: str,
    address: str,
    max_age_ms: float | None = None,
) -> str:
    """The summary printed when the stream ends."""
    elapsed = max(stats.elapsed_s, 1e-9)
    dropped_pct = 100.0 * stats.dropped / stats.read if stats.read else 0.0
    latency = stats.latency_ms
    lines = [
        f"framecast stream: {source} -> {address}, {stats.mode} mode, {stats.elapsed_s:.1f} s",
        f"  frames      read {stats.read}, sent {stats.sent}, results {stats.received} "
        f"({stats.errors} errors), dropped {stats.dropped} ({dropped_pct:.1f} %)",
        f"  rate        in {stats.read / elapsed:.1f} fps, out {stats.received / elapsed:.1f} fps",
        f"  latency     p50 {latency.p50:.1f} ms, p90 {latency.p90:.1f} ms, "
        f"p99 {latency.p99:.1f} ms, max {latency.max:.1f} ms (capture to result)",
        f"  connection  {stats.disconnects} disconnects, {stats.reconnects} reconnects, "
        f"{stats.resent} frames resent, at most {stats.max_in_flight} in flight",
    ]
    if watch.labels:
        top = ", ".join(f"{label} ({n})" for label, n in watch.labels.most_common(3))
        lines.append(f"  top classes {top}")
    if max_age_ms is not None:
        stale = sum(watch.stale.values())
        by_reason = ", ".join(
            f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(watch.stale.items())
        )
        lines.append(
            f"  max age     {max_age_ms:g} ms: {stale} frames dropped by the server before "
            "compute" + (f" ({by_reason})" if by_reason else "")
        )
    for reason, count in watch.reasons.most_common():
        lines.append(f"  errors      {count} x {reason}")
    if watch.failed:
        shown = [_input_name(index, watch.names) for index in watch.failed[:_MAX_FAILED_SHOWN]]
        more = len(watch.failed) - len(shown)
        lines.append(
            f"  failed      {', '.join(shown)}" + (f" and {more} more" if more > 0 else "")
        )
    return "\n".join(lines)


def _input_name(index: int, names: Sequence[object] | None) -> str:
    """A failed frame as a person finds it: the file's name where the source has files."""
    if names is not None and 0 <= index < len(names):
        return str(names[index])
    return f"frame {index}"
