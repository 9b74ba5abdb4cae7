"""Server settings: one value object, mapped one to one onto `framecast serve`'s flags."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from .backends.base import Backend
from .backends.factory import BackendName, create_backend
from .backends.tensorrt.settings import EngineSettings
from .model import ModelSource

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
# Preprocessed 224x224 RGB uint8 frame.
FRAME_BYTES = 224 * 224 * 3
MIB = 1024 * 1024
# A connection must finish its TLS/HTTP2 handshake within this long, so silent sockets do not
# hold descriptors (gRPC's default is 120 s).
HANDSHAKE_TIMEOUT_S = 10.0
# HTTP/2 flow-control window of one stream: bytes a client may send before the server reads.
STREAM_WINDOW_BYTES = 1 * MIB


def default_cache_dir() -> Path:
    """$FRAMECAST_CACHE_DIR, else ./engines when it exists (a checkout), else ~/.cache."""
    env = os.environ.get("FRAMECAST_CACHE_DIR")
    if env:
        return Path(env)
    local = Path("engines")
    if local.is_dir():
        return local.resolve()
    return Path.home() / ".cache" / "framecast" / "engines"


class PlaintextRefusedError(ValueError):
    """Plaintext on a non-loopback address, without TLS or ``insecure``."""


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the port on this machine (``localhost``, 127/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTLS:
    """The server's certificate and key (PEM files), re-read when they change on disk.

    ``client_ca``, when given, turns on mutual TLS: every client must present a certificate
    signed by one of these CAs, and its subject becomes the caller's identity.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """Everything `framecast serve` takes."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: ModelSource = field(default_factory=ModelSource)
    backend: BackendName = "auto"
    max_batch: int = 32
    max_delay_us: int = 0
    max_queue: int = 512
    threads: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    allow_download: bool = True
    # Limits under load; the README's "Limits and behaviour under load" lists each one.
    memory_budget_bytes: int = 256 * MIB  # images admitted, waiting or computing
    max_connections: int = 1000
    # HTTP/2 concurrent calls on one connection (streams included): enough that a client's
    # long streams leave room for its unary calls on the same connection, and that
    # perf_analyzer and tritonclient work unchanged. Fairness no longer rests on it: see
    # max_unary_calls.
    max_streams_per_connection: int = 8
    # Unary calls admitted at once, server-wide; the others wait at the door, per caller in
    # turn (admission.py), unread and unanswered, so a flood over many connections is held on
    # its own side instead of queueing in gRPC and the event loop ahead of other callers. One
    # place more is kept for a caller holding none (a newcomer beside a flood).
    max_unary_calls: int = 8
    idle_timeout_s: float = 60.0  # a connection with no call for this long is closed
    # Shutdown: health says NOT_SERVING this long before calls are refused (load balancers
    # take the replica out meanwhile), then calls in flight get at most grace_s to finish.
    drain_delay_s: float = 0.0
    grace_s: float = 10.0
    tls: ServerTLS | None = None
    # One token per line, or name:token; re-read when the file changes. None: no tokens.
    auth_tokens: Path | None = None
    auth_health: bool = False  # tokens for grpc.health.v1 too (probes then need one)
    insecure: bool = False  # allow plaintext on a non-loopback address
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None: off, 0: any port
    # A second, plaintext listener that serves grpc.health.v1 only (the same health state), for
    # probes that cannot speak TLS or send tokens (Kubernetes' native gRPC probes). None: off.
    health_port: int | None = None
    # End each connection after this long (gRPC sends GOAWAY, jittered by +-10%), so clients
    # re-resolve DNS and spread onto replicas added since; calls on it get the grace to finish,
    # then it is closed (the SDK reconnects and resends). 0: never (gRPC's default: one host
    # gains nothing from it; the Kubernetes manifests set it).
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 10.0
    # How TensorRT builds its engine: the same settings as `framecast build-engine`, so the
    # server finds the engine built there. None: EngineSettings' defaults for max_batch.
    engine: EngineSettings | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise ValueError(f"max batch must be at least 1, got {self.max_batch}")
        if self.max_delay_us < 0:
            raise ValueError(f"max delay must not be negative, got {self.max_delay_us}")
        if self.max_queue < self.max_batch:
            raise ValueError(
                f"max queue ({self.max_queue}) must hold at least one max batch ({self.max_batch})"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.memory_budget_bytes < self.max_batch * FRAME_BYTES:
            raise ValueError(
                f"memory budget ({self.memory_budget_bytes / MIB:.1f} MiB) must hold at least "
                f"one max batch of frames ({self.max_batch * FRAME_BYTES / MIB:.1f} MiB)"
            )
        for name in ("max_connections", "max_streams_per_connection", "max_unary_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1")
        for name in ("idle_timeout_s", "grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.removesuffix('_s').replace('_', ' ')} must be positive")
        if self.drain_delay_s < 0:
            raise ValueError(f"drain delay must not be negative, got {self.drain_delay_s}")
        if self.engine is not None and self.engine.max_batch != self.max_batch:
            raise ValueError(
                f"engine max batch ({self.engine.max_batch}) must equal max batch "
                f"({self.max_batch})"
            )
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {self.metrics_port}")
        if self.health_port is not None:
            if not 0 <= self.health_port <= 65535:
                raise ValueError(f"health port must be in 0..65535, got {self.health_port}")
            if self.health_port != 0 and self.health_port == self.port:
                raise ValueError(f"health port must differ from the port ({self.port})")
        for name in ("max_connection_age_s", "max_connection_age_grace_s"):
            if getattr(self, name) < 0:
                what = name.removesuffix("_s").replace("_", " ")
                raise ValueError(f"{what} must not be negative, got {getattr(self, name)}")
        if self.tls is None and not self.insecure and not is_loopback_host(self.host):
            raise PlaintextRefusedError(
                f"refusing to serve plaintext on {self.host}: anyone on the network could read "
                "the frames and results. Give --tls-cert and --tls-key, or --insecure to serve "
                "plaintext on a network you trust (e.g. behind a TLS-terminating proxy)"
            )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def engine_settings(self) -> EngineSettings:
        """The TensorRT engine's build settings (defaults for ``max_batch`` unless given)."""
        return EngineSettings(max_batch=self.max_batch) if self.engine is None else self.engine

    def create_backend(self, onnx_path: Path) -> Backend:
        """The backend these settings name, for the prepared model at ``onnx_path``."""
        return create_backend(
            self.backend,
            onnx_path,
            max_batch=self.max_batch,
            threads=self.threads,
            cache_dir=self.cache_dir,
            engine=self.engine_settings(),
        )

    @property
    def max_message_bytes(self) -> int:
        """Largest request accepted: a full batch of frames plus room for framing."""
        return self.max_batch * FRAME_BYTES + 1024 * 1024
