"""Prometheus metrics: one registry owned by the app, fed by the core's Recorder interface.

``exporter`` names every metric and implements :class:`~framecast_server.core.recorder.Recorder`;
``interceptor`` counts calls for any gRPC service; ``nvml`` adds GPU figures where pynvml is
installed; ``http`` serves the text format.
"""

from .exporter import Metrics
from .http import MetricsServer
from .interceptor import MetricsInterceptor

__all__ = ["Metrics", "MetricsInterceptor", "MetricsServer"]
