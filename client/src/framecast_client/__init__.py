"""Framecast edge client: preprocess images on the device, classify them on a Framecast server."""

from .client import AsyncClient, Client
from .errors import (
    DeadlineExceededError,
    FramecastError,
    InvalidArgumentError,
    InvalidImageError,
    ResourceExhaustedError,
    RpcError,
    ServerError,
    UnavailableError,
)
from .preprocess import PreprocessSpec, preprocess
from .types import Classification, ModelInfo, Prediction, ServerTiming

__all__ = [
    "AsyncClient",
    "Classification",
    "Client",
    "DeadlineExceededError",
    "FramecastError",
    "InvalidArgumentError",
    "InvalidImageError",
    "ModelInfo",
    "Prediction",
    "PreprocessSpec",
    "ResourceExhaustedError",
    "RpcError",
    "ServerError",
    "ServerTiming",
    "UnavailableError",
    "preprocess",
]
