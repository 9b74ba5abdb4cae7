"""Client and AsyncClient: classify images on a Framecast server.

Both are :class:`~framecast_client.client_base.ClientBase`, which holds everything but the
I/O: settings, connections, request building, reply reading and the plan of every method.
Here each method only carries its plan out: blocking (Client) or on grpc.aio (AsyncClient).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar, overload

import grpc
import numpy as np
from numpy.typing import NDArray

from ._rpc import mapped_rpc_errors
from .client_base import (
    DEFAULT_ADDRESS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TOP_K,
    Call,
    ClientBase,
    Plan,
    StreamOptions,
    advance,
)
from .connections import open_aio_channel, open_channel
from .preprocess import ImageInput
from .streaming import AsyncStreamSession, StreamSession
from .types import Classification, ModelInfo, StreamView

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_TOP_K",
    "AsyncClient",
    "Client",
]

T = TypeVar("T")


class Client(ClientBase[grpc.Channel, StreamSession]):
    """A blocking Framecast client; use it as a context manager.

    >>> with Client("localhost:50051") as client:          # doctest: +SKIP
    ...     top = client.classify("cat.jpg").top
    ...     print(top.label, top.probability)

    ``Client(address, *, timeout, channel_order, max_message_bytes, tls, token,
    allow_insecure_token, wire, quality, connections)``: see :class:`ClientBase`. Safe to use
    from many threads.
    """

    def _open_channel(self, options: list[tuple[str, Any]]) -> grpc.Channel:
        return open_channel(self.target, self._credentials, options)

    def _run(self, plan: Plan[T]) -> T:
        """Carry a plan out with blocking calls."""
        step = advance(plan, None)
        while isinstance(step, Call):
            try:
                with mapped_rpc_errors(self.address), self._pool.lease() as (_, methods):
                    reply = methods[step.method.path](
                        step.request, timeout=step.timeout, metadata=self._metadata
                    )
            except Exception as exc:  # raised in the plan, where it made the call
                step = advance(plan, exc)
            else:
                step = advance(plan, reply)
        return step.value

    def _open_session(self, frames: Iterable[ImageInput], options: StreamOptions) -> StreamSession:
        return StreamSession(frames, self._run(self._stream_config_plan(options)))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        for channel in self._closing():
            channel.close()

    def model_info(self, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """What the server serves (fetched once, then cached unless refresh=True)."""
        return self._run(self._model_info_plan(refresh, timeout))

    def list_streams(self, *, timeout: float | None = None) -> list[StreamView]:
        """The streams the server runs now, oldest first (the Admin service's ListStreams)."""
        return self._run(self._list_streams_plan(timeout))

    def preprocess(self, image: ImageInput) -> NDArray[np.uint8]:
        """Preprocess one image as the server asks: uint8 [H, W, 3] RGB."""
        return self._run(self._preprocess_plan(image))

    # A numpy batch or bytes is also a Sequence: the first overload wins for those, as intended.
    @overload
    def classify(  # type: ignore[overload-overlap]
        self, x: ImageInput, *, top_k: int = ..., timeout: float | None = ...
    ) -> Classification: ...
    @overload
    def classify(
        self, x: Sequence[ImageInput], *, top_k: int = ..., timeout: float | None = ...
    ) -> list[Classification]: ...
    def classify(
        self,
        x: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = DEFAULT_TOP_K,
        timeout: float | None = None,
    ) -> Classification | list[Classification]:
        """Classify one image (returns one result) or a list of images (results in order).

        An image is a path, encoded bytes (JPEG, PNG, ...), a PIL image or a uint8 HxWx3
        numpy frame in the client's channel_order.
        """
        return self._run(self._classify_plan(x, top_k, timeout))

    def classify_preprocessed(
        self, batch: NDArray[np.uint8], *, top_k: int = DEFAULT_TOP_K, timeout: float | None = None
    ) -> list[Classification]:
        """Classify already-preprocessed images, uint8 [N, H, W, 3] RGB, split as needed.

        The images must be prepared as ``model_info()`` says (``preprocess`` does that); a
        server that now wants other preprocessing raises PreprocessingChangedError.
        """
        return self._run(self._classify_preprocessed_plan(batch, top_k, timeout))


class AsyncClient(ClientBase[grpc.aio.Channel, AsyncStreamSession]):
    """The same surface as Client on grpc.aio; use it as an async context manager."""

    def _open_channel(self, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        return open_aio_channel(self.target, self._credentials, options)

    async def _run(self, plan: Plan[T]) -> T:
        """Carry a plan out with awaited calls."""
        step = advance(plan, None)
        while isinstance(step, Call):
            outcome: object
            try:
                with mapped_rpc_errors(self.address), self._pool.lease() as (_, methods):
                    call = methods[step.method.path]
                    outcome = await call(
                        step.request, timeout=step.timeout, metadata=self._metadata
                    )
            except Exception as exc:  # raised in the plan, where it made the call
                outcome = exc
            step = advance(plan, outcome)
        return step.value

    def _open_session(
        self, frames: Iterable[ImageInput], options: StreamOptions
    ) -> AsyncStreamSession:
        return AsyncStreamSession(
            frames, lambda: self._run(self._stream_config_plan(options)), mode=options.mode
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        for channel in self._closing():
            await channel.close(None)

    async def model_info(self, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """What the server serves (fetched once, then cached unless refresh=True)."""
        return await self._run(self._model_info_plan(refresh, timeout))

    async def list_streams(self, *, timeout: float | None = None) -> list[StreamView]:
        """The streams the server runs now, oldest first (the Admin service's ListStreams)."""
        return await self._run(self._list_streams_plan(timeout))

    async def preprocess(self, image: ImageInput) -> NDArray[np.uint8]:
        """Preprocess one image as the server asks: uint8 [H, W, 3] RGB."""
        return await self._run(self._preprocess_plan(image))

    @overload
    async def classify(  # type: ignore[overload-overlap]
        self, x: ImageInput, *, top_k: int = ..., timeout: float | None = ...
    ) -> Classification: ...
    @overload
    async def classify(
        self, x: Sequence[ImageInput], *, top_k: int = ..., timeout: float | None = ...
    ) -> list[Classification]: ...
    async def classify(
        self,
        x: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = DEFAULT_TOP_K,
        timeout: float | None = None,
    ) -> Classification | list[Classification]:
        """Classify one image (returns one result) or a list of images (results in order)."""
        return await self._run(self._classify_plan(x, top_k, timeout))

    async def classify_preprocessed(
        self, batch: NDArray[np.uint8], *, top_k: int = DEFAULT_TOP_K, timeout: float | None = None
    ) -> list[Classification]:
        """Classify already-preprocessed images; as Client.classify_preprocessed."""
        return await self._run(self._classify_preprocessed_plan(batch, top_k, timeout))
