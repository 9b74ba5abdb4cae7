"""What Client and AsyncClient share: everything but the I/O.

Each method of a client is written once here as a *plan*: a generator that yields the unary
:class:`Call` s it needs made, is sent each reply (or has the call's error thrown in where it
made the call) and returns the method's result. It builds the requests, reads the replies,
splits batches, retries once on a server whose model changed, and configures stream sessions.
``Client`` carries a plan out with blocking calls and ``AsyncClient`` with awaited ones (their
``_run``); both hand :class:`ClientBase` their way of opening a channel and a stream session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import grpc
import numpy as np
from numpy.typing import NDArray

from . import wire
from ._proto import classifier_pb2 as pb
from .balancing import Address, balancing_options, channel_target, display_address
from .connections import OWN_CONNECTION_OPTION, ConnectionPool
from .errors import InvalidArgumentError, PreprocessingChangedError
from .preprocess import ChannelOrder, ImageInput, is_image_input, preprocess
from .security import TLS, channel_security
from .streaming import DEFAULT_KEEPALIVE_S, Backoff, StreamConfig, StreamMode, make_stream_config
from .types import Classification, ModelInfo, StreamView
from .wire import Encoding, EncodingName

# The warning of a server serving random weights is the client's (framecast_client.client):
# the server's CLI and the tests quiet or read it under that name.
logger = logging.getLogger("framecast_client.client")

T = TypeVar("T")
ChannelT = TypeVar("ChannelT")
SessionT = TypeVar("SessionT")

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT_S = 10.0
# Room for a batch of 128 224x224 frames (19 MB); gRPC's default of 4 MiB holds only 27.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TOP_K = 5
# Framing of one Image inside a request: field tags and length prefixes, generously rounded.
_PER_IMAGE_OVERHEAD_BYTES = 64


@dataclass(frozen=True, slots=True)
class Method:
    """A unary method of the server: its path and how its reply is read."""

    path: str
    read_reply: Callable[[bytes], Any]


def _method(service: str, name: str, reply: Any) -> Method:
    return Method(f"/{pb.DESCRIPTOR.services_by_name[service].full_name}/{name}", reply.FromString)


GET_MODEL_INFO = _method("Classifier", "GetModelInfo", pb.ModelInfo)
# Classify takes the request's bytes as written by wire.classify_request_bytes: building the
# message would copy each frame twice more. The other requests are serialized by their plans.
CLASSIFY = _method("Classifier", "Classify", pb.ClassifyResponse)
LIST_STREAMS = _method("Admin", "ListStreams", pb.ListStreamsResponse)
_METHODS = (GET_MODEL_INFO, CLASSIFY, LIST_STREAMS)


@dataclass(frozen=True, slots=True)
class Call:
    """One unary call a plan needs made: the reply (or the error) goes back into the plan."""

    method: Method
    request: bytes
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Done(Generic[T]):
    """A plan's result."""

    value: T


Plan = Generator[Call, Any, T]


def advance(plan: Plan[T], outcome: object) -> Call | Done[T]:
    """Hand ``outcome`` (the last call's reply, or its exception) to ``plan``: its next step."""
    try:
        if isinstance(outcome, BaseException):
            return plan.throw(outcome)
        return plan.send(outcome)
    except StopIteration as stop:
        return Done(stop.value)


def method_callables(channel: Any) -> dict[str, Any]:
    """The channel's multicallable for each unary method, by path (requests go as bytes)."""
    return {
        m.path: channel.unary_unary(
            m.path, request_serializer=None, response_deserializer=m.read_reply
        )
        for m in _METHODS
    }


class StreamOptions(NamedTuple):
    """The arguments of ``stream()``, checked by make_stream_config when the session starts."""

    top_k: int
    max_in_flight: int | None
    mode: StreamMode
    reconnect: bool
    backoff: Backoff | None
    keepalive_s: float | None
    name: str | None
    max_age: float | None
    follow_hints: bool


class ClientBase(Generic[ChannelT, SessionT]):
    """Settings, connections and the plans of every method, shared by Client and AsyncClient.

    A subclass opens channels (``_open_channel``), carries plans out (``_run``, blocking or
    awaited) and makes stream sessions (``_open_session``).
    """

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
        """``address``: ``host:port``, ``dns:///name:port`` or a list of ``host:port``.

        ``connections``: most connections for unary calls (default 1). The server runs a few
        calls at once on each (``model_info().max_calls_per_connection``) and the rest wait on
        this side; give more to keep more calls in flight at once. Every stream session has a
        connection of its own.
        """
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
        self._pool = ConnectionPool(self._connect, most=self.connections)

    # -- what a subclass provides

    def _open_channel(self, options: list[tuple[str, Any]]) -> ChannelT:
        raise NotImplementedError

    def _open_session(self, frames: Iterable[ImageInput], options: StreamOptions) -> SessionT:
        """A session of ``frames``, configured by ``_stream_config_plan(options)``."""
        raise NotImplementedError

    # -- connections

    def _connect(self) -> tuple[ChannelT, dict[str, Any]]:
        channel = self._open_channel([*self._channel_options(), OWN_CONNECTION_OPTION])
        return channel, method_callables(channel)

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

    def _closing(self) -> tuple[ChannelT, ...]:
        """Mark the client closed; the channels to close (none when it already was)."""
        if self._closed:
            return ()
        self._closed = True
        return tuple(channel for channel, _ in self._pool.opened)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # -- the plans

    def _model_info_plan(self, refresh: bool, timeout: float | None) -> Plan[ModelInfo]:
        self._check_open()
        if self._model_info is None or refresh:
            reply = yield Call(GET_MODEL_INFO, b"", self._timeout(timeout))
            info = wire.model_info_from_proto(reply)
            if info.warning and not self._warned:
                # Once per client: every command would otherwise say it again.
                self._warned = True
                logger.warning("server at %s: %s", self.address, info.warning)
            self._model_info = info
            self._pool.limit = info.max_calls_per_connection
        return self._model_info

    def _list_streams_plan(self, timeout: float | None) -> Plan[list[StreamView]]:
        self._check_open()
        request = pb.ListStreamsRequest().SerializeToString()
        reply = yield Call(LIST_STREAMS, request, self._timeout(timeout))
        return [wire.stream_view_from_proto(s) for s in reply.streams]

    def _preprocess_plan(self, image: ImageInput) -> Plan[NDArray[np.uint8]]:
        info = yield from self._model_info_plan(False, None)
        return preprocess(image, info.preprocessing, channel_order=self.channel_order)

    def _classify_plan(
        self, x: ImageInput | Sequence[ImageInput], top_k: int, timeout: float | None
    ) -> Plan[Classification | list[Classification]]:
        if is_image_input(x):
            single, images = True, [x]
        else:
            single, images = False, list(x)  # type: ignore[arg-type]
        info = yield from self._model_info_plan(False, None)
        try:
            batch = self._preprocess_all(images, info)  # type: ignore[arg-type]
            results = yield from self._classify_batch_plan(batch, info, top_k, timeout)
        except PreprocessingChangedError:
            # The server was restarted with a model that wants other preprocessing: prepare
            # the images as it says now, once.
            info = yield from self._model_info_plan(True, None)
            batch = self._preprocess_all(images, info)  # type: ignore[arg-type]
            results = yield from self._classify_batch_plan(batch, info, top_k, timeout)
        return results[0] if single else results

    def _classify_preprocessed_plan(
        self, batch: NDArray[np.uint8], top_k: int, timeout: float | None
    ) -> Plan[list[Classification]]:
        info = yield from self._model_info_plan(False, None)
        return (yield from self._classify_batch_plan(batch, info, top_k, timeout))

    def _classify_batch_plan(
        self, batch: NDArray[np.uint8], info: ModelInfo, top_k: int, timeout: float | None
    ) -> Plan[list[Classification]]:
        self._check_open()
        results: list[Classification] = []
        for chunk in self._chunks(batch, info):
            self._check_encoding(info)
            # Stating what the images were prepared for makes a server restarted with another
            # model refuse them (PreprocessingChangedError) instead of classifying them wrongly.
            request = wire.classify_request_bytes(
                chunk, top_k=top_k, preprocessing_id=info.preprocessing_id, encoding=self.encoding
            )
            reply = yield Call(CLASSIFY, request, self._timeout(timeout))
            results.extend(wire.classification_from_proto(r) for r in reply.results)
        return results

    def _stream_config_plan(self, options: StreamOptions) -> Plan[StreamConfig]:
        """What a stream session needs; raises ValueError for bad arguments."""
        self._check_open()
        # Read afresh: a long-lived client may hold an outdated one.
        info = yield from self._model_info_plan(True, None)
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
            encoding=self.encoding,
            **options._asdict(),
        )

    # -- request building

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

    # -- streams

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
    ) -> SessionT:
        """Classify a stream of frames over one ClassifyStream call; returns a session.

        Iterate over the session for a StreamResult per frame, in source order (``async for``
        on an AsyncClient's); read ``session.stats`` for live counters; close it (use
        ``with`` / ``async with``) to stop. See :mod:`framecast_client.streaming` for the
        pipeline and the policies. A Client's session is running when returned; an
        AsyncClient's starts on ``async with`` or on the first ``async for`` step (fetching the
        server's model info then, which may raise RpcError).

        Args:
            frames: Any iterable of images (paths, encoded bytes, PIL images, uint8 numpy
                frames in the client's channel_order), e.g. a source of
                :mod:`framecast_client.sources`. It is read on a thread of the session (a
                plain iterable for an AsyncClient too); frames must not be modified after they
                are yielded.
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
                top``), e.g. ``"dock-3"``; printable ASCII, cut to 64 characters. Never a
                metrics label.
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
        options = StreamOptions(
            top_k, max_in_flight, mode, reconnect, backoff, keepalive_s, name, max_age, follow_hints
        )
        return self._open_session(frames, options)
