"""The server commands' flags: the argument groups of serve, demo, build-engine, prepare-model.

Only the standard library and the client's flag types are imported here, so that
`framecast --help` stays fast; what the flags become is ``cli_settings.py``'s job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from framecast_client.cli_args import (
    existing_file,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_serving_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
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
    add_require_pretrained(parser)
    add_limit_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults live in EngineSettings (one place). serve and build-engine take the same flags
    # and make the same settings from them (engine_settings): the engine cache's key covers
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


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
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
        help="on SIGTERM, health says NOT_SERVING this long before the drain begins "
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


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_require_pretrained(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--require-pretrained",
        action="store_true",
        help="refuse random weights (when the default weights cannot be had)",
    )


def workers_flag(value: str) -> int:
    from .process.cores import parse_workers

    try:
        return parse_workers(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
