"""The asyncio session: the call runs on the event loop, reading and preprocessing on threads."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc

from .._proto import classifier_pb2 as pb
from .._proto import classifier_pb2_grpc as pb_grpc
from ..connections import open_aio_channel
from ..preprocess import ImageInput
from .config import StreamConfig, StreamMode
from .drive import Drive, OpenCall, Pause, Step, Stop
from .pipeline import WAIT, Signal, StreamCore, result_or_raise
from .results import Counters, StreamResult, StreamStats

T = TypeVar("T")


class AsyncStreamSession:
    """The asyncio twin of :class:`StreamSession`; iterate with ``async for``.

    Made by :meth:`AsyncClient.stream`; it starts on ``async with`` (or on the first
    ``async for`` step, or :meth:`start`)::

        async with client.stream(frames, mode="lossless") as session:
            async for result in session:
                ...

    Reading and preprocessing run on two threads of the session, as in the blocking session
    (sources and preprocessing block); the call itself runs on the event loop.
    """

    def __init__(
        self,
        frames: Iterable[ImageInput],
        configure: Callable[[], Awaitable[StreamConfig]],
        *,
        mode: StreamMode,
    ) -> None:
        """``configure`` fetches the server's preprocessing and builds the StreamConfig."""
        self._frames = frames
        self._configure = configure
        self._mode: StreamMode = mode
        self._core: StreamCore | None = None
        self._call: Any = None
        self._channel: grpc.aio.Channel | None = None
        self._driver: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._starting: asyncio.Lock | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncStreamSession:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncStreamSession:
        return self

    async def __anext__(self) -> StreamResult:
        core = await self._started_core()
        item: StreamResult | BaseException | Signal = await self._wait(core.pop_locked)
        if (result := result_or_raise(item)) is None:
            raise StopAsyncIteration
        return result

    @property
    def stats(self) -> StreamStats:
        """Live counters and latency percentiles (all zero before the session starts)."""
        if self._core is None:
            return Counters(self._mode).snapshot(0.0)
        return self._core.stats()

    async def start(self) -> None:
        """Fetch the server's preprocessing and start streaming (idempotent)."""
        await self._started_core()

    async def _started_core(self) -> StreamCore:
        if self._core is not None:
            return self._core
        if self._closed:
            raise RuntimeError("this stream session is closed")
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._core is None:
                config = await self._configure()
                loop = asyncio.get_running_loop()
                wakeup = asyncio.Event()

                def wake() -> None:
                    # RuntimeError: the loop is closed, and nobody is left to wake.
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(wakeup.set)

                core = StreamCore(config)
                core.add_listener(wake)
                channel = open_aio_channel(
                    config.target, config.credentials, config.channel_options
                )
                self._wakeup, self._channel = wakeup, channel
                self._core = core
                core.start_threads(self._frames)
                self._driver = asyncio.ensure_future(self._drive(core, channel))
        return self._core

    async def aclose(self) -> None:
        """Stop the source, the threads and the call; results not yet taken are discarded."""
        if self._closed:
            return
        self._closed = True
        core = self._core
        if core is None:
            return
        core.stop(close=True)
        if self._call is not None:
            self._call.cancel()
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        await asyncio.to_thread(core.join_threads)

    async def _wait(self, attempt: Callable[[], T | Signal]) -> T | Signal:
        """Call ``attempt`` under the lock until it returns something other than WAIT."""
        core, wakeup = self._core, self._wakeup
        assert core is not None
        assert wakeup is not None
        while True:
            # Cleared before the check: a change after the check sets it again, so no wake-up
            # is lost between the check and the wait.
            wakeup.clear()
            with core.lock:
                item = attempt()
            if item is not WAIT:
                return item
            await wakeup.wait()

    async def _sleep_unless_stopped(self, core: StreamCore, delay: float) -> None:
        deadline = time.monotonic() + delay
        wakeup = self._wakeup
        assert wakeup is not None
        while not core.is_stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            wakeup.clear()
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _requests(self, core: StreamCore, generation: int) -> AsyncIterator[pb.StreamRequest]:
        while True:
            item = await self._wait(lambda: core.take_locked(generation))
            if not isinstance(item, pb.StreamRequest):
                return
            yield item

    async def _drive(self, core: StreamCore, channel: grpc.aio.Channel) -> None:
        """The receiver task: carries out the drive loop's steps until the stream ends."""
        stub = pb_grpc.ClassifierStub(channel)
        drive = Drive(core)
        try:
            step = drive.start()
            while not isinstance(step, Stop):
                if isinstance(step, OpenCall):
                    step = await self._run_call(core, drive, stub, step.generation)
                elif isinstance(step, Pause):
                    await self._sleep_unless_stopped(core, step.seconds)
                    step = drive.paused()
                else:
                    outcome: pb.ModelInfo | grpc.RpcError
                    try:
                        call = stub.GetModelInfo(
                            pb.GetModelInfoRequest(), timeout=step.timeout, metadata=step.metadata
                        )
                        outcome = await call
                    except grpc.RpcError as exc:
                        outcome = exc
                    step = drive.info_answered(outcome)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            drive.crashed(exc)
        finally:
            core.stop()
            await channel.close(None)

    async def _run_call(
        self, core: StreamCore, drive: Drive, stub: pb_grpc.ClassifierAsyncStub, generation: int
    ) -> Step:
        """One ClassifyStream call, read to its end; the drive loop's next step."""

        def room() -> bool | Signal:
            return core.output_room_locked() or WAIT

        call = stub.ClassifyStream(self._requests(core, generation), metadata=core.config.metadata)
        self._call = call
        try:
            async for response in call:
                await self._wait(room)
                with core.lock:
                    if not drive.on_response_locked(generation, response):
                        return Stop()
        except grpc.RpcError as exc:
            return drive.call_ended(exc)
        return drive.call_ended(None)
