"""Metrics across ``--workers``: prometheus_client's multiprocess mode, both of its halves.

Each worker writes its counters, histograms and gauges to memory-mapped files in one directory
(``PROMETHEUS_MULTIPROC_DIR``, which the supervisor sets before it spawns them, so
prometheus_client picks its file-backed values when a worker imports it). The supervisor serves
the one /metrics endpoint: a ``MultiProcessCollector`` sums the files of every worker, live or
dead, so a restarted worker's counts are not lost; when a worker ends, ``mark_process_dead``
removes its live gauges (queue, streams, connections), which would otherwise stay forever.

A worker cannot be asked anything at scrape time, so what a single server reads from the batcher
when scraped (failures by reason, queue depth, admitted bytes) a worker copies into its files
every ``PUBLISH_INTERVAL_S`` (exporter.py's ``WorkerFigures``). Process metrics (CPU, memory, file
descriptors) come from the supervisor, for itself and for every live worker, labelled
``process``; GPU metrics too, once for the host.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from .http import MetricsServer
from .nvml import register_gpu_metrics

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _WorkerProcesses(Collector):
    """process_* metrics of the supervisor and of each live worker, labelled ``process``."""

    def __init__(self, workers: Callable[[], dict[str, int]]) -> None:
        self._workers = workers

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        processes = {"supervisor": os.getpid(), **self._workers()}
        for label, pid in processes.items():
            collector = ProcessCollector(pid=functools.partial(int, pid), registry=None)
            for family in collector.collect():  # nothing for a process that just ended
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                merged.samples += [
                    Sample(s.name, {**s.labels, "process": label}, s.value) for s in family.samples
                ]
        yield from families.values()


def supervisor_registry(path: str, workers: Callable[[], dict[str, int]]) -> CollectorRegistry:
    """What the supervisor's /metrics serves: every worker's files summed, process and GPU
    metrics. ``workers``: the live workers' pids by label ("worker-0", ...)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(_WorkerProcesses(workers))
    register_gpu_metrics(registry)
    return registry


class SupervisorMetrics:
    """The supervisor's half: a fresh directory for the workers' files, and /metrics over them.

    Made before any worker starts (they read ``PROMETHEUS_MULTIPROC_DIR`` when they import
    prometheus_client); :meth:`close` stops serving, removes the directory and restores the
    environment. A directory set by the caller is not used: stale files would count twice.
    """

    def __init__(self, host: str, port: int) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="framecast-metrics-")
        self.path = self._directory.name
        self._previous = os.environ.get(MULTIPROC_DIR_ENV)
        os.environ[MULTIPROC_DIR_ENV] = self.path
        self._host = host
        self._port = port
        self._server: MetricsServer | None = None

    def start(self, workers: Callable[[], dict[str, int]]) -> int:
        """Serve /metrics; returns the bound port. OSError when it cannot be bound.

        ``workers``: the live workers' pids by label ("worker-0", ...), for process metrics.
        """
        self._server = MetricsServer(
            supervisor_registry(self.path, workers), self._host, self._port
        )
        return self._server.start()

    def worker_ended(self, pid: int) -> None:
        """Drop a dead worker's live gauges; its counters and histograms stay counted."""
        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Stop serving, restore the environment, remove the directory."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._previous is None:
            os.environ.pop(MULTIPROC_DIR_ENV, None)
        else:
            os.environ[MULTIPROC_DIR_ENV] = self._previous
        self._directory.cleanup()
