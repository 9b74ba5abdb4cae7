"""Server commands of `framecast`: serve, demo, build-engine, prepare-model.

Registered into the client's CLI through the ``framecast.commands`` entry point. This module
imports only the standard library at load time so `framecast --help` stays fast. The flags
are declared in ``cli_flags.py`` and turned into settings (and checked) in
``cli_settings.py``; here are the commands themselves and how their errors are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from framecast_client.cli_args import positive_int

from .cli_flags import (
    add_engine_arguments,
    add_model_arguments,
    add_require_pretrained,
    add_security_arguments,
    add_serving_arguments,
    workers_flag,
)
from .cli_settings import (
    CommandError,
    checked_settings,
    engine_settings,
    model_errors,
    model_source,
)

logger = logging.getLogger(__name__)


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a server command, turning a user's mistake into one line (and 1 or 2) on stderr."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CommandError as exc:
            print(f"framecast {args.command}: {exc}", file=sys.stderr)
            return exc.status
        except model_errors() as exc:
            # -v shows where it came from; without it, the sentence is what the user needs.
            logger.debug("framecast %s failed", args.command, exc_info=True)
            print(f"framecast {args.command}: {exc}", file=sys.stderr)
            return 1

    return run


def _serve(args: argparse.Namespace) -> int:
    settings = checked_settings(args)
    if args.workers > 1:
        from .process.workers import PortUnavailableError, Supervisor

        try:
            return Supervisor(
                settings, args.workers, port_file=args.port_file, inference=args.inference
            ).run()
        except PortUnavailableError as exc:
            print(f"framecast serve: {exc}", file=sys.stderr)
            return 1
    from .process.app import serve
    from .process.event_loop import run

    return run(serve(settings, port_file=args.port_file))


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


@contextlib.contextmanager
def _without_the_sdks_copy_of_the_warning() -> Iterator[None]:
    """The demo's server logs the random-weights warning as it starts; its client must not
    log it a second time in the same terminal (the SDK logs it once per client)."""

    def keep(record: logging.LogRecord) -> bool:
        return "RANDOM WEIGHTS" not in record.getMessage()

    sdk = logging.getLogger("framecast_client.client")
    sdk.addFilter(keep)
    try:
        yield
    finally:
        sdk.removeFilter(keep)


def _demo(args: argparse.Namespace) -> int:
    from framecast_client import Client
    from framecast_client.cli import format_predictions

    from .process.background import BackgroundServer

    settings = checked_settings(args)
    print(f"Starting a Framecast server in-process on a free port (backend {settings.backend})...")
    inputs: list[tuple[str, bytes | Path]] = (
        [(str(p), p) for p in args.images] if args.images else list(demo_images())
    )
    with (
        BackgroundServer(settings) as server,
        _without_the_sdks_copy_of_the_warning(),
        Client(server.address) as client,
    ):
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

    wanted = engine_settings(args)  # a mistake in the flags is said first
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        # Fail before preparing anything: a build here cannot succeed.
        print(f"framecast build-engine: {reason}", file=sys.stderr)
        return 2
    from .backends.tensorrt import build_engine
    from .model import prepare_model
    from .settings import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    output = args.output or cache_dir
    prepared = prepare_model(model_source(args), cache_dir, allow_download=not args.offline)
    try:
        plan = build_engine(prepared.onnx_path, wanted, output)
    except BackendUnavailableError as exc:
        print(f"framecast build-engine: {exc}", file=sys.stderr)
        return 2
    print(f"engine: {plan}")
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from .model import prepare_model
    from .settings import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    prepared = prepare_model(model_source(args), cache_dir, allow_download=not args.offline)
    print(f"model: {prepared.onnx_path} ({prepared.name} {prepared.version}, "
          f"{'pretrained' if prepared.pretrained else 'RANDOM weights'})")  # fmt: skip
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add serve, demo, build-engine and prepare-model to the `framecast` command."""
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Serve ResNet-50 image classification over gRPC (Framecast's Classifier "
        "service, health and reflection) until SIGTERM or SIGINT. Requests from all clients "
        "are batched together; TensorRT on an NVIDIA GPU, ONNX Runtime elsewhere.",
    )
    add_serving_arguments(serve, default_port=50051)
    add_security_arguments(serve)
    add_engine_arguments(serve)
    serve.add_argument(
        "--port-file", type=Path, help="write the bound port here once listening (with --port 0)"
    )
    serve.add_argument(
        "--workers",
        type=workers_flag,
        default=1,
        metavar="N|auto",
        help="server processes sharing the port, each with its own backend (default 1; auto: "
        "one per usable core)",
    )
    serve.add_argument(
        "--inference",
        choices=("per-worker", "shared", "auto"),
        default="auto",
        help="with --workers: a backend in every worker, or one shared inference process that "
        "batches the frames of every worker (handed over in shared memory); auto (default): "
        "shared on TensorRT, per-worker on the CPU",
    )
    add_model_arguments(serve)
    serve.set_defaults(handler=_run(_serve))

    demo = commands.add_parser(
        "demo",
        help="start a server in-process, classify a few images, print predictions",
        description="Start a server in-process on a free port, classify the images given "
        "(or a few generated ones) through the client, print predictions and latency, exit.",
    )
    demo.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="images (optional)")
    demo.add_argument("--top-k", type=positive_int, default=1, help="classes per image")
    add_serving_arguments(demo, default_port=0)
    demo.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback --host (the demo serves no TLS)",
    )
    add_model_arguments(demo)
    demo.set_defaults(handler=_run(_demo))

    build = commands.add_parser(
        "build-engine",
        help="build the TensorRT FP16 engine for this GPU (like trtexec)",
        description="Build (or find in the cache) the TensorRT FP16 engine of the model for "
        "this GPU, so that `framecast serve --backend tensorrt` starts at once.",
    )
    add_model_arguments(build)
    build.add_argument("--max-batch", type=positive_int, default=32, help="profile max batch")
    add_engine_arguments(build)
    build.add_argument("--output", type=Path, help="engine directory (default: the cache dir)")
    add_require_pretrained(build)
    build.set_defaults(handler=_run(_build_engine))

    prepare = commands.add_parser(
        "prepare-model",
        help="download the weights and prepare the served model into the cache",
        description="Prepare (or find in the cache) the model that `framecast serve` with the "
        "same model flags and cache serves: the default weights are downloaded and checked "
        "against their published SHA-256. Kubernetes runs it as an init container, so the "
        "server itself starts with --offline --require-pretrained.",
    )
    add_model_arguments(prepare)
    add_require_pretrained(prepare)
    prepare.set_defaults(handler=_run(_prepare_model))
