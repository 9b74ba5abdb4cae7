"""What a server's security and metrics settings add to it: interceptors, the bound port, /metrics.

Kept out of app.py so that the app reads as the lifecycle (start, load, stop) and this module
as the one place that turns ``--tls-*``, ``--auth-*`` and ``--metrics-port`` into gRPC objects.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from ..core.recorder import NULL_RECORDER, Recorder
from ..metrics import Metrics, MetricsInterceptor, MetricsServer
from ..metrics.exporter import PUBLISH_INTERVAL_S
from ..security.auth import AuthInterceptor, TokenStore
from ..security.tls import CertificateReloader, server_credentials
from ..settings import HANDSHAKE_TIMEOUT_S, ServerSettings

logger = logging.getLogger(__name__)


# Connections to the health-only port: probes open one, ask, and close it.
HEALTH_PORT_MAX_CONNECTIONS = 64


def connection_age_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """gRPC options for ``--max-connection-age`` (none when it is off)."""
    if settings.max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000)),
    ]


def check_files(settings: ServerSettings) -> None:
    """Read and check the TLS and token files now; ValueError says what is wrong."""
    if settings.auth_tokens is not None:
        TokenStore(settings.auth_tokens)
    if settings.tls is not None:
        CertificateReloader(settings.tls).load()


@dataclass
class Wiring:
    """The interceptors, recorder and metrics endpoint that a server's settings ask for."""

    settings: ServerSettings
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = field(default_factory=list)
    metrics: Metrics | None = None
    tls_reloader: CertificateReloader | None = None
    metrics_port: int | None = None
    health_port: int | None = None
    _health_server: grpc.aio.Server | None = None
    _metrics_server: MetricsServer | None = None
    _publisher: asyncio.Task[None] | None = None

    @classmethod
    def for_settings(
        cls,
        settings: ServerSettings,
        *,
        shared_metrics: bool = False,
        host_wide_batcher: bool = False,
    ) -> Wiring:
        """Build the interceptors (metrics first, so refused calls are counted too, then auth).

        ``shared_metrics``: a worker of ``--workers``; its metrics go to the supervisor's
        directory (metrics/multiprocess.py), which serves /metrics for all of them.
        Raises TokenFileError (a ValueError) when the token file cannot be used.
        """
        wiring = cls(settings)
        if settings.metrics_port is not None:
            wiring.metrics = Metrics(
                max_batch=settings.max_batch,
                shared=shared_metrics,
                host_wide_batcher=host_wide_batcher,
            )
            wiring.interceptors.append(MetricsInterceptor(wiring.metrics))
        mutual_tls = settings.tls is not None and settings.tls.client_ca is not None
        if settings.auth_tokens is not None or mutual_tls:
            tokens = TokenStore(settings.auth_tokens) if settings.auth_tokens else None
            metrics = wiring.metrics
            wiring.interceptors.append(
                AuthInterceptor(
                    tokens,
                    mutual_tls=mutual_tls,
                    protect_health=settings.auth_health,
                    on_failure=metrics.auth_failed if metrics is not None else None,
                )
            )
        return wiring

    @property
    def recorder(self) -> Recorder:
        """What the core records into: the metrics, or nothing."""
        return self.metrics if self.metrics is not None else NULL_RECORDER

    def add_port(self, servers: list[grpc.aio.Server]) -> int:
        """Bind the gRPC port on each server (one port, shared), with TLS when configured.

        Returns the port, or 0 when it could not be bound.
        """
        settings = self.settings
        address, port = settings.address, 0
        for server in servers:
            if settings.tls is None:
                bound = server.add_insecure_port(address)
            else:
                # Credentials of their own per server (gRPC does not share them), fed by one
                # reloader: each server takes the new files when they change.
                self.tls_reloader = self.tls_reloader or CertificateReloader(settings.tls)
                bound = server.add_secure_port(address, server_credentials(self.tls_reloader))
            if bound == 0 or (port and bound != port):
                return 0
            port = bound
            address = address.rpartition(":")[0] + f":{port}"  # the others share it
        return port

    async def start_health_port(self, health: Any, *, reuse_port: bool = False) -> None:
        """With ``--health-port``: a plaintext server with ``health`` (grpc.health.v1) only.

        Plaintext and without tokens on purpose: Kubernetes' native gRPC probes speak neither
        TLS nor tokens. It tells no more than whether this replica serves; every other method
        there is UNIMPLEMENTED. ``health`` is the main port's servicer, so both say the same.
        """
        settings = self.settings
        if settings.health_port is None:
            return
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_allowed_incoming_connections", HEALTH_PORT_MAX_CONNECTIONS),
                ("grpc.max_concurrent_streams", 4),
                ("grpc.max_receive_message_length", 4096),
                ("grpc.max_connection_idle_ms", round(settings.idle_timeout_s * 1000)),
                ("grpc.server_handshake_timeout_ms", round(HANDSHAKE_TIMEOUT_S * 1000)),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        port = server.add_insecure_port(f"{host}:{settings.health_port}")
        if port == 0:
            raise OSError(f"could not bind the health port {host}:{settings.health_port}")
        await server.start()
        self._health_server, self.health_port = server, port

    async def stop_health_port(self) -> None:
        """Stop the health-only port (last: probes see NOT_SERVING throughout the drain)."""
        if self._health_server is not None:
            await self._health_server.stop(None)
            self._health_server = None

    async def start_metrics(self) -> None:
        """Serve /metrics on the gRPC port's host (loopback unless told otherwise), if asked."""
        if self.metrics is None or self.settings.metrics_port is None:
            return
        if self.metrics.shared is not None:
            self._publisher = asyncio.ensure_future(self._publish(self.metrics))
            return
        self._metrics_server = MetricsServer(
            self.metrics.registry, self.settings.host, self.settings.metrics_port
        )
        self.metrics_port = await asyncio.to_thread(self._metrics_server.start)

    async def stop_metrics(self) -> None:
        """Stop serving /metrics (a worker: publish a last time)."""
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
            self._publisher = None
            if self.metrics is not None:
                self.metrics.publish()
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.stop)
            self._metrics_server = None

    @staticmethod
    async def _publish(metrics: Metrics) -> None:
        while True:
            metrics.publish()
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    def describe(self) -> str:
        """A few words for the start-up log: transport, tokens, metrics port."""
        settings = self.settings
        if settings.tls is None:
            transport = "plaintext"
        elif settings.tls.client_ca is None:
            transport = "TLS"
        else:
            transport = "mutual TLS"
        tokens = "tokens required" if settings.auth_tokens else "no tokens"
        metrics = f", metrics on port {self.metrics_port}" if self.metrics_port is not None else ""
        if self.health_port is not None:
            metrics += f", health only (plaintext) on port {self.health_port}"
        if settings.max_connection_age_s > 0:
            metrics += f", connections end after {settings.max_connection_age_s:g} s"
        return f"{transport}, {tokens}{metrics}"
