"""Helpers shared by tests (importable thanks to pytest's pythonpath = tests)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from framecast_server.backends.base import BackendError, BackendInfo
from framecast_server.backends.null import NullBackend
from framecast_server.settings import ServerSettings
from numpy.typing import NDArray

INPUT_SIZE = 224
HOLD_TIMEOUT_S = 60.0  # how long a held backend waits for its test to release it


def make_settings(cache_dir: Path, **overrides: Any) -> ServerSettings:
    """Settings for an in-process test server: port 0, offline, small batches."""
    values: dict[str, Any] = {
        "port": 0,
        "backend": "onnxruntime",
        "allow_download": False,
        "cache_dir": cache_dir,
        "max_batch": 8,
        "threads": 2,
    }
    values.update(overrides)
    return ServerSettings(**values)


def random_frames(count: int, *, seed: int = 0, size: int = INPUT_SIZE) -> NDArray[np.uint8]:
    """Preprocessed-size uint8 RGB frames, different from each other."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


class GatedBackend:
    """A backend that holds each batch until ``release`` is set: makes "in flight" observable.

    It records the first pixel value of every image it ran in ``seen``, so a test can tell
    which requests reached it and which were dropped before compute.
    """

    def __init__(self, max_batch: int = 8) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[int] = []
        self._max_batch = max_batch

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("gated", "fp32", "cpu")

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.seen.extend(int(v) for v in images[:, 0, 0, 0])
        self.entered.set()
        if not self.release.wait(30):
            raise RuntimeError("never released")
        return np.full((len(images), 1000), 1e-3, dtype=np.float32)

    def close(self) -> None:
        self.release.set()


class HoldableNullBackend:
    """A NullBackend whose infer() can be held: hold() makes the next calls block until release().

    ``entered`` is set when a call is blocked, so a test knows a frame is stuck in the server.
    ``fail_key`` makes images with that key fail, as a broken backend would.
    """

    def __init__(self, fail_key: int | None = None) -> None:
        self._inner = NullBackend(max_batch=32)
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()
        self._fail_key = fail_key

    @property
    def info(self) -> BackendInfo:
        return self._inner.info

    @property
    def max_batch(self) -> int:
        return self._inner.max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        if not self._open.is_set():
            self.entered.set()
            if not self._open.wait(HOLD_TIMEOUT_S):
                raise BackendError("the test never released the gate")
        if self._fail_key is not None and self._fail_key in images[:, 0, 0, 0]:
            raise BackendError(f"cannot classify key {self._fail_key}")
        return self._inner.infer(images)

    def close(self) -> None:
        self._inner.close()


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._entry])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def write_tokens(path: Path, *names: str) -> Path:
    """A token file giving each name the token ``<name>-secret``."""
    path.write_text("".join(f"{name}:{name}-secret\n" for name in names))
    return path


class RawClassifier:
    """framecast.v1.Classifier over a real channel with no serializers: bytes in, bytes out.

    What a test needs to send bytes that are not a valid message.
    """

    def __init__(
        self, address: str, *, own_connection: bool = False, token: str | None = None
    ) -> None:
        # Channels with equal settings in one process share a connection unless each keeps
        # its own. ``token``: sent on every call (the server knows the caller by its name).
        options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        self.channel = grpc.insecure_channel(address, options=options)
        if token is not None:
            self.channel = grpc.intercept_channel(self.channel, _Bearer(token))
        # grpc-stubs wants serializers; without them the channel passes bytes through.
        self.get_model_info = self.channel.unary_unary(  # type: ignore[call-arg]
            "/framecast.v1.Classifier/GetModelInfo"
        )
        self.classify = self.channel.unary_unary(  # type: ignore[call-arg]
            "/framecast.v1.Classifier/Classify"
        )
        self.stream = self.channel.stream_stream(  # type: ignore[call-arg]
            "/framecast.v1.Classifier/ClassifyStream"
        )

    def status(self, method: str, raw: bytes, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
        """Call a unary ``method`` ("classify", "get_model_info") with ``raw``: its status."""
        try:
            getattr(self, method)(raw, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""

    def close(self) -> None:
        self.channel.close()
