"""Admission of unary calls: a server-wide number at once, the rest wait in turn per caller.

Part of the core, no gRPC. Why it exists: every call a client gets answered comes straight
back, and gRPC and the event loop take calls in arrival order at some 250 us each, so a client
with many calls over many connections kept the loop's queue full ahead of everyone else,
before the batcher's fair order could help. A servicer enters a call here when it arrives,
before it reads the request's bytes (so what waits is a call's HTTP/2 window, not its
images), and leaves when it ends. At most ``capacity`` calls are admitted at once; the others
wait, first in, first out within a caller, and a freed place goes to the callers in turn
(round robin). A waiting call is not answered, so its client does not send another: a flood
is held on its own side.

Beside other callers, a caller runs at most one call at a time (``beside_others``, and never
more than its share, ``capacity // callers``); alone, it takes every place, so it still has the
whole server. Why: grpc.aio and the batcher move every call one step per turn of the event
loop (accept, read, result, reply), and a turn runs a step of every call in progress, so a
polite call's latency grows with the number of a flood's calls running beside it (measured on
2 cores beside 200 calls over 100 connections, benchmarks/fairness.py, the greedy client on a
CPU of its own: polite p50 7.9 ms with 8 of the flood's calls admitted, 5.4 with 4, 2.6 with
2, 2.3 with 1; its idle p50 0.7 ms). A caller is "in" while it holds or waits for a place and
for ``presence_s`` after its last call ended: a caller sending one call at a time holds none
between its calls, and without this the flood took every place back in each gap. The cost is
the flood's own rate beside others (about 0.8x of its rate alone with the null backend: fewer
calls share a batch), never a caller's alone.

One place beyond ``capacity`` (``spare``) is kept for a caller with no call admitted: beside a
flood that holds every place, a caller sending one call at a time is admitted on arrival
instead of waiting for a flooding call to end (measured on 2 cores beside 200 calls over 100
connections: that wait was a third of its latency). A caller holding a place never takes it,
so a caller alone gets exactly ``capacity`` places, and at most ``capacity + spare`` calls are
admitted at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable

__all__ = ["CALLS_BESIDE_OTHERS", "PRESENCE_S", "Admission"]

# The server's policy (process/app.py): one call at a time beside other callers, and a caller
# counts as in for half a second after its last call (a camera at 2 frames/s or more stays in).
CALLS_BESIDE_OTHERS = 1
PRESENCE_S = 0.5


class Admission:
    """At most ``capacity`` calls admitted, plus ``spare`` for callers holding none; in turn.

    Use on one event loop. Pair every completed :meth:`enter` with one :meth:`leave` for the
    same caller.
    """

    def __init__(
        self,
        capacity: int,
        *,
        spare: int = 1,
        beside_others: int | None = None,
        presence_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``beside_others``: the most calls a caller holds while others are in (None: its
        share, ``capacity // callers``); ``presence_s``: how long a caller stays in after its
        last call ended (0: only while it holds or waits)."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if spare < 0:
            raise ValueError(f"spare must not be negative, got {spare}")
        if beside_others is not None and beside_others < 1:
            raise ValueError(f"beside_others must be at least 1, got {beside_others}")
        if presence_s < 0:
            raise ValueError(f"presence_s must not be negative, got {presence_s}")
        self.capacity = capacity
        self.spare = spare
        self._most_beside = capacity if beside_others is None else min(capacity, beside_others)
        self._presence_s = presence_s
        self._clock = clock
        # Callers whose last call ended less than presence_s ago: when it ended, oldest first.
        self._recent: dict[Hashable, float] = {}
        self._admitted = 0
        self._held: dict[Hashable, int] = {}  # calls admitted per caller (callers holding any)
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

    def admitted_for(self, caller: Hashable) -> int:
        """Calls of ``caller`` admitted now."""
        return self._held.get(caller, 0)

    def _room_for(self, caller: Hashable) -> bool:
        held = self._held.get(caller, 0)
        if not held:  # a caller holding none may take the spare places too
            return self._admitted < self.capacity + self.spare
        if self._admitted >= self.capacity:
            return False
        # Its share of the places while other callers are in (holding, waiting, or done less
        # than presence_s ago); all alone. It holds a place, so it is among the holders;
        # the others are counted only when there are some (no set built when alone).
        callers = len(self._held)
        recent = self._recent
        if recent:
            self._expire()
        if self._waiting or (recent and (len(recent) > 1 or caller not in recent)):
            callers = len(self._held.keys() | self._waiting.keys() | recent.keys())
        if callers == 1:
            return True
        return held < max(1, min(self.capacity // callers, self._most_beside))

    def _expire(self) -> None:
        horizon = self._clock() - self._presence_s
        recent = self._recent
        while recent:
            oldest = next(iter(recent))
            if recent[oldest] > horizon:
                break
            del recent[oldest]

    def _may_enter_now(self, caller: Hashable) -> bool:
        # Nobody waiting could take a place now (every leave ends in _grant; a caller that only
        # waits does so because every place is taken), so a call with room overtakes nobody;
        # it only must not overtake its own caller's calls.
        return caller not in self._waiting and self._room_for(caller)

    def _admit(self, caller: Hashable) -> None:
        self._admitted += 1
        self._held[caller] = self._held.get(caller, 0) + 1
        self.admitted_total += 1

    async def enter(self, caller: Hashable) -> None:
        """Return once the call is admitted (at once when there is room and it is not behind).

        Cancelled while waiting (the client went away, or its deadline passed): the call
        leaves the queue and takes no place.
        """
        if self._may_enter_now(caller):
            self._admit(caller)
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
                self.leave(caller)  # admitted just as it was cancelled: give the place on
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

    def leave(self, caller: Hashable) -> None:
        """An admitted call of ``caller`` has ended: its place goes to the next caller in turn."""
        self._admitted -= 1
        held = self._held[caller] - 1
        if held:
            self._held[caller] = held
        else:
            del self._held[caller]
        if self._presence_s:
            recent = self._recent
            recent.pop(caller, None)  # to the end: the dict's order is when they ended
            recent[caller] = self._clock()
        self._grant()

    def _grant(self) -> None:
        # Callers in turn, one call each per pass; a caller that may not take a place now (it
        # holds its share, or holds one and only the spare is free) keeps its turn.
        granted = True
        while granted and self._waiting and self._admitted < self.capacity + self.spare:
            granted = False
            for caller in list(self._waiting):
                if not self._room_for(caller):
                    continue
                queue = self._waiting.pop(caller)
                while queue and queue[0].done():
                    queue.popleft()  # cancelled meanwhile (its waiter has not run yet)
                    self._waiting_calls -= 1
                if not queue:
                    continue
                future = queue.popleft()
                self._waiting_calls -= 1
                if queue:
                    self._waiting[caller] = queue  # its next call waits for its next turn
                future.set_result(None)
                self._admit(caller)
                granted = True
                if self._admitted >= self.capacity + self.spare:
                    return
