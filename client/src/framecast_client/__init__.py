"""Framecast edge client: preprocess images on the device, classify them on a Framecast server."""

from .client import AsyncClient, Client
from .errors import (
    DeadlineExceededError,
    FramecastError,
    InvalidArgumentError,
    InvalidImageError,
    PermissionDeniedError,
    PreprocessingChangedError,
    ResourceExhaustedError,
    RpcError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from .preprocess import PreprocessSpec, preprocess
from .security import TLS
from .sources import SourceError, open_source
from .streaming import (
    AsyncStreamSession,
    Backoff,
    FrameError,
    LatencySummary,
    StreamResult,
    StreamSession,
    StreamStats,
)
from .types import Classification, ModelInfo, Prediction, ServerTiming

__all__ = [
    "TLS",
    "AsyncClient",
    "AsyncStreamSession",
    "Backoff",
    "Classification",
    "Client",
    "DeadlineExceededError",
    "FrameError",
    "FramecastError",
    "InvalidArgumentError",
    "InvalidImageError",
    "LatencySummary",
    "ModelInfo",
    "PermissionDeniedError",
    "Prediction",
    "PreprocessSpec",
    "PreprocessingChangedError",
    "ResourceExhaustedError",
    "RpcError",
    "ServerError",
    "ServerTiming",
    "SourceError",
    "StreamResult",
    "StreamSession",
    "StreamStats",
    "UnauthenticatedError",
    "UnavailableError",
    "open_source",
    "preprocess",
]
