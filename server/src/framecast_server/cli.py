"""Server commands of `framecast`: serve, demo, build-engine, prepare-model.

Registered into the client's CLI through the ``framecast.commands`` entry point. This module
imports only the standard library at load time so `framecast --help` stays fast.
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
from typing import TYPE_CHECKING

from framecast_client.cli_args import (
    existing_file,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:
    from .backends.tensorrt.settings import EngineSettings
    from .model import ModelSource
    from .settings import ServerSettings, ServerTLS

logger = logging.getLogger(__name__)


class CommandError(Exception):
    """A mistake in what the user asked for, found while running: one line, then exit."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (default: timm resnet50.tv2_in1k from the hub)")
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--onnx", type=existing_file, metavar="PATH", help="serve this ResNet-50 ONNX"
    )
    source.add_argument(
        "--weights",
        type=existing_file,
        metavar="PATH",
        help="safetensors with torchvision's names",
    )
    group.add_argument(
        "--preset",
        choices=("torchvision", "caffe"),
        default=None,
        help="preprocessing of an --onnx model (default torchvision; caffe: what Keras "
        "ResNet50 uses)",
    )
    group.add_argument(
        "--resize",
        type=positive_int,
        default=None,
        metavar="PIXELS",
        help="shorter side that --weights (or a torchvision --onnx model) were evaluated at "
        "before the 224 crop (default 256; torchvision's IMAGENET1K_V2 weights use 232)",
    )
    group.add_argument(
        "--offline", action="store_true", help="never download; random weights if not cached"
    )
    group.add_argument("--cache-dir", type=Path, help="prepared models and engines (engines/)")


def _add_serving_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (0.0.0.0: every interface)"
    )
    parser.add_argument("--port", type=port, default=default_port, help="port (0: any free one)")
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "tensorrt", "null"),
        default="auto",
        help="auto: TensorRT on an NVIDIA GPU, else ONNX Runtime",
    )
    parser.add_argument("--max-batch", type=positive_int, default=32, help="largest batch")
    parser.add_argument(
        "--max-delay-us",
        type=non_negative_int,
        default=0,
        help="longest wait for a batch to fill, microseconds (0: batches form from what "
        "queues while the backend computes)",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=512,
        help="queued images before RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)",
    )
    _add_require_pretrained(parser)
    _add_limit_arguments(parser)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults live in EngineSettings (one place). serve and build-engine take the same flags
    # and make the same settings from them (_engine_settings): the engine cache's key covers
    # them all, so any difference would make serve build again, for minutes.
    group = parser.add_argument_group(
        "TensorRT engine (build-engine and serve must be given the same)"
    )
    group.add_argument(
        "--opt-batch", type=positive_int, help="profile optimum batch (default: --max-batch)"
    )
    group.add_argument(
        "--workspace-mib", type=positive_int, help="builder workspace limit, MiB (default 1024)"
    )
    group.add_argument(
        "--optimization-level",
        type=int,
        choices=range(6),
        metavar="0-5",
        help="builder optimization level (default 3)",
    )


def _engine_settings(args: argparse.Namespace) -> EngineSettings:
    """The TensorRT engine settings the flags ask for: the same for serve and build-engine."""
    import dataclasses

    from .backends.tensorrt.settings import EngineSettings

    opt_batch: int | None = getattr(args, "opt_batch", None)
    workspace_mib: int | None = getattr(args, "workspace_mib", None)
    level: int | None = getattr(args, "optimization_level", None)
    if opt_batch is not None and opt_batch > args.max_batch:
        raise CommandError(
            f"--opt-batch ({opt_batch}) must be at most --max-batch ({args.max_batch})", status=2
        )
    settings = EngineSettings(max_batch=args.max_batch, opt_batch=opt_batch)
    if workspace_mib is not None:
        settings = dataclasses.replace(settings, workspace_bytes=workspace_mib * 1024 * 1024)
    if level is not None:
        settings = dataclasses.replace(settings, builder_optimization_level=level)
    return settings


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults live in ServerSettings (one place); the README's "Limits and behaviour under
    # load" says what a client sees when each is hit.
    group = parser.add_argument_group("limits under load")
    group.add_argument(
        "--memory-budget-mb",
        type=positive_float,
        help="images admitted, waiting or computing, in MiB (default 256); beyond it streams "
        "stop reading and unary calls get RESOURCE_EXHAUSTED",
    )
    group.add_argument(
        "--max-connections", type=positive_int, help="open connections (default 1000)"
    )
    group.add_argument(
        "--max-streams-per-connection",
        type=positive_int,
        help="concurrent calls on one connection, streams included (default 8); more wait "
        "on the client",
    )
    group.add_argument(
        "--max-unary-calls",
        type=positive_int,
        help="unary calls admitted at once, server-wide (default 8; one more for a caller "
        "holding none); more wait unread, each caller in turn",
    )
    group.add_argument(
        "--idle-timeout-s",
        type=positive_float,
        help="close connections idle this long (default 60)",
    )
    group.add_argument(
        "--drain-delay-s",
        type=non_negative_float,
        help="on SIGTERM, health says NOT_SERVING this long before calls are refused "
        "(default 0; about 5 under a load balancer)",
    )
    group.add_argument(
        "--grace-s",
        type=non_negative_float,
        help="on SIGTERM, calls in flight get this long to finish (default 10)",
    )
    group.add_argument(
        "--max-connection-age",
        type=non_negative_float,
        metavar="SECONDS",
        help="end each connection after this long (+-10%%), so clients re-resolve and spread "
        "onto new replicas; the SDK reconnects unnoticed (default 0: never)",
    )
    group.add_argument(
        "--max-connection-age-grace",
        type=non_negative_float,
        metavar="SECONDS",
        help="calls on a connection past its age get this long before it is closed (default 10)",
    )


def _limits(args: argparse.Namespace) -> dict[str, float | int]:
    """The limit flags given, as ServerSettings fields (the others keep their defaults)."""
    limits: dict[str, float | int] = {}
    if args.memory_budget_mb is not None:
        limits["memory_budget_bytes"] = round(args.memory_budget_mb * 1024 * 1024)
    for name in (
        "max_connections",
        "max_streams_per_connection",
        "max_unary_calls",
        "idle_timeout_s",
        "drain_delay_s",
        "grace_s",
    ):
        if getattr(args, name) is not None:
            limits[name] = getattr(args, name)
    for flag, name in (
        ("max_connection_age", "max_connection_age_s"),
        ("max_connection_age_grace", "max_connection_age_grace_s"),
    ):
        if getattr(args, flag, None) is not None:
            limits[name] = getattr(args, flag)
    return limits


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security and metrics")
    group.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate"
    )
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="the key of --tls-cert")
    group.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates signed by these CAs (mutual TLS)",
    )
    group.add_argument(
        "--auth-tokens",
        type=Path,
        metavar="FILE",
        help="require a bearer token from this file (one per line, or name:token; re-read "
        "when it changes)",
    )
    group.add_argument(
        "--auth-health", action="store_true", help="require a token for health checks too"
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback --host (e.g. behind a TLS-terminating proxy)",
    )
    group.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default off; 0 = any)",
    )
    group.add_argument(
        "--health-port",
        type=port,
        metavar="PORT",
        help="also serve grpc.health.v1, and nothing else, in plaintext without tokens on "
        "HOST:PORT, for probes that cannot speak TLS (Kubernetes' gRPC probes; default off)",
    )


class SecurityFlagError(ValueError):
    """Security flags that do not go together."""


def _server_tls(args: argparse.Namespace) -> ServerTLS | None:
    from .settings import ServerTLS

    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    client_ca = getattr(args, "tls_client_ca", None)
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityFlagError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise SecurityFlagError("TLS needs both --tls-cert and --tls-key")
    return ServerTLS(cert=cert, key=key, client_ca=client_ca)


def _model_source(args: argparse.Namespace) -> ModelSource:
    """The model flags as a ModelSource; flags that do not apply are refused, not ignored."""
    from .model import ModelSource

    if args.preset is not None and args.onnx is None:
        what = "--weights" if args.weights is not None else "the default model"
        raise CommandError(
            f"--preset applies to --onnx models only; {what} is served with torchvision's "
            "preprocessing" + (" (use --resize for its resize)" if args.weights else ""),
            status=2,
        )
    if args.resize is not None:
        if args.onnx is None and args.weights is None:
            raise CommandError(
                "--resize applies to --weights and --onnx; the default model has its own (232)",
                status=2,
            )
        if args.preset == "caffe":
            raise CommandError(
                "--resize does not apply to --preset caffe, which stretches to 224", status=2
            )
        if args.resize < 224:
            raise CommandError(
                f"--resize must be at least the 224 crop, got {args.resize}", status=2
            )
    require = bool(getattr(args, "require_pretrained", False))
    if args.onnx is not None:
        return ModelSource(kind="onnx", path=args.onnx, preset=args.preset, resize_size=args.resize)
    if args.weights is not None:
        return ModelSource(kind="weights", path=args.weights, resize_size=args.resize)
    return ModelSource(require_pretrained=require)


def _settings(args: argparse.Namespace) -> ServerSettings:
    from .settings import ServerSettings, default_cache_dir

    model = _model_source(args)
    if args.max_queue < args.max_batch:
        raise CommandError(
            f"--max-queue ({args.max_queue}) must hold at least one --max-batch ({args.max_batch})",
            status=2,
        )
    return ServerSettings(
        host=args.host,
        port=args.port,
        model=model,
        backend=args.backend,
        max_batch=args.max_batch,
        max_delay_us=args.max_delay_us,
        max_queue=args.max_queue,
        threads=args.threads,
        cache_dir=args.cache_dir or default_cache_dir(),
        allow_download=not args.offline,
        tls=_server_tls(args),
        auth_tokens=getattr(args, "auth_tokens", None),
        auth_health=getattr(args, "auth_health", False),
        insecure=getattr(args, "insecure", False),
        metrics_port=getattr(args, "metrics_port", None),
        health_port=getattr(args, "health_port", None),
        engine=_engine_settings(args),
        **_limits(args),  # type: ignore[arg-type]
    )


def _check_bindable(host: str, port: int) -> None:
    """Refuse, in one line, a host or port the server could not listen on."""
    from .process.bind_check import bind_problem

    problem = bind_problem(host, port)
    if problem is not None:
        raise CommandError(problem)


def _model_errors() -> tuple[type[BaseException], ...]:
    """What preparing a model raises for a file that is not a model, or missing weights.

    Also serve's ModelLoadError: the model failed to load after the server started listening.
    """
    from .model.download import WeightsUnavailableError
    from .model.weights import WeightsError
    from .process.app import ModelLoadError

    return (ValueError, OSError, WeightsError, WeightsUnavailableError, ModelLoadError)


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a server command, turning a user's mistake into one line (and 1 or 2) on stderr."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CommandError as exc:
            print(f"framecast {args.command}: {exc}", file=sys.stderr)
            return exc.status
        except _model_errors() as exc:
            # -v shows where it came from; without it, the sentence is what the user needs.
            logger.debug("framecast %s failed", args.command, exc_info=True)
            print(f"framecast {args.command}: {exc}", file=sys.stderr)
            return 1

    return run


def _workers(value: str) -> int:
    from .process.workers import parse_workers

    try:
        return parse_workers(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _checked_settings(args: argparse.Namespace) -> ServerSettings:
    """The settings, with the security flags checked: a refusal is one line and status 2.

    An address that is not this host's is said first: no flag would make it work.
    """
    from .process.wiring import check_files
    from .security.auth import TokenFileError
    from .security.tls import TLSFilesError
    from .settings import PlaintextRefusedError

    _check_bindable(args.host, args.port)
    try:
        settings = _settings(args)
        check_files(settings)  # the TLS and token files, read once before anything starts
    except (PlaintextRefusedError, SecurityFlagError, TLSFilesError, TokenFileError) as exc:
        raise CommandError(str(exc), status=2) from None
    _check_model_and_backend(settings)
    return settings


def _check_model_and_backend(settings: ServerSettings) -> None:
    """Refuse, before the server listens, a model file or backend that cannot work.

    Otherwise the server binds, logs its progress and only then fails: a user sees several
    lines with the reason last. What is cheap to know is checked here; the rest (a build
    that fails) is still reported by serve as its last line.
    """
    from .model.prepare import check_source

    check_source(settings.model)  # a user's mistake: _run prints it as one line
    if settings.backend == "tensorrt":
        from .backends.tensorrt.availability import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise CommandError(reason)


def _serve(args: argparse.Namespace) -> int:
    settings = _checked_settings(args)
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

    settings = _checked_settings(args)
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

    engine_settings = _engine_settings(args)  # a mistake in the flags is said first
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
    prepared = prepare_model(_model_source(args), cache_dir, allow_download=not args.offline)
    try:
        plan = build_engine(prepared.onnx_path, engine_settings, output)
    except BackendUnavailableError as exc:
        print(f"framecast build-engine: {exc}", file=sys.stderr)
        return 2
    print(f"engine: {plan}")
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from .model import prepare_model
    from .settings import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    prepared = prepare_model(_model_source(args), cache_dir, allow_download=not args.offline)
    print(f"model: {prepared.onnx_path} ({prepared.name} {prepared.version}, "
          f"{'pretrained' if prepared.pretrained else 'RANDOM weights'})")  # fmt: skip
    return 0


def _add_require_pretrained(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--require-pretrained",
        action="store_true",
        help="refuse random weights (when the default weights cannot be had)",
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add serve, demo, build-engine and prepare-model to the `framecast` command."""
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Serve ResNet-50 image classification over gRPC (Framecast's Classifier "
        "service, health and reflection) until SIGTERM or SIGINT. Requests from all clients "
        "are batched together; TensorRT on an NVIDIA GPU, ONNX Runtime elsewhere.",
    )
    _add_serving_arguments(serve, default_port=50051)
    _add_security_arguments(serve)
    _add_engine_arguments(serve)
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
    serve.add_argument(
        "--inference",
        choices=("per-worker", "shared", "auto"),
        default="auto",
        help="with --workers: a backend in every worker, or one shared inference process that "
        "batches the frames of every worker (handed over in shared memory); auto (default): "
        "shared on TensorRT, per-worker on the CPU",
    )
    _add_model_arguments(serve)
    serve.set_defaults(handler=_run(_serve))

    demo = commands.add_parser(
        "demo",
        help="start a server in-process, classify a few images, print predictions",
        description="Start a server in-process on a free port, classify the images given "
        "(or a few generated ones) through the client, print predictions and latency, exit.",
    )
    demo.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="images (optional)")
    demo.add_argument("--top-k", type=positive_int, default=1, help="classes per image")
    _add_serving_arguments(demo, default_port=0)
    demo.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback --host (the demo serves no TLS)",
    )
    _add_model_arguments(demo)
    demo.set_defaults(handler=_run(_demo))

    build = commands.add_parser(
        "build-engine",
        help="build the TensorRT FP16 engine for this GPU (like trtexec)",
        description="Build (or find in the cache) the TensorRT FP16 engine of the model for "
        "this GPU, so that `framecast serve --backend tensorrt` starts at once.",
    )
    _add_model_arguments(build)
    build.add_argument("--max-batch", type=positive_int, default=32, help="profile max batch")
    _add_engine_arguments(build)
    build.add_argument("--output", type=Path, help="engine directory (default: the cache dir)")
    _add_require_pretrained(build)
    build.set_defaults(handler=_run(_build_engine))

    prepare = commands.add_parser(
        "prepare-model",
        help="download the weights and prepare the served model into the cache",
        description="Prepare (or find in the cache) the model that `framecast serve` with the "
        "same model flags and cache serves: the default weights are downloaded and checked "
        "against their published SHA-256. Kubernetes runs it as an init container, so the "
        "server itself starts with --offline --require-pretrained.",
    )
    _add_model_arguments(prepare)
    _add_require_pretrained(prepare)
    prepare.set_defaults(handler=_run(_prepare_model))
