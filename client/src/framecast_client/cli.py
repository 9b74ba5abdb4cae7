"""The `framecast` command.

Client commands (classify, info, and those registered by client modules) live here; the server
distribution adds its commands (serve, demo, build-engine) through the ``framecast.commands``
entry point group, so this leaf package never imports the server.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from . import __name__ as _package
from .client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S, Client
from .errors import FramecastError
from .security_cli import add_security_arguments, client_security
from .types import Classification, ModelInfo

logger = logging.getLogger(_package)

SERVER_COMMANDS = ("serve", "demo", "build-engine")
Handler = Callable[[argparse.Namespace], int]


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    """--address and --timeout, shared by every command that talks to a server."""
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"server address (default {DEFAULT_ADDRESS})"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline per call, seconds"
    )
    add_security_arguments(parser)


def format_warning(info: ModelInfo) -> str:
    """The banner every command that shows labels prints when the weights are not pretrained."""
    return f"WARNING: {info.warning}" if info.warning else ""


def format_predictions(
    rows: Sequence[tuple[str, Classification, float | None]], info: ModelInfo
) -> str:
    """A table of image, label and probability (the top-k of each), plus latency when given."""
    name_width = max([5, *(len(name) for name, _, _ in rows)])
    label_width = max([5, *(len(p.label) for _, c, _ in rows for p in c.predictions)])
    lines = []
    if info.warning:
        lines.append(format_warning(info))
    lines.append(f"{'image':<{name_width}}  {'label':<{label_width}}  probability  latency")
    for name, result, latency_ms in rows:
        for rank, p in enumerate(result.predictions):
            shown = name if rank == 0 else ""
            latency = f"{latency_ms:7.1f} ms" if latency_ms is not None and rank == 0 else ""
            lines.append(
                f"{shown:<{name_width}}  {p.label:<{label_width}}  {p.probability:11.4f}  {latency}"
            )
    return "\n".join(lines)


def _classify(args: argparse.Namespace) -> int:
    with Client(
        args.address,
        timeout=args.timeout,
        channel_order=args.channel_order,
        **client_security(args),
    ) as client:
        info = client.model_info()
        rows: list[tuple[str, Classification, float | None]] = []
        for path in args.images:
            started = time.perf_counter()
            result = client.classify(Path(path), top_k=args.top_k)
            rows.append((str(path), result, (time.perf_counter() - started) * 1000.0))
    print(format_predictions(rows, info))
    return 0


def format_model_info(info: ModelInfo, address: str) -> str:
    """What `framecast info` prints."""
    spec = info.preprocessing
    if spec.resize_policy == "stretch":
        resize = f"stretch to {spec.input_width}x{spec.input_height}"
    else:
        resize = (
            f"shorter side to {spec.resize_size}, "
            f"center crop {spec.input_width}x{spec.input_height}"
        )
    lines = [
        f"server         {address}",
        f"model          {info.name} ({info.version})",
        f"backend        {info.backend} ({info.precision}), max batch {info.max_batch}",
        f"preprocessing  {resize}, {spec.interpolation}, normalization {info.normalization}",
        f"weights        {'pretrained' if info.pretrained else 'NOT pretrained'}: "
        f"{info.weights_source}",
        f"classes        {len(info.labels)}",
        f"max message    {info.max_message_bytes / 1e6:.1f} MB",
    ]
    if info.warning:
        lines.append(format_warning(info))
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    with Client(args.address, timeout=args.timeout, **client_security(args)) as client:
        info = client.model_info()
    print(format_model_info(info, args.address))
    return 0


def _server_missing(args: argparse.Namespace) -> int:
    print(
        f"framecast {args.command}: this command runs the server, which is not installed here. "
        "Install it with: pip install framecast-server",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: client commands plus whatever the server registered."""
    parser = argparse.ArgumentParser(
        prog="framecast", description="Framecast: image classification served over gRPC."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = commands.add_parser("classify", help="classify images on a running server")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    classify.add_argument("--top-k", type=int, default=1, help="classes per image (default 1)")
    classify.add_argument(
        "--channel-order", choices=("RGB", "BGR"), default="RGB", help=argparse.SUPPRESS
    )
    add_address_arguments(classify)
    classify.set_defaults(handler=_classify)

    info = commands.add_parser("info", help="show what a running server serves")
    add_address_arguments(info)
    info.set_defaults(handler=_info)

    _register_plugins(commands)
    return parser


def _register_plugins(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .bench.cli import add_parser as add_bench
    from .stream_cli import add_parser as add_stream

    add_bench(commands)
    add_stream(commands)
    registered = False
    for entry in entry_points(group="framecast.commands"):
        try:
            entry.load()(commands)
            registered = True
        except ImportError as exc:
            logger.debug("framecast.commands entry %s not loadable: %s", entry.name, exc)
    if not registered:
        for name in SERVER_COMMANDS:
            stub = commands.add_parser(name, help="(needs framecast-server)", add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(handler=_server_missing)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `framecast` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except FramecastError as exc:
        print(f"framecast {args.command}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        # An option the SDK refused (an unreadable certificate, a token in plaintext...).
        if args.verbose:
            raise
        print(f"framecast {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
