"""The server's event loop: uvloop where it exists, asyncio's own elsewhere.

uvloop (libuv) runs the same asyncio code with less overhead per loop iteration and a cheaper
wake-up from other threads, which every batch pays when its worker posts results back.
Measured with benchmarks/serving_overhead.py (2 cores, null backend): unary p50 1.41 -> 1.21 ms
and server CPU per stream frame 558 -> 522 us. It has no Windows build; there asyncio's
default loop is used, with identical behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # Windows, or an install without it
    HAVE_UVLOOP = False

T = TypeVar("T")

__all__ = ["HAVE_UVLOOP", "new_event_loop", "run"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind the server runs on."""
    if HAVE_UVLOOP:
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop from :func:`new_event_loop`."""
    if HAVE_UVLOOP:
        return uvloop.run(main)
    return asyncio.run(main)
