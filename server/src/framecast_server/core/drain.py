"""Calls in progress, and the drain that ends them on shutdown: part of the core, no gRPC.

Every servicer brackets each call with :meth:`CallGate.enter` and :meth:`CallGate.leave`.
Until :meth:`CallGate.drain` is called the gate only counts. Then streams learn through
:meth:`CallGate.on_drain` that they must stop reading new work, answer what they hold and end,
while new calls are still served: clients that watch the server's health (NOT_SERVING by then)
go elsewhere on their own, and a refusal would spend a token of their retry throttle. Once
:meth:`CallGate.close` is called, new calls are refused with :class:`ShuttingDownError` (the
servicer maps it to UNAVAILABLE, which tells clients to go elsewhere or retry).
:meth:`CallGate.wait_quiet` waits until calls stop arriving, :meth:`CallGate.wait_idle` until
every call has left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["CallGate", "ShuttingDownError"]


class ShuttingDownError(Exception):
    """The server is draining for shutdown and takes no new work."""


class CallGate:
    """Counts calls in progress; draining, winds streams down; closed, refuses new calls.

    Use on one event loop.
    """

    def __init__(self) -> None:
        self._active = 0
        self._draining = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_drain: dict[object, Callable[[], None]] = {}
        self._last_arrival = 0.0  # time.monotonic() of the last call's arrival

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called."""
        return self._draining

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: new calls are refused."""
        return self._closed

    @property
    def active(self) -> int:
        """Calls in progress."""
        return self._active

    def enter(self) -> None:
        """A call begins; raises :class:`ShuttingDownError` once closed.

        Pair every successful enter with one :meth:`leave` (try/finally). Plain methods rather
        than a generator-based context manager: nothing extra is kept alive by an exception.
        """
        self._last_arrival = time.monotonic()
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        self._active += 1
        self._idle.clear()

    def leave(self) -> None:
        """A call entered with :meth:`enter` has ended."""
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    def on_drain(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the drain begins (now, if it has); returns an unregister."""
        if self._draining:
            callback()
            return lambda: None
        key = object()
        self._on_drain[key] = callback

        def unregister() -> None:
            self._on_drain.pop(key, None)

        return unregister

    def drain(self) -> None:
        """Tell the streams in progress, and those that begin from now on, to wind down."""
        if self._draining:
            return
        self._draining = True
        callbacks, self._on_drain = list(self._on_drain.values()), {}
        for callback in callbacks:
            callback()

    def close(self) -> None:
        """Drain (if not yet) and refuse new calls from now on."""
        self.drain()
        self._closed = True

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no call is in progress; False if ``timeout`` passed first."""
        if self._idle.is_set():  # wait_for(..., 0) times out even on a set event
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet_s: float, limit_s: float) -> bool:
        """Wait until no call arrived (served or refused) for ``quiet_s``, at most ``limit_s``.

        True if quiet. Clients told to go elsewhere stop sending; a call still on its way would
        be cancelled by the transport's own shutdown, so the server waits for them to stop.
        An idle server is quiet at once.
        """
        deadline = time.monotonic() + limit_s
        while True:
            now = time.monotonic()
            quiet_at = self._last_arrival + quiet_s
            if quiet_at <= now:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(quiet_at, deadline) - now)
