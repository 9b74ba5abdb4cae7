"""The HTTP endpoint Prometheus scrapes: prometheus_client's own server on a daemon thread."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


class MetricsServer:
    """Serves a registry in Prometheus' text format at ``http://host:port/metrics``."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after start; useful with port 0)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_port)

    def start(self) -> int:
        """Bind and serve; returns the bound port. OSError when the port cannot be bound."""
        self._server, self._thread = start_http_server(
            self._port, addr=self._host, registry=self._registry
        )
        logger.info("metrics on http://%s:%d/metrics", self._host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
