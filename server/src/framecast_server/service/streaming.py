"""Admission for a stream of requests, shared by every protocol's streaming method.

One place decides how a stream meets the core's limits and the drain, so ClassifyStream and the
Open Inference Protocol's ModelStreamInfer behave alike:

* Flow control: when the queue or the memory budget has no room, the stream stops reading
  (:meth:`Batcher.wait_for_room`) and HTTP/2 pushes back on the client; no request is refused
  for a full server. At most :data:`STREAM_WINDOW` admitted requests per stream are outstanding.
* Drain: when the call gate drains, the stream stops reading new requests, the ones admitted
  are answered, and the call ends UNAVAILABLE, which tells a client to reconnect elsewhere.
* Cleanup: what was admitted and will never be answered (the client went away) is withdrawn.

A servicer supplies ``prepare`` (request -> its tag, its images or the status refusing it, and
its deadline) and turns each ``(tag, outcome)`` this yields into its protocol's response.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from numpy.typing import NDArray

from ..core.batcher import BatcherClosedError, Caller, ItemResult, QueueFullError
from ..core.drain import CallGate
from ..core.runtime import BatcherLike
from .errors import set_status, status_for

__all__ = ["STREAM_WINDOW", "Outcome", "Prepared", "Status", "admitted"]

# Requests of one stream admitted to the batcher before the stream stops reading: flow control
# pushes back on the client instead of queueing without bound.
STREAM_WINDOW = 64

Request = TypeVar("Request")
Tag = TypeVar("Tag")
Status = tuple[grpc.StatusCode, str]
# What became of one request: the batcher's future of its results, or the status refusing it.
Outcome = asyncio.Future[list[ItemResult]] | Status
# A prepared request: its tag (what its response needs), its images [N, H, W, 3] or the status
# refusing it, and its deadline (time.monotonic()). Plain tuples: one is built per request.
Prepared = tuple[Tag, NDArray[np.uint8] | Status, float | None]


async def admitted(
    requests: AsyncIterator[Request],
    prepare: Callable[[Request], Awaitable[Prepared[Tag]]],
    *,
    batcher: BatcherLike,
    caller: Caller,
    gate: CallGate,
    context: grpc.aio.ServicerContext[Any, Any],
    on_admit: Callable[[Tag], None] | None = None,
) -> AsyncGenerator[tuple[Tag, Outcome], None]:
    """Each request's tag and outcome, in arrival order; see the module docstring.

    ``on_admit(tag)`` is called as each request enters the batcher's queue (after any wait
    for room), so a servicer can tell how long a request waited before admission.

    Iterate it inside ``contextlib.aclosing`` so that, when the call ends early, what it
    admitted is withdrawn at once. A drained stream ends with the call's status set.
    """
    submit, wait_for_room = batcher.submit_nowait, batcher.wait_for_room
    # Admitted requests wait here in arrival order, each as the batcher's future of its result
    # (no task per request); the bound caps how many one stream may have out.
    pending: asyncio.Queue[tuple[Tag, Outcome] | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
    # Set when the stream stops reading because the server drains or closes.
    cut: list[bool] = []

    async def read() -> None:
        entry: tuple[Tag, Outcome] | None = None
        try:
            async for request in requests:
                tag, images, deadline = await prepare(request)
                if isinstance(images, np.ndarray):
                    while True:
                        full = False
                        try:
                            entry = (tag, submit(images, deadline=deadline, caller=caller))
                            if on_admit is not None:
                                on_admit(tag)
                            break
                        except QueueFullError:
                            full = True
                        except Exception as exc:
                            entry = (tag, status_for(exc))
                            break
                        if full:
                            # Outside the except block: no exception is kept while waiting.
                            # Stop reading until there is room: flow control pushes back on
                            # the client, no request is refused.
                            await wait_for_room(images, caller=caller)
                else:
                    entry = (tag, images)
                await pending.put(entry)
                entry = None
        except (asyncio.CancelledError, BatcherClosedError):
            if entry is not None and not isinstance(entry[1], tuple):
                entry[1].cancel()  # admitted but never to be answered: withdraw it
            if not cut:
                raise
        finally:
            await pending.put(None)

    reader = asyncio.ensure_future(read())

    def wind_down() -> None:
        cut.append(True)
        reader.cancel()

    unregister = gate.on_drain(wind_down)
    try:
        while (entry := await pending.get()) is not None:
            yield entry
        if cut:
            # Every request read has been answered; the client resends the rest after
            # reconnecting (UNAVAILABLE), as after a restart.
            set_status(context, BatcherClosedError("draining"))
            return
        await reader  # re-raises a failure of the request stream
    finally:
        unregister()
        reader.cancel()
        while not pending.empty():
            leftover = pending.get_nowait()
            if leftover is not None and not isinstance(leftover[1], tuple):
                leftover[1].cancel()  # withdraws it from the batcher's queue
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
