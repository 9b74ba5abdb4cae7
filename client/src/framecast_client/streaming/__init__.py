"""Streaming classification: frames in, results out, over one long-lived ClassifyStream call.

``Client.stream`` and ``AsyncClient.stream`` return a session. Each session runs this pipeline,
with a bounded buffer between every two stages:

    source --reader thread--> raw --preprocess thread--> ready --request iterator--> server
    user <-- output <-- response reader (a thread, or a task on the event loop) <-- server

* The **reader thread** only pulls frames from the source, so a camera is read at its own pace
  whatever the server does. The **preprocess thread** decodes, resizes and wraps the next frame
  while the previous ones make their round trip.
* At most ``max_in_flight`` frames are outstanding (sent, no answer yet). The server answers the
  frames of one stream in the order they came, so results come back in source order.

Modes:

* ``"realtime"`` (cameras): every buffer holds one frame and a new frame replaces the oldest
  unsent one, so the latest frame wins and latency cannot grow when the server or the network
  is slower than the camera. Replaced frames, and frames in flight when the connection breaks,
  are counted as dropped and get no result.
* ``"lossless"`` (files): nothing is dropped. The reader waits for room instead (the source is
  read only as fast as the server answers), and frames in flight when the connection breaks are
  sent again on the next connection. Every frame gets exactly one result, in order.

When the server goes away (UNAVAILABLE, connection reset) the session reconnects with an
exponential, capped, jittered :class:`Backoff` and carries on, unless ``reconnect=False``.
Before each new call it reads GetModelInfo again: a server restarted with a model that wants
other preprocessing gets frames prepared for it (lossless prepares the frames it holds again
from their source frames; realtime drops them). Every frame states what it was prepared for,
so a frame prepared for another model is refused, never classified wrongly.

The modules: ``config`` (modes, :class:`Backoff`, what a session gets from its client),
``results`` (:class:`StreamResult`, :class:`StreamStats` and the latencies behind them),
``pipeline`` (buffers, threads, drop and resend policies), ``drive`` (the drive loop, without
I/O: answers, breaks and reconnects), ``sync_session`` and ``async_session`` (the two ways to
carry it out: a thread, or a task on the event loop).
"""

from .async_session import AsyncStreamSession
from .config import DEFAULT_KEEPALIVE_S as DEFAULT_KEEPALIVE_S
from .config import DEFAULT_MAX_IN_FLIGHT as DEFAULT_MAX_IN_FLIGHT
from .config import MAX_AGE_LIMIT_S as MAX_AGE_LIMIT_S
from .config import STREAM_MODES as STREAM_MODES
from .config import Backoff, StreamMode
from .config import StreamConfig as StreamConfig
from .config import make_stream_config as make_stream_config
from .config import stream_name as stream_name
from .results import FrameError, LatencySummary, StreamResult, StreamStats
from .sync_session import StreamSession

# The public API (also exported by framecast_client). The names imported "as" themselves are
# for the clients and the stream CLI.
__all__ = [
    "AsyncStreamSession",
    "Backoff",
    "FrameError",
    "LatencySummary",
    "StreamMode",
    "StreamResult",
    "StreamSession",
    "StreamStats",
]
