"""Client and AsyncClient: classify images on a Framecast server.

Both share ``_BaseClient``, which holds everything but the I/O: settings, request building,
result reading and preprocessing. The subclasses only make the calls, sync or on grpc.aio.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import grpc
import numpy as np
from numpy.typing import NDArray

from . import wire
from ._proto import classifier_pb2 as pb
from ._proto import classifier_pb2_grpc as pb_grpc
from ._rpc import mapped_rpc_errors
from .balancing import Address, balancing_options, channel_target, display_address
from .connections import OWN_CONNECTION_OPTION, ConnectionPool
from .errors import InvalidArgumentError, PreprocessingChangedError
from .preprocess import ChannelOrder, ImageInput, is_image_input, preprocess
from .security import TLS, channel_security
from .streaming import (
    DEFAULT_KEEPALIVE_S,
    AsyncStreamSession,
    Backoff,
    StreamConfig,
    StreamMode,
    StreamSession,
    make_stream_config,
)
from .types import Classification, ModelInfo, StreamView
from .wire import Encoding, EncodingName

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT_S = 10.0
# Room for a batch of 128 224x224 frames (19 MB); gRPC's default of 4 MiB holds only 27.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TOP_K = 5
# Framing of one Image inside a request: field tags and length prefixes, generously rounded.
_PER_IMAGE_OVERHEAD_BYTES = 64
# Classify takes the request's bytes as written by wire.classify_request_bytes.
_CLASSIFY = f"/{pb.DESCRIPTOR.services_by_name['Classifier'].full_name}/Classify"
if TYPE_CHECKING:  # grpc's classes take no type arguments at run time
    _SyncClassify = grpc.UnaryUnaryMultiCallable[bytes, pb.ClassifyResponse]
    _AsyncClassify = grpc.aio.UnaryUnaryMultiCallable[bytes, pb.ClassifyResponse]


class _BaseClient:
    """Settings, request building and result reading shared by Client and AsyncClient."""

    def __init__(
        self,
        address: Address = DEFAULT_ADDRESS,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        channel_order: ChannelOrder = "RGB",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: TLS | None = None,
        token: str | None = None,
        allow_insecure_token: bool = False,
        wire: EncodingName = "raw",
        quality: int = 90,
        connections: int = 1,
    ) -> None:
        # Checked first: a bad wire or quality is a ValueError before anything is opened.
        self.encoding = Encoding(wire, quality)
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout}")
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        # Most connections for unary calls (checked by the pool): framecast_client.connections.
        self.connections = connections
        # One server, a dns:/// name of many, or a list: see framecast_client.balancing.
        self.target = channel_target(address)
        self.address = display_address(address)
        self.timeout = timeout
        self.channel_order: ChannelOrder = channel_order
        self.max_message_bytes = max_message_bytes
        # Raises ValueError for unreadable files or a token that would travel in plaintext.
        self._security = channel_security(
            self.target, tls=tls, token=token, allow_insecure_token=allow_insecure_token
        )
        self._credentials = self._security.credentials
        self._metadata = self._security.metadata
        self._model_info: ModelInfo | None = None
        self._warned = False
        self._closed = False

    def _remember(self, info: ModelInfo) -> ModelInfo:
        """Keep the model info; log its warning (random weights) once per client."""
        if info.warning and not self._warned:
            self._warned = True
            logger.warning("server at %s: %s", self.address, info.warning)
        return info

    def _channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            *balancing_options(self.target, self.max_message_bytes),
            *self._security.options,
        ]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Framecast client is closed")

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _preprocess_all(self, images: Sequence[ImageInput], info: ModelInfo) -> NDArray[np.uint8]:
        spec = info.preprocessing
        batch = np.empty((len(images), spec.input_height, spec.input_width, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            batch[i] = preprocess(image, spec, channel_order=self.channel_order)
        return batch

    def _chunks(self, batch: NDArray[np.uint8], info: ModelInfo) -> Iterator[NDArray[np.uint8]]:
        """Split a batch into requests that fit the server's max batch and message limit."""
        image_bytes = int(np.prod(batch.shape[1:])) + _PER_IMAGE_OVERHEAD_BYTES
        if self.encoding.name != "raw":
            # Compressed images are nearly always smaller than raw, but PNG of noise can be a
            # little larger: plan with a margin.
            image_bytes += image_bytes // 8 + 1024
        limit = min(info.max_message_bytes or self.max_message_bytes, self.max_message_bytes)
        per_request = max(1, min(info.max_batch, limit // image_bytes))
        for start in range(0, len(batch), per_request):
            yield batch[start : start + per_request]

    def _check_encoding(self, info: ModelInfo) -> None:
        """Refuse, before sending, an encoding the server does not accept."""
        if self.encoding.name not in info.encodings:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the server at {self.address} does not accept {self.encoding.name} images "
                f"(it accepts {', '.join(info.encodings)}); use wire='raw' or upgrade it",
            )

    def _request(self, batch: NDArray[np.uint8], top_k: int, info: ModelInfo) -> bytes:
        self._check_encoding(info)
        # Stating what the images were prepared for makes a server restarted with another
        # model refuse them (PreprocessingChangedError) instead of classifying them wrongly.
        # Written as bytes directly: building the message would copy each frame twice more.
        return wire.classify_request_bytes(
            batch,
            top_k=top_k,
            preprocessing_id=info.preprocessing_id,
            encoding=self.encoding,
        )

    def _stream_config(
        self,
        info: ModelInfo,
        *,
        top_k: int,
        max_in_flight: int | None,
        mode: StreamMode,
        reconnect: bool,
        backoff: Backoff | None,
        keepalive_s: float | None,
        name: str | None = None,
        max_age: float | None = None,
        follow_hints: bool = True,
    ) -> StreamConfig:
        """What a stream session of this client needs; raises ValueError for bad arguments."""
        self._check_encoding(info)
        return make_stream_config(
            address=self.address,
            target=self.target,
            credentials=self._credentials,
            metadata=self._metadata,
            channel_options=self._channel_options(),
            spec=info.preprocessing,
            preprocessing_id=info.preprocessing_id,
            channel_order=self.channel_order,
            num_classes=len(info.labels),
            top_k=top_k,
            max_in_flight=max_in_flight,
            mode=mode,
            reconnect=reconnect,
            backoff=backoff,
            keepalive_s=keepalive_s,
            encoding=self.encoding,
            name=name,
            max_age=max_age,
            follow_hints=follow_hints,
        )

    @staticmethod
    def _as_list(x: ImageInput | Sequence[ImageInput]) -> tuple[bool, list[ImageInput]]:
        if is_image_input(x):
            return True, [x]  # type: ignore[list-item]
        return False, list(x)  # type: ignore[arg-type]


class Client(_BaseClient):
    """A blocking Framecast client; use it as a context manager.

    >>> with Client("localhost:50051") as client:          # doctest: +SKIP
    ...     top = client.classify("cat.jpg").top
    ...     print(top.label, top.probability)
    """

    def __init__(self, address: Address = DEFAULT_ADDRESS, **kwargs: Any) -> None:
        """``address``: ``host:port``, ``dns:///name:port`` or a list of ``host:port``.

        ``connections``: most connections for unary calls (default 1). The server runs a few
        calls at once on each (``model_info().max_calls_per_connection``) and the rest wait on
        this side; give more to keep more calls in flight from many threads. Every stream
        session has a connection of its own.
        """
        super().__init__(address, **kwargs)
        self._pool = ConnectionPool(self._connect, most=self.connections)

    def _connect(self) -> tuple[grpc.Channel, pb_grpc.ClassifierStub, _SyncClassify]:
        options = [*self._channel_options(), OWN_CONNECTION_OPTION]
        if self._credentials is None:
            channel = grpc.insecure_channel(self.target, options=options)
        else:
            channel = grpc.secure_channel(self.target, self._credentials, options=options)
        classify = channel.unary_unary(
            _CLASSIFY, request_serializer=None, response_deserializer=pb.ClassifyResponse.FromString
        )
        return channel, pb_grpc.ClassifierStub(channel), classify

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            for channel, *_ in self._pool.opened:
                channel.close()

    def model_info(self, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """What the server serves (fetched once, then cached unless refresh=True)."""
        self._check_open()
        if self._model_info is None or refresh:
            with mapped_rpc_errors(self.address), self._pool.lease() as (_, stub, _):
                reply = stub.GetModelInfo(
                    pb.GetModelInfoRequest(),
                    timeout=self._timeout(timeout),
                    metadata=self._metadata,
                )
            self._model_info = self._remember(wire.model_info_from_proto(reply))
            self._pool.limit = self._model_info.max_calls_per_connection
        return self._model_info

    def list_streams(self, *, timeout: float | None = None) -> list[StreamView]:
        """The streams the server runs now, oldest first (the Admin service's ListStreams)."""
        self._check_open()
        with mapped_rpc_errors(self.address), self._pool.lease() as (channel, _, _):
            reply = pb_grpc.AdminStub(channel).ListStreams(
                pb.ListStreamsRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        return [wire.stream_view_from_proto(s) for s in reply.streams]

    def preprocess(self, image: ImageInput) -> NDArray[np.uint8]:
        """Preprocess one image as the server asks: uint8 [H, W, 3] RGB."""
        spec = self.model_info().preprocessing
        return preprocess(image, spec, channel_order=self.channel_order)

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
        single, images = self._as_list(x)
        info = self.model_info()
        try:
            batch = self._preprocess_all(images, info)
            results = self._classify_batch(batch, info, top_k, timeout)
        except PreprocessingChangedError:
            # The server was restarted with a model that wants other preprocessing: prepare
            # the images as it says now, once.
            info = self.model_info(refresh=True)
            batch = self._preprocess_all(images, info)
            results = self._classify_batch(batch, info, top_k, timeout)
        return results[0] if single else results

    def classify_preprocessed(
        self, batch: NDArray[np.uint8], *, top_k: int = DEFAULT_TOP_K, timeout: float | None = None
    ) -> list[Classification]:
        """Classify already-preprocessed images, uint8 [N, H, W, 3] RGB, split as needed.

        The images must be prepared as ``model_info()`` says (``preprocess`` does that); a
        server that now wants other preprocessing raises PreprocessingChangedError.
        """
        return self._classify_batch(batch, self.model_info(), top_k, timeout)

    def _classify_batch(
        self, batch: NDArray[np.uint8], info: ModelInfo, top_k: int, timeout: float | None
    ) -> list[Classification]:
        self._check_open()
        results: list[Classification] = []
        for chunk in self._chunks(batch, info):
            with mapped_rpc_errors(self.address), self._pool.lease() as (_, _, classify):
                reply = classify(
                    self._request(chunk, top_k, info),
                    timeout=self._timeout(timeout),
                    metadata=self._metadata,
                )
            results.extend(wire.classification_from_proto(r) for r in reply.results)
        return results

    def stream(
        self,
        frames: Iterable[ImageInput],
        *,
        top_k: int = 1,
        max_in_flight: int | None = None,
        mode: StreamMode = "realtime",
        reconnect: bool = True,
        backoff: Backoff | None = None,
        keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
        name: str | None = None,
        max_age: float | None = None,
        follow_hints: bool = True,
    ) -> StreamSession:
        """Classify a stream of frames over one ClassifyStream call; returns a running session.

        Iterate over the session for a StreamResult per frame, in source order; read
        ``session.stats`` for live counters; close it (use ``with``) to stop. See
        :mod:`framecast_client.streaming` for the pipeline and the policies.

        Args:
            frames: Any iterable of images (paths, encoded bytes, PIL images, uint8 numpy
                frames in the client's channel_order), e.g. a source of
                :mod:`framecast_client.sources`. It is read on a thread of the session;
                frames must not be modified after they are yielded.
            top_k: Classes per frame.
            max_in_flight: Most frames sent and not answered at any time (default: 3 in
                realtime mode, for latency; 8 in lossless mode, for throughput).
            mode: ``"realtime"`` drops the oldest unsent frames when the server falls behind
                (the latest frame wins; latency stays bounded); ``"lossless"`` gives every
                frame a result, in order, reading the source only as fast as the server
                answers.
            reconnect: Reconnect when the server goes away (UNAVAILABLE or a reset
                connection) instead of ending the stream with UnavailableError.
            backoff: The schedule of reconnection attempts (default :class:`Backoff()`).
            keepalive_s: While the stream is open, ping the server after this many seconds
                without traffic and treat the connection as dead (and reconnect) when a ping
                goes unanswered for as long: a network that silently stops delivering is
                noticed in about twice this time instead of TCP's minutes. None: no pings.
            name: What the stream is called in the server's stream listing (``framecast
                top``), e.g. ``"dock-3"``; cut to 64 characters. Never a metrics label.
            max_age: Seconds; the server drops frames older than this (from capture) before
                computing them, and answers them with a FrameError whose ``drop_reason``
                says why. None: no limit.
            follow_hints: Realtime mode: skip frames at capture, before preparing and
                sending them, to the rate the server says it can serve this stream now
                (``stats.skipped``), and keep no more frames in flight than it says are
                served within the max age; False sends as fast as ``max_in_flight`` allows and
                drops the oldest unsent frame instead. Lossless sessions answer every frame
                either way.

        Raises:
            ValueError: An argument is out of range.
            RpcError: The server's model info could not be fetched (the session needs its
                preprocessing before it starts; it reads it afresh, and again after every
                reconnection, since a restarted server may serve a model that wants other
                preprocessing).
        """
        self._check_open()
        config = self._stream_config(
            self.model_info(refresh=True),  # a long-lived client may hold an outdated one
            top_k=top_k,
            max_in_flight=max_in_flight,
            mode=mode,
            reconnect=reconnect,
            backoff=backoff,
            keepalive_s=keepalive_s,
            name=name,
            max_age=max_age,
            follow_hints=follow_hints,
        )
        return StreamSession(frames, config)


class AsyncClient(_BaseClient):
    """The same surface as Client on grpc.aio; use it as an async context manager."""

    def __init__(self, address: Address = DEFAULT_ADDRESS, **kwargs: Any) -> None:
        """``address``: as for Client."""
        super().__init__(address, **kwargs)
        self._pool = ConnectionPool(self._connect, most=self.connections)

    def _connect(
        self,
    ) -> tuple[grpc.aio.Channel, pb_grpc.ClassifierAsyncStub, _AsyncClassify]:
        options = [*self._channel_options(), OWN_CONNECTION_OPTION]
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
        classify = channel.unary_unary(
            _CLASSIFY, request_serializer=None, response_deserializer=pb.ClassifyResponse.FromString
        )
        return channel, pb_grpc.ClassifierStub(channel), classify

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            for channel, *_ in self._pool.opened:
                await channel.close(None)

    async def model_info(self, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """What the server serves (fetched once, then cached unless refresh=True)."""
        self._check_open()
        if self._model_info is None or refresh:
            with mapped_rpc_errors(self.address), self._pool.lease() as (_, stub, _):
                reply = await stub.GetModelInfo(
                    pb.GetModelInfoRequest(),
                    timeout=self._timeout(timeout),
                    metadata=self._metadata,
                )
            self._model_info = self._remember(wire.model_info_from_proto(reply))
            self._pool.limit = self._model_info.max_calls_per_connection
        return self._model_info

    async def preprocess(self, image: ImageInput) -> NDArray[np.uint8]:
        """Preprocess one image as the server asks: uint8 [H, W, 3] RGB."""
        spec = (await self.model_info()).preprocessing
        return preprocess(image, spec, channel_order=self.channel_order)

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
        single, images = self._as_list(x)
        info = await self.model_info()
        try:
            batch = self._preprocess_all(images, info)
            results = await self._classify_batch(batch, info, top_k, timeout)
        except PreprocessingChangedError:
            # As in Client.classify: the server's model changed; prepare the images again, once.
            info = await self.model_info(refresh=True)
            batch = self._preprocess_all(images, info)
            results = await self._classify_batch(batch, info, top_k, timeout)
        return results[0] if single else results

    async def classify_preprocessed(
        self, batch: NDArray[np.uint8], *, top_k: int = DEFAULT_TOP_K, timeout: float | None = None
    ) -> list[Classification]:
        """Classify already-preprocessed images; as Client.classify_preprocessed."""
        return await self._classify_batch(batch, await self.model_info(), top_k, timeout)

    async def _classify_batch(
        self, batch: NDArray[np.uint8], info: ModelInfo, top_k: int, timeout: float | None
    ) -> list[Classification]:
        self._check_open()
        results: list[Classification] = []
        for chunk in self._chunks(batch, info):
            with mapped_rpc_errors(self.address), self._pool.lease() as (_, _, classify):
                reply = await classify(
                    self._request(chunk, top_k, info),
                    timeout=self._timeout(timeout),
                    metadata=self._metadata,
                )
            results.extend(wire.classification_from_proto(r) for r in reply.results)
        return results

    def stream(
        self,
        frames: Iterable[ImageInput],
        *,
        top_k: int = 1,
        max_in_flight: int | None = None,
        mode: StreamMode = "realtime",
        reconnect: bool = True,
        backoff: Backoff | None = None,
        keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
        name: str | None = None,
        max_age: float | None = None,
        follow_hints: bool = True,
    ) -> AsyncStreamSession:
        """Classify a stream of frames; the same arguments and policies as Client.stream.

        Returns the session without starting it: it starts on ``async with`` or on the first
        ``async for`` step (fetching the server's model info then, which may raise RpcError).
        The frames are read on a thread of the session, so ``frames`` is a plain iterable.
        """
        self._check_open()

        async def configure() -> StreamConfig:
            self._check_open()
            return self._stream_config(
                await self.model_info(refresh=True),  # as in Client.stream
                top_k=top_k,
                max_in_flight=max_in_flight,
                mode=mode,
                reconnect=reconnect,
                backoff=backoff,
                keepalive_s=keepalive_s,
                name=name,
                max_age=max_age,
                follow_hints=follow_hints,
            )

        return AsyncStreamSession(frames, configure, mode=mode)
