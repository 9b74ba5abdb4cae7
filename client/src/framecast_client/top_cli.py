"""``framecast top ADDRESS``: the streams a server runs now, refreshed every second.

One row per stream (the server's ListStreams admin call): its caller, its name, frames in
and out per second, the server-side p99 latency (receive to answer) and p99 frame age at
compute, the frames dropped, the server's rate hint, and since when it runs. Ctrl-C ends it.
``--json`` prints one JSON object per refresh instead (``--once``: a single one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from .cli_args import positive_float
from .client import DEFAULT_ADDRESS, Client
from .security_cli import add_security_arguments, client_security
from .types import StreamView

# Clear the screen and home the cursor: a refresh redraws the whole view.
_CLEAR = "\x1b[H\x1b[2J"
# The ID column is as wide as the longest id: a worker's ids (--workers) carry its index and
# start count in their high bits, 13 digits and more.
_MIN_ID_WIDTH = 5


def _columns(id_width: int) -> str:
    return (
        f"{'ID':>{id_width}} {'CALLER':<20} {'NAME':<16} {'IN/S':>7} {'OUT/S':>7} "
        f"{'P99 MS':>8} {'AGE P99':>8} {'DROPS':>7} {'HINT/S':>7}  SINCE"
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``top`` command to the ``framecast`` command line."""
    p = subparsers.add_parser(
        "top",
        help="a live view of a server's streams",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "address", metavar="ADDRESS", nargs="?", default=DEFAULT_ADDRESS, help="server address"
    )
    p.add_argument("--json", action="store_true", help="print JSON objects, one per refresh")
    p.add_argument("--once", action="store_true", help="show one refresh and exit")
    p.add_argument("--interval", type=positive_float, default=1.0, help="seconds between refreshes")
    p.add_argument(
        "--timeout", type=positive_float, default=10.0, help="deadline per call, seconds"
    )
    add_security_arguments(p)
    p.set_defaults(handler=run)


def _since(started_unix_s: float, now: float) -> str:
    seconds = max(0, int(now - started_unix_s))
    clock = time.strftime("%H:%M:%S", time.localtime(started_unix_s))
    hours, rest = divmod(seconds, 3600)
    return f"{clock} ({hours}:{rest // 60:02d}:{rest % 60:02d})"


def render(address: str, streams: Sequence[StreamView], now: float) -> str:
    """The text view of one listing."""
    id_width = max([_MIN_ID_WIDTH, *(len(str(s.id)) for s in streams)])
    lines = [
        f"framecast top {address}  {time.strftime('%H:%M:%S', time.localtime(now))}  "
        f"{len(streams)} stream{'' if len(streams) == 1 else 's'}",
        _columns(id_width),
    ]
    for s in streams:
        lines.append(
            f"{s.id:>{id_width}} {s.caller[:20]:<20} {(s.name or '-')[:16]:<16} "
            f"{s.frames_in_per_s:>7.1f} {s.frames_out_per_s:>7.1f} {s.p99_latency_ms:>8.1f} "
            f"{s.p99_age_ms:>8.1f} {s.dropped:>7} {s.rate_hint_fps:>7.1f}  "
            f"{_since(s.started_unix_s, now)}"
        )
    return "\n".join(lines) + "\n"


def as_json(address: str, streams: Sequence[StreamView], now: float) -> str:
    """One listing as a JSON object (one line)."""
    return json.dumps(
        {
            "address": address,
            "time_unix_s": round(now, 3),
            "streams": [dataclasses.asdict(s) for s in streams],
        }
    )


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Show the listing every ``--interval`` seconds until Ctrl-C (or once)."""
    out = out or sys.stdout
    with Client(args.address, timeout=args.timeout, **client_security(args)) as client:
        while True:
            started = time.monotonic()
            streams = client.list_streams()
            now = time.time()
            if args.json:
                out.write(as_json(client.address, streams, now) + "\n")
            else:
                live = not args.once and out.isatty()
                out.write((_CLEAR if live else "") + render(client.address, streams, now))
            out.flush()
            if args.once:
                return 0
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
