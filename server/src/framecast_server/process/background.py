"""A FramecastServer on its own event-loop thread: for the demo, tests and notebooks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ..backends.base import Backend
from ..core.runtime import ServingModel
from ..settings import ServerSettings
from .app import FramecastServer
from .event_loop import new_event_loop

T = TypeVar("T")


class BackgroundServer:
    """Start a server in a background thread; ``with BackgroundServer(s) as srv: srv.address``.

    Entering returns once the model is loaded and health says SERVING; exiting shuts the
    server down gracefully. Errors while loading are raised from ``__enter__``.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        load: bool = True,
        backend_factory: Callable[[Path], Backend] | None = None,
    ) -> None:
        self.settings = settings
        self._load = load
        self._loop = new_event_loop()  # the loop `framecast serve` runs on
        self._thread = threading.Thread(target=self._loop.run_forever, name="framecast-server")
        self._backend_factory = backend_factory
        self._server: FramecastServer | None = None
        self.serving: ServingModel | None = None

    @property
    def server(self) -> FramecastServer:
        if self._server is None:
            raise RuntimeError("the server has not started")
        return self._server

    @property
    def port(self) -> int:
        if self._server is None or self._server.port is None:
            raise RuntimeError("the server has not started")
        return self._server.port

    @property
    def address(self) -> str:
        # A wildcard bind is reached over loopback from this process.
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def load(self) -> ServingModel:
        """Load the model (when constructed with load=False)."""
        self.serving = self.run(self.server.load())
        return self.serving

    async def _create(self) -> FramecastServer:
        return FramecastServer(self.settings, backend_factory=self._backend_factory)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        try:
            # grpc.aio objects belong to the loop they are made on: make the server there.
            self._server = self.run(self._create())
            self.run(self._server.start())
            if self._load:
                self.load()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, grace: float | None = None) -> None:
        """Stop the server (graceful) and its thread."""
        if self._thread.is_alive():
            try:
                if self._server is not None:
                    self.run(self._server.stop(grace))
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()
