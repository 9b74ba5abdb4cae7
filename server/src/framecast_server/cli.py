"""Server commands of `framecast`: serve, demo, build-engine.

Registered into the client's CLI through the ``framecast.commands`` entry point. This module
imports only the standard library at load time so `framecast --help` stays fast.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import ModelSource
    from .settings import ServerSettings

logger = logging.getLogger(__name__)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (default: timm resnet50.tv2_in1k from the hub)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--onnx", type=Path, metavar="PATH", help="serve this ResNet-50 ONNX")
    source.add_argument(
        "--weights", type=Path, metavar="PATH", help="safetensors with torchvision's names"
    )
    group.add_argument(
        "--preset",
        choices=("torchvision", "caffe"),
        default="torchvision",
        help="preprocessing of an --onnx model (caffe: what Keras ResNet50 uses)",
    )
    group.add_argument(
        "--offline", action="store_true", help="never download; random weights if not cached"
    )
    group.add_argument("--cache-dir", type=Path, help="prepared models and engines (engines/)")


def _add_serving_arguments(parser: argparse.ArgumentParser, *, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=port, help=f"port (default {port}; 0 = any)")
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "tensorrt", "null"),
        default="auto",
        help="auto: TensorRT on an NVIDIA GPU, else ONNX Runtime",
    )
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch (default 32)")
    parser.add_argument(
        "--max-delay-us",
        type=int,
        default=0,
        help="longest wait for a batch to fill, microseconds (default 0: batches form from "
        "what queues while the backend computes)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=512, help="queued images before RESOURCE_EXHAUSTED"
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    _add_limit_arguments(parser)


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults live in ServerSettings (one place); the README's "Limits and behaviour under
    # load" says what a client sees when each is hit.
    group = parser.add_argument_group("limits under load")
    group.add_argument(
        "--memory-budget-mb",
        type=float,
        help="images admitted, waiting or computing, in MiB (default 256); beyond it streams "
        "stop reading and unary calls get RESOURCE_EXHAUSTED",
    )
    group.add_argument("--max-connections", type=int, help="open connections (default 1000)")
    group.add_argument(
        "--max-streams-per-connection",
        type=int,
        help="concurrent calls on one connection (default 100); more wait on the client",
    )
    group.add_argument(
        "--idle-timeout-s", type=float, help="close connections idle this long (default 60)"
    )
    group.add_argument(
        "--drain-delay-s",
        type=float,
        help="on SIGTERM, health says NOT_SERVING this long before calls are refused "
        "(default 0; about 5 under a load balancer)",
    )
    group.add_argument(
        "--grace-s",
        type=float,
        help="on SIGTERM, calls in flight get this long to finish (default 10)",
    )


def _limits(args: argparse.Namespace) -> dict[str, float | int]:
    """The limit flags given, as ServerSettings fields (the others keep their defaults)."""
    limits: dict[str, float | int] = {}
    if args.memory_budget_mb is not None:
        limits["memory_budget_bytes"] = round(args.memory_budget_mb * 1024 * 1024)
    for name in (
        "max_connections",
        "max_streams_per_connection",
        "idle_timeout_s",
        "drain_delay_s",
        "grace_s",
    ):
        if getattr(args, name) is not None:
            limits[name] = getattr(args, name)
    return limits


def _model_source(args: argparse.Namespace) -> ModelSource:
    from .model import ModelSource

    if args.onnx is not None:
        return ModelSource(kind="onnx", path=args.onnx, preset=args.preset)
    if args.weights is not None:
        return ModelSource(kind="weights", path=args.weights)
    return ModelSource()


def _settings(args: argparse.Namespace) -> ServerSettings:
    from .settings import ServerSettings, default_cache_dir

    return ServerSettings(
        host=args.host,
        port=args.port,
        model=_model_source(args),
        backend=args.backend,
        max_batch=args.max_batch,
        max_delay_us=args.max_delay_us,
        max_queue=args.max_queue,
        threads=args.threads,
        cache_dir=args.cache_dir or default_cache_dir(),
        allow_download=not args.offline,
        **_limits(args),  # type: ignore[arg-type]
    )


def _workers(value: str) -> int:
    from .workers import parse_workers

    try:
        return parse_workers(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    if args.workers > 1:
        from .workers import PortUnavailableError, Supervisor

        try:
            return Supervisor(_settings(args), args.workers, port_file=args.port_file).run()
        except PortUnavailableError as exc:
            print(f"framecast serve: {exc}", file=sys.stderr)
            return 1
    from .app import serve
    from .event_loop import run

    return run(serve(_settings(args), port_file=args.port_file))


def demo_images() -> list[tuple[str, bytes]]:
    """A few generated JPEGs for a demo without images: gradients and shapes, 1280x720."""
    import numpy as np
    from PIL import Image, ImageDraw

    height, width = 720, 1280
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    made: list[tuple[str, bytes]] = []
    for i, (name, colour) in enumerate(
        (("sunset.jpg", (255, 120, 40)), ("sea.jpg", (30, 90, 200)), ("meadow.jpg", (60, 170, 70)))
    ):
        ramp = (y / height)[..., None] * np.array(colour, dtype=np.float32)
        wave = 40.0 * np.sin(x / (37.0 + 11 * i))[..., None]
        pixels = np.clip(ramp + wave + 20.0 * i, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        draw.ellipse((400 + 90 * i, 180, 760 + 90 * i, 540), fill=(240 - 60 * i, 220, 40 + 80 * i))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        made.append((f"generated:{name}", buffer.getvalue()))
    return made


def _demo(args: argparse.Namespace) -> int:
    from framecast_client import Client
    from framecast_client.cli import format_predictions

    from .background import BackgroundServer

    settings = _settings(args)
    print(f"Starting a Framecast server in-process on a free port (backend {settings.backend})...")
    inputs: list[tuple[str, bytes | Path]] = (
        [(str(p), p) for p in args.images] if args.images else list(demo_images())
    )
    with BackgroundServer(settings) as server, Client(server.address) as client:
        info = client.model_info()
        print(
            f"Serving {info.name} ({info.version}) on {info.backend} {info.precision} "
            f"at {server.address}"
        )
        rows = []
        for name, image in inputs:
            started = time.perf_counter()
            result = client.classify(image, top_k=args.top_k)
            rows.append((name, result, (time.perf_counter() - started) * 1000.0))
        print(format_predictions(rows, info))
        latencies = sorted(latency for _, _, latency in rows)
        print(
            f"{len(rows)} requests, latency per request (preprocess + RPC + inference): "
            f"median {latencies[len(latencies) // 2]:.1f} ms, max {latencies[-1]:.1f} ms"
        )
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    from .backends.base import BackendUnavailableError
    from .backends.tensorrt.availability import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        # Fail before preparing anything: a build here cannot succeed.
        print(f"framecast build-engine: {reason}", file=sys.stderr)
        return 2
    from .backends.tensorrt import EngineSettings, build_engine
    from .model import prepare_model
    from .settings import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    output = args.output or cache_dir
    prepared = prepare_model(_model_source(args), cache_dir, allow_download=not args.offline)
    engine_settings = EngineSettings(
        max_batch=args.max_batch,
        opt_batch=args.opt_batch or args.max_batch,
        workspace_bytes=args.workspace_mib * 1024 * 1024,
        builder_optimization_level=args.optimization_level,
    )
    try:
        plan = build_engine(prepared.onnx_path, engine_settings, output)
    except BackendUnavailableError as exc:
        print(f"framecast build-engine: {exc}", file=sys.stderr)
        return 2
    print(f"engine: {plan}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add serve, demo and build-engine to the `framecast` command."""
    serve = commands.add_parser("serve", help="run the gRPC server")
    _add_serving_arguments(serve, port=50051)
    serve.add_argument(
        "--port-file", type=Path, help="write the bound port here once listening (with --port 0)"
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="server processes sharing the port, each with its own backend (default 1; auto: "
        "one per usable core)",
    )
    _add_model_arguments(serve)
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser(
        "demo", help="start a server in-process, classify a few images, print predictions"
    )
    demo.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="images (optional)")
    demo.add_argument("--top-k", type=int, default=1, help="classes per image (default 1)")
    _add_serving_arguments(demo, port=0)
    _add_model_arguments(demo)
    demo.set_defaults(handler=_demo)

    build = commands.add_parser(
        "build-engine", help="build the TensorRT FP16 engine for this GPU (like trtexec)"
    )
    _add_model_arguments(build)
    build.add_argument("--max-batch", type=int, default=32, help="profile max batch (default 32)")
    build.add_argument("--opt-batch", type=int, help="profile optimum batch (default max batch)")
    build.add_argument(
        "--workspace-mib", type=int, default=4096, help="builder workspace limit, MiB"
    )
    build.add_argument(
        "--optimization-level", type=int, default=3, choices=range(6), help="builder level 0-5"
    )
    build.add_argument("--output", type=Path, help="engine directory (default: the cache dir)")
    build.set_defaults(handler=_build_engine)
