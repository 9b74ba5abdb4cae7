"""The server process: gRPC wiring, health, reflection, loading, and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client._proto import open_inference_pb2 as oip_pb
from framecast_client._proto import open_inference_pb2_grpc as oip_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .backends.base import Backend
from .backends.factory import create_backend
from .batcher import Batcher, BatcherSettings
from .model import prepare_model
from .runtime import ServingModel
from .service.classifier import ClassifierServicer
from .service.inference_protocol import InferenceServicer
from .service.reflection import reflection_pool
from .settings import ServerSettings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
OIP_SERVICE_NAME = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FramecastServer:
    """One Framecast gRPC server: start() binds and answers health, load() brings the model up.

    Between the two, health says NOT_SERVING and Classifier calls get UNAVAILABLE, so load
    balancers and clients can tell a loading server from a dead one.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        backend_factory: Callable[[Path], Backend] | None = None,
        reuse_port: bool = False,
    ) -> None:
        """backend_factory (prepared ONNX path -> Backend) replaces settings.backend, for tests.

        reuse_port: share the port with other processes on purpose (the workers of
        ``--workers``, see workers.py); otherwise a second server on a taken port fails.
        """
        self.settings = settings
        self._backend_factory = backend_factory
        self.port: int | None = None
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                # Stream clients ping every 10 s by default (keepalive, to notice a dead
                # network); gRPC's default policy answers pings more often than one per 5 min
                # without data with GOAWAY, which would break a paused camera's stream.
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ]
        )
        # grpc-stubs predates grpc_health's asyncio servicer (health.aio, grpcio >= 1.37).
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._classifier = ClassifierServicer(max_message_bytes=settings.max_message_bytes)
        self._serving: ServingModel | None = None
        self._inference = InferenceServicer()
        pb_grpc.add_ClassifierServicer_to_server(self._classifier, self._server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self._inference, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._server,
            pool=reflection_pool(pb.DESCRIPTOR, oip_pb.DESCRIPTOR),
        )

    async def start(self) -> int:
        """Bind and start answering; returns the bound port (useful with port 0).

        Health says NOT_SERVING until load(), or SERVING at once when load() came first.
        """
        if self._serving is None:
            for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
                await self._health.set(service, NOT_SERVING)
        self.port = self._server.add_insecure_port(self.settings.address)
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.address}")
        await self._server.start()
        logger.info(
            "listening on %s:%d%s",
            self.settings.host,
            self.port,
            " (NOT_SERVING until the model is loaded)" if self._serving is None else "",
        )
        return self.port

    async def load(self) -> ServingModel:
        """Prepare the model, create the backend, warm it up, then report SERVING."""
        settings = self.settings
        started = time.monotonic()
        # Building a model or an engine takes seconds to minutes: keep the loop answering health.
        prepared = await asyncio.to_thread(
            prepare_model,
            settings.model,
            settings.cache_dir,
            allow_download=settings.allow_download,
        )
        if self._backend_factory is not None:
            backend = await asyncio.to_thread(self._backend_factory, prepared.onnx_path)
        else:
            backend = await asyncio.to_thread(
                create_backend,
                settings.backend,
                prepared.onnx_path,
                max_batch=settings.max_batch,
                threads=settings.threads,
                cache_dir=settings.cache_dir,
            )
        batcher = Batcher(
            backend,
            BatcherSettings(
                max_batch=settings.max_batch,
                max_delay_us=settings.max_delay_us,
                max_queue=settings.max_queue,
            ),
        )
        await batcher.start()
        try:
            # Warm up through the batcher, so the first batch runs on the thread all later ones
            # use (CUDA contexts and ORT's allocations are per thread).
            size = prepared.preset.input_size
            await batcher.submit(np.zeros((1, size, size, 3), dtype=np.uint8))
        except BaseException:
            await batcher.close()
            backend.close()
            raise
        self._serving = ServingModel(model=prepared, backend=backend, batcher=batcher)
        self._classifier.attach(self._serving)
        self._inference.attach(self._serving)
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            await self._health.set(service, SERVING)
        logger.info(
            "serving %s %s on %s (%s, %s) after %.1f s",
            prepared.name,
            prepared.version,
            backend.info.name,
            backend.info.device,
            backend.info.precision,
            time.monotonic() - started,
        )
        return self._serving

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then let in-flight calls finish within the grace period."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.settings.grace_s if grace is None else grace)
        if self._serving is not None:
            await self._serving.batcher.close()
            self._serving.backend.close()
            self._serving = None
        logger.info("stopped")


def _write_port_file(path: Path, port: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(path)  # readers never see a half-written file


async def serve(settings: ServerSettings, *, port_file: Path | None = None) -> int:
    """Run a server until SIGTERM or SIGINT; returns the process exit code.

    port_file, when given, receives the bound port once the server listens (for --port 0).
    """
    server = FramecastServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    if port_file is not None:
        await asyncio.to_thread(_write_port_file, port_file, port)
    load = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        stopping.cancel()
        await server.stop(0)
        logger.error("could not load the model: %s", load.exception())
        return 1
    await stopping
    logger.info("signal received: finishing in-flight calls (grace %.0f s)", settings.grace_s)
    if not load.done():
        load.cancel()
    await server.stop()
    return 0
