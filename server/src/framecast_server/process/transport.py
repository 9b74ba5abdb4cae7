"""The gRPC transport of the serving port: how many servers share it, and their options.

One place holds what gRPC itself enforces before our code sees a call: message sizes, the
connection and per-connection stream limits, keepalive and idle policy, handshake timeout and
each stream's flow-control window.
"""

from __future__ import annotations

from ..settings import HANDSHAKE_TIMEOUT_S, STREAM_WINDOW_BYTES, ServerSettings
from .wiring import connection_age_options

__all__ = ["ACCEPT_LOOPS", "server_options"]

# gRPC servers sharing the port (SO_REUSEPORT). grpc.aio accepts one new call per server per
# turn of the event loop (each accept is a round trip through gRPC's completion queue), and the
# calls not yet accepted wait in gRPC's own first-come queue, unseen by admission, ahead of
# everyone else's. Before admission ran one call per caller beside others, a flood of 200 calls
# over 100 connections kept four servers' queues full (a polite call waited 73 ms p50 there)
# and 16 were needed. Since, the flood's calls come back only as fast as its one admitted call
# is answered, and 4 servers are as fair as 16 (benchmarks/fairness.py, 100 connections,
# pinned: polite p99 3.99x idle against 3.90x; one server 5.02x), while 16 cost about 7% more
# CPU per unary call than one and each server takes 1/N of --max-connections (refusals can
# start before the total): docs/unary-path.md, "Four accept loops".
ACCEPT_LOOPS = 4


def server_options(settings: ServerSettings, *, reuse_port: bool) -> list[tuple[str, int]]:
    """The options of each of the ``ACCEPT_LOOPS`` gRPC servers on the serving port."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Stream clients ping every 10 s by default (keepalive, to notice a dead
        # network); gRPC's default policy answers pings more often than one per 5 min
        # without data with GOAWAY, which would break a paused camera's stream.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        # Connection limits: each connection holds buffers and a descriptor. The
        # kernel spreads connections over the servers sharing the port; each takes
        # its share of the limit.
        (
            "grpc.max_allowed_incoming_connections",
            -(-settings.max_connections // ACCEPT_LOOPS),
        ),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # The stream limit stays a hard cap, but gRPC's "overload protection" also
        # counted streams still being torn down, so a client at the limit saw its next
        # calls refused (UNAVAILABLE, RST_STREAM code 7) instead of waiting for a slot.
        ("grpc.http.overload_protection", 0),
        ("grpc.max_connection_idle_ms", round(settings.idle_timeout_s * 1000)),
        ("grpc.server_handshake_timeout_ms", round(HANDSHAKE_TIMEOUT_S * 1000)),
        # What a stream may have on its way before the server reads it. gRPC grows each
        # stream's window to 4 MiB or more by default: 50 flooding streams then held
        # 300 MB beyond the memory budget. A fixed 1 MiB (7 frames) still fills a
        # 20 MB/s link at 50 ms round trip.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        *connection_age_options(settings),
    ]
