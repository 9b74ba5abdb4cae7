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

from .auth import AuthInterceptor, TokenStore
from .metrics import Metrics, MetricsInterceptor, MetricsServer
from .metrics.exporter import PUBLISH_INTERVAL_S
from .recorder import NULL_RECORDER, Recorder
from .settings import ServerSettings
from .tls import CertificateReloader, server_credentials

logger = logging.getLogger(__name__)


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
    _metrics_server: MetricsServer | None = None
    _publisher: asyncio.Task[None] | None = None

    @classmethod
    def for_settings(cls, settings: ServerSettings, *, shared_metrics: bool = False) -> Wiring:
        """Build the interceptors (metrics first, so refused calls are counted too, then auth).

        ``shared_metrics``: a worker of ``--workers``; its metrics go to the supervisor's
        directory (metrics/multiprocess.py), which serves /metrics for all of them.
        Raises TokenFileError (a ValueError) when the token file cannot be used.
        """
        wiring = cls(settings)
        if settings.metrics_port is not None:
            wiring.metrics = Metrics(max_batch=settings.max_batch, shared=shared_metrics)
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
                # Credentials of their own per server (gRPC does not share them); each reloads
                # the files when they change.
                credentials, reloader = server_credentials(settings.tls)
                self.tls_reloader = self.tls_reloader or reloader
                bound = server.add_secure_port(address, credentials)
            if bound == 0 or (port and bound != port):
                return 0
            port = bound
            address = address.rpartition(":")[0] + f":{port}"  # the others share it
        return port

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
        return f"{transport}, {tokens}{metrics}"
