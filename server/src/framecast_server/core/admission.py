"""Admission of unary calls: a server-wide number at once, the rest wait in turn per caller.

Part of the core, no gRPC. Why it exists: every call a client gets answered comes straight
back, and gRPC and the event loop take calls in arrival order at some 250 us each, so a client
with many calls over many connections kept the loop's queue full ahead of everyone else,
before the batcher's fair order could help. A servicer enters a call here when it arrives,
before it reads the request's bytes (so what waits is a call's HTTP/2 window, not its
images), and leaves when it ends. At most ``capacity`` calls are admitted at once; the others
wait, first in, first out within a caller, and a freed place goes to the callers in turn
(round robin), so a caller with one call waits for at most one other caller's call per
caller ahead of it, however many calls and connections the others hold. A waiting call is
not answered, so its client does not send another: a flood is held on its own side. A caller
alone gets every place, so it still has the whole server.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable

__all__ = ["Admission"]


class Admission:
    """At most ``capacity`` calls admitted; the rest wait per caller, served in turn.

    Use on one event loop. Pair every completed :meth:`enter` with one :meth:`leave`.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._admitted = 0
        # Waiting calls per caller; the dict's order is the turn (a served caller moves last).
        self._waiting: dict[Hashable, deque[asyncio.Future[None]]] = {}
        self._waiting_calls = 0
        self.admitted_total = 0  # calls admitted so far, for tests and statistics

    @property
    def admitted(self) -> int:
        """Calls admitted now."""
        return self._admitted

    @property
    def waiting(self) -> int:
        """Calls waiting to be admitted now."""
        return self._waiting_calls

    def waiting_for(self, caller: Hashable) -> int:
        """Calls of ``caller`` waiting now."""
        queue = self._waiting.get(caller)
        return len(queue) if queue is not None else 0

    async def enter(self, caller: Hashable) -> None:
        """Return once the call is admitted (at once when there is room and nobody waits).

        Cancelled while waiting (the client went away, or its deadline passed): the call
        leaves the queue and takes no place.
        """
        if self._admitted < self.capacity and not self._waiting:
            self._admitted += 1
            self.admitted_total += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.get(caller)
        if queue is None:
            queue = self._waiting[caller] = deque()
        queue.append(future)
        self._waiting_calls += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.leave()  # admitted just as it was cancelled: give the place on
            else:
                self._forget(caller, future)
            raise

    def _forget(self, caller: Hashable, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(caller)
        if queue is None:
            return
        try:
            queue.remove(future)
        except ValueError:
            return
        self._waiting_calls -= 1
        if not queue:
            del self._waiting[caller]

    def leave(self) -> None:
        """An admitted call has ended: its place goes to the next caller in turn."""
        self._admitted -= 1
        while self._admitted < self.capacity and self._waiting:
            caller = next(iter(self._waiting))
            queue = self._waiting.pop(caller)
            future = queue.popleft()
            self._waiting_calls -= 1
            if queue:
                self._waiting[caller] = queue  # its next call waits for its next turn
            if future.done():
                continue  # cancelled meanwhile
            future.set_result(None)
            self._admitted += 1
            self.admitted_total += 1
