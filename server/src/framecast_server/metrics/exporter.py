"""Every metric Framecast exports, named in one place, and the Recorder that fills them.

Conventions (Prometheus'): the ``framecast_`` prefix, base units (seconds, bytes), ``_total``
for counters, histograms rather than summaries (they aggregate across replicas). Labels are
bounded: method names come from the registered services only, codes from gRPC's list, reasons
from a fixed set, callers from the operator's token file or CA. Never a frame id or a string a
client chose.

What the batcher already counts (queue depth, drops by reason, backend failures) is read from
its ``stats`` at scrape time rather than recorded as it happens: free on the serving path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..backends.base import BackendInfo
from ..core.batcher import BatcherStats
from ..model import PreparedModel
from .nvml import register_gpu_metrics

# Request latency and queue/compute time: 100 us to 10 s, about 2.5x apart (a CPU backend's
# batch takes tens of ms, a GPU's a few ms, a queued frame anything up to the deadline).
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Status codes that mean "the caller's input was wrong" (counted as failures by reason invalid).
INVALID_CODES = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION"})
UNKNOWN_METHOD = "unknown"
MODEL_LABELS = ("model", "version", "backend", "precision", "device", "pretrained")


def _batch_buckets(max_batch: int) -> tuple[float, ...]:
    buckets = [1.0]
    while buckets[-1] < max_batch:
        buckets.append(min(buckets[-1] * 2, float(max_batch)))
    return tuple(buckets)


FAILURES_HELP = (
    "Images that got no result, by reason: queue_full (refused at admission: the queue "
    "or the memory budget was full), "
    "deadline (expired before compute), cancelled (caller left while queued), "
    "backend (inference failed), invalid (malformed or for another preprocessing)"
)
QUEUE_HELP = "Images waiting in the batcher's queue now"
ADMITTED_HELP = "Bytes of images admitted now, waiting or computing (what the memory budget counts)"
CONNECTIONS_HELP = "Client connections (peer addresses) with at least one call open now"
AUTH_FAILURES_HELP = "Calls refused before any servicer ran: a missing or an invalid token"


class _ServingCollector(Collector):
    """Figures read at scrape time: the batcher's counters and queue, auth refusals."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        failures = CounterMetricFamily("framecast_failures", FAILURES_HELP, labels=["reason"])
        queue = GaugeMetricFamily("framecast_queue_images", QUEUE_HELP)
        admitted = GaugeMetricFamily("framecast_admitted_bytes", ADMITTED_HELP)
        stats = metrics.batcher_stats() if metrics.batcher_stats is not None else None
        if stats is not None:
            failures.add_metric(["queue_full"], stats.rejected_full)
            failures.add_metric(["deadline"], stats.dropped_expired)
            failures.add_metric(["cancelled"], stats.dropped_cancelled)
            failures.add_metric(["backend"], stats.failed_images)
            queue.add_metric([], stats.queued)
            admitted.add_metric([], stats.admitted_bytes)
        failures.add_metric(["invalid"], metrics.invalid_frames)
        yield failures
        yield queue
        yield admitted
        yield GaugeMetricFamily(
            "framecast_connections_active", CONNECTIONS_HELP, value=len(metrics.open_calls_by_peer)
        )
        auth = CounterMetricFamily("framecast_auth_failures", AUTH_FAILURES_HELP, labels=["reason"])
        for reason in ("missing", "invalid"):
            auth.add_metric([reason], metrics.auth_failures.get(reason, 0))
        yield auth


# How stale a worker's batcher figures (failures but invalid, queue, admitted bytes) may be.
PUBLISH_INTERVAL_S = 0.5
_BATCHER_REASONS = ("queue_full", "deadline", "cancelled", "backend")


def _batcher_failures(stats: BatcherStats) -> tuple[int, ...]:
    return (
        stats.rejected_full,
        stats.dropped_expired,
        stats.dropped_cancelled,
        stats.failed_images,
    )


class WorkerFigures:
    """A ``--workers`` worker's scrape-time figures as metrics its files hold (multiprocess.py:
    a worker cannot be asked at scrape time, so it publishes them every PUBLISH_INTERVAL_S)."""

    def __init__(self, registry: CollectorRegistry, *, host_wide: bool = False) -> None:
        # The single server's _ServingCollector, as metrics a worker's files can hold; gauges
        # are summed over the live workers. ``host_wide``: a front end of --inference shared,
        # whose queue and admitted bytes are the one batcher's, the same in every front end:
        # reported once (the largest), not summed.
        r = registry
        self.failures = Counter("framecast_failures", FAILURES_HELP, ["reason"], registry=r)
        self.auth_failures = Counter(
            "framecast_auth_failures", AUTH_FAILURES_HELP, ["reason"], registry=r
        )
        live: Final = "livesum"
        batcher: Final = "livemax" if host_wide else "livesum"
        self.queue = Gauge(
            "framecast_queue_images", QUEUE_HELP, registry=r, multiprocess_mode=batcher
        )
        self.admitted = Gauge(
            "framecast_admitted_bytes", ADMITTED_HELP, registry=r, multiprocess_mode=batcher
        )
        self.connections = Gauge(
            "framecast_connections_active", CONNECTIONS_HELP, registry=r, multiprocess_mode=live
        )
        for reason in (*_BATCHER_REASONS, "invalid"):
            self.failures.labels(reason)  # present at zero, as in a single server
        for reason in ("missing", "invalid"):
            self.auth_failures.labels(reason)
        self._published = (0,) * len(_BATCHER_REASONS)

    def publish(self, stats: BatcherStats) -> None:
        """Copy the batcher's figures into the files: counters grow by what is new."""
        now = _batcher_failures(stats)
        for reason, before, after in zip(_BATCHER_REASONS, self._published, now, strict=True):
            if after > before:
                self.failures.labels(reason).inc(after - before)
        self._published = now
        self.queue.set(stats.queued)
        self.admitted.set(stats.admitted_bytes)


class Metrics:
    """The app's metrics: a registry, the Recorder the core calls, and the metric objects.

    Everything runs on the server's event loop except scrapes, which only read.

    ``shared``: a worker of ``--workers`` (multiprocess.py): the metrics go to the supervisor's
    directory, gauges say how processes combine, and the scrape-time figures are published.
    """

    def __init__(
        self,
        *,
        max_batch: int = 32,
        gpu: bool = True,
        shared: bool = False,
        host_wide_batcher: bool = False,
    ) -> None:
        """``host_wide_batcher``: a front end of --inference shared (see WorkerFigures)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared = WorkerFigures(self.registry, host_wide=host_wide_batcher) if shared else None
        r = self.registry
        self.requests = Counter(
            "framecast_requests",
            "gRPC calls finished, by method and status code (a stream counts once)",
            ["method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "framecast_request_duration_seconds",
            "Duration of unary calls as the server saw them, by method",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.active_streams = Gauge(
            "framecast_active_streams",
            "Streaming calls open now, by method",
            ["method"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.caller_requests = Counter(
            "framecast_caller_requests",
            "Authenticated calls by caller (a token's name or a client certificate's subject)",
            ["caller"],
            registry=r,
        )
        self.frames = Counter(
            "framecast_frames",
            "Images answered, by method and status code (each stream frame on its own)",
            ["method", "code"],
            registry=r,
        )
        self.queue_duration = Histogram(
            "framecast_queue_duration_seconds",
            "Time each image waited in the batcher's queue before its batch started",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute_duration = Histogram(
            "framecast_compute_duration_seconds",
            "Time of one backend inference call (one batch)",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.frame_ages = Histogram(
            "framecast_frame_age_seconds",
            "Age of each stream frame (client capture-to-send plus server time) when it was "
            "admitted and when its batch started computing",
            ["at"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stream_drops = Counter(
            "framecast_stream_frames_dropped",
            "Stream frames dropped unanswered before compute, by reason",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "framecast_batch_size",
            "Images per batch run by the backend",
            buckets=_batch_buckets(max_batch),
            registry=r,
        )
        model_help = "The model served and the backend serving it"
        if self.shared is None:
            self.model: Info | Gauge = Info("framecast_model", model_help, registry=r)
            ProcessCollector(registry=r)
            self.gpu = register_gpu_metrics(r) if gpu else False
        else:
            # Info has no multiprocess form: the same sample as a gauge at 1, per live worker
            # max'ed into one series. Process and GPU metrics come from the supervisor.
            self.model = Gauge(
                "framecast_model_info",
                model_help,
                MODEL_LABELS,
                registry=r,
                multiprocess_mode="livemax",
            )
            self.gpu = False
        # Read at scrape time (see _ServingCollector); set once the model is loaded.
        self.batcher_stats: Callable[[], BatcherStats] | None = None
        self.invalid_frames = 0
        self.auth_failures: dict[str, int] = {}
        # Calls open per peer address (ip:port, one per connection); never a label, only counted.
        self.open_calls_by_peer: dict[str, int] = {}
        if self.shared is None:
            r.register(_ServingCollector(self))
        # Label children are looked up once per (method, code): a frame pays a dict lookup.
        self._frame_counters: dict[tuple[str, str], Counter] = {}
        self._observe_queue = self.queue_duration.observe
        self._observe_compute = self.compute_duration.observe
        self._observe_batch = self.batch_size.observe
        self._observe_age_admission = self.frame_ages.labels("admission").observe
        self._observe_age_compute = self.frame_ages.labels("compute").observe

    def serving(
        self, stats: Callable[[], BatcherStats], model: PreparedModel, backend: BackendInfo
    ) -> None:
        """The model is loaded: describe it and read the batcher's counters from now on."""
        self.batcher_stats = stats
        labels = dict(
            zip(
                MODEL_LABELS,
                (model.name, model.version, backend.name, backend.precision, backend.device,
                 str(model.pretrained).lower()),
                strict=True,
            )
        )  # fmt: skip
        if isinstance(self.model, Info):
            self.model.info(labels)
        else:
            self.model.labels(**labels).set(1)

    def publish(self) -> None:
        """A worker: copy the batcher's figures into the shared files (multiprocess.py)."""
        if self.shared is not None and self.batcher_stats is not None:
            self.shared.publish(self.batcher_stats())

    # The Recorder interface (framecast_server.core.recorder), called by the core and servicers.

    def batch_done(self, size: int, compute_ns: int, queue_ns: Sequence[int]) -> None:
        """One batch ran: its size, its backend time and each image's queue time."""
        self._observe_batch(size)
        self._observe_compute(compute_ns / 1e9)
        observe = self._observe_queue
        for wait in queue_ns:
            observe(wait / 1e9)

    def frames_answered(self, method: str, code: str, n: int) -> None:
        """``n`` images of ``method`` answered with ``code``."""
        key = (method, code)
        counter = self._frame_counters.get(key)
        if counter is None:
            counter = self._frame_counters[key] = self.frames.labels(method, code)
        counter.inc(n)
        if code in INVALID_CODES:
            self.invalid_frames += n
            if self.shared is not None:
                self.shared.failures.labels("invalid").inc(n)

    def frame_age(self, at_admission_us: int, at_compute_us: int | None) -> None:
        """A stream frame's ages at admission and at compute (None: it never computed)."""
        self._observe_age_admission(at_admission_us / 1e6)
        if at_compute_us is not None:
            self._observe_age_compute(at_compute_us / 1e6)

    def frames_dropped(self, reason: str, n: int) -> None:
        """``n`` stream frames dropped for ``reason`` (a fixed, small set)."""
        self.stream_drops.labels(reason).inc(n)

    # Told by the interceptors.

    def call_opened(self, peer: str) -> None:
        """A call from ``peer`` (its connection's address) started."""
        self.open_calls_by_peer[peer] = self.open_calls_by_peer.get(peer, 0) + 1
        if self.shared is not None:
            self.shared.connections.set(len(self.open_calls_by_peer))

    def call_closed(self, peer: str) -> None:
        """A call from ``peer`` ended."""
        left = self.open_calls_by_peer.get(peer, 0) - 1
        if left > 0:
            self.open_calls_by_peer[peer] = left
        else:
            self.open_calls_by_peer.pop(peer, None)
        if self.shared is not None:
            self.shared.connections.set(len(self.open_calls_by_peer))

    def auth_failed(self, reason: str) -> None:
        """A call was refused for a ``reason`` token ("missing" or "invalid")."""
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1
        if self.shared is not None:
            self.shared.auth_failures.labels(reason).inc()
