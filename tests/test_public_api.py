"""The SDK's public surface is small and deliberate: changing it should be a visible decision."""

from __future__ import annotations

import framecast_client


def test_exported_names() -> None:
    # Sorted as ruff's RUF022 does (isort style): all-caps names first.
    assert framecast_client.__all__ == [
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
    for name in framecast_client.__all__:
        assert getattr(framecast_client, name).__module__.startswith("framecast_client")
