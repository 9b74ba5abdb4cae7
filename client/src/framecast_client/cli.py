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
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import cast

import numpy as np
from numpy.typing import NDArray

from . import __name__ as _package
from .cli_args import CommandParser, positive_float, positive_int
from .client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S, Client
from .errors import FramecastError, InvalidArgumentError, InvalidImageError
from .security_cli import add_security_arguments, client_security
from .sources import IMAGE_SUFFIXES
from .types import Classification, ModelInfo

logger = logging.getLogger(_package)

SERVER_COMMANDS = ("serve", "demo", "build-engine")
# Commands other distributions add through the ``framecast.commands`` entry point, by the
# distribution (and the folders of a Framecast checkout to install) that adds them: where one is not
# installed, its commands say what to install.
PLUGIN_COMMANDS = {
    **dict.fromkeys(SERVER_COMMANDS, ("framecast-server", "./oip ./server", "runs the server")),
    "bench": ("framecast-bench", "./oip ./bench", "is the benchmark tool"),
}
# Where the server comes from: the packages are not on a public index.
SERVER_INSTALL_HINT = (
    "install it from a Framecast checkout with: pip install ./client ./oip ./server "
    "(or pip install the wheels that `uv build --all-packages` writes to dist/)"
)
Handler = Callable[[argparse.Namespace], int]


def add_address_arguments(parser: argparse.ArgumentParser, *, timeout: bool = True) -> None:
    """--address, --timeout (unless told not to) and the security options, shared by the
    commands that talk to a server at --address."""
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server address")
    if timeout:
        parser.add_argument(
            "--timeout",
            type=positive_float,
            default=DEFAULT_TIMEOUT_S,
            help="deadline per call, seconds",
        )
    add_security_arguments(parser)


def format_predictions(
    rows: Sequence[tuple[str, Classification, float | None]], info: ModelInfo
) -> str:
    """A table of image, label and probability (the top-k of each), plus ms per image.

    The random-weights warning is not part of it (stdout stays a table to parse): the SDK logs
    it to stderr, once per client.
    """
    name_width = max([5, *(len(name) for name, _, _ in rows)])
    label_width = max([5, *(len(p.label) for _, c, _ in rows for p in c.predictions)])
    lines = []
    lines.append(f"{'image':<{name_width}}  {'label':<{label_width}}  probability  ms/image")
    for name, result, latency_ms in rows:
        for rank, p in enumerate(result.predictions):
            shown = name if rank == 0 else ""
            latency = f"{latency_ms:7.1f} ms" if latency_ms is not None and rank == 0 else ""
            lines.append(
                f"{shown:<{name_width}}  {p.label:<{label_width}}  {p.probability:11.4f}  {latency}"
            )
    return "\n".join(lines)


@dataclass(frozen=True)
class _Failure:
    """An input that could not be classified, and why."""

    name: str
    reason: str


def expand_inputs(arguments: Sequence[str]) -> list[Path | _Failure]:
    """Files as given and the images in each directory (name order), in argument order.

    A directory without images is a failure in its place.
    """
    expanded: list[Path | _Failure] = []
    for argument in arguments:
        path = Path(argument)
        if not path.is_dir():
            expanded.append(path)
            continue
        found = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not found:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            expanded.append(_Failure(argument, f"directory holds no images ({suffixes})"))
        expanded.extend(found)
    return expanded


def _classify(args: argparse.Namespace) -> int:
    items = expand_inputs(args.images)
    # Results and failures keep the inputs' order: one slot per input.
    outcomes: list[tuple[str, Classification, float] | _Failure | None] = [
        item if isinstance(item, _Failure) else None for item in items
    ]
    with Client(
        args.address,
        timeout=args.timeout,
        channel_order=args.channel_order,
        **client_security(args),
    ) as client:
        info = client.model_info()
        prepared: list[tuple[int, NDArray[np.uint8]]] = []
        preprocess_ms: dict[int, float] = {}
        for position, item in enumerate(items):
            if isinstance(item, Path):
                started = time.perf_counter()
                try:
                    prepared.append((position, client.preprocess(item)))
                except InvalidImageError as exc:
                    outcomes[position] = _Failure(str(item), str(exc))
                preprocess_ms[position] = (time.perf_counter() - started) * 1000.0
        # Up to the server's max batch per request: one round trip for many images.
        step = max(1, info.max_batch)
        for start in range(0, len(prepared), step):
            chunk = prepared[start : start + step]
            started = time.perf_counter()
            try:
                results = client.classify_preprocessed(
                    np.stack([array for _, array in chunk]), top_k=args.top_k
                )
            except InvalidArgumentError as exc:
                # The server refused this batch (the request, not the server, is at fault):
                # each of its images failed; the others go on.
                for position, _ in chunk:
                    outcomes[position] = _Failure(str(items[position]), str(exc))
                continue
            # An image's time: its own decoding and resizing, plus its share of the request
            # that carried it with the others of its batch.
            share_ms = (time.perf_counter() - started) * 1000.0 / len(chunk)
            for (position, _), result in zip(chunk, results, strict=True):
                latency_ms = preprocess_ms[position] + share_ms
                outcomes[position] = (str(items[position]), result, latency_ms)
    rows = [o for o in outcomes if isinstance(o, tuple)]
    failures = [o for o in outcomes if isinstance(o, _Failure)]
    if rows:
        print(format_predictions(rows, info))
    for failure in failures:
        print(f"framecast classify: {failure.name}: {failure.reason}", file=sys.stderr)
    if failures:
        print(
            f"framecast classify: {len(failures)} of {len(outcomes)} inputs failed",
            file=sys.stderr,
        )
        return 1
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
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    with Client(args.address, timeout=args.timeout, **client_security(args)) as client:
        info = client.model_info()
    print(format_model_info(info, args.address))
    return 0


def _plugin_missing(args: argparse.Namespace) -> int:
    distribution, folders, what = PLUGIN_COMMANDS[args.command]
    hint = SERVER_INSTALL_HINT.replace("./oip ./server", folders)
    print(
        f"framecast {args.command}: this command {what}, which is not installed here "
        f"({distribution}); {hint}",
        file=sys.stderr,
    )
    return 2


def _version() -> str:
    """``framecast-client X`` and the server's and the bench's versions where installed."""
    parts = []
    for distribution in ("framecast-client", "framecast-server", "framecast-bench"):
        try:
            parts.append(f"{distribution} {version(distribution)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts) or "framecast (version unknown)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: client commands plus whatever the server registered."""
    parser = CommandParser(
        prog="framecast", description="Framecast: image classification served over gRPC."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--version", action="version", version=_version())
    # Subcommand parsers are CommandParsers too; plugins see them as plain ArgumentParsers.
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )

    classify = commands.add_parser(
        "classify",
        help="classify images on a running server",
        description="Classify image files, and the images in directories, on a running "
        "server, in batches of up to the server's max batch. Every input that can be "
        "classified is; each one that cannot is reported on its own line (stderr) and the "
        "exit status is then 1.",
    )
    classify.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...) or directories"
    )
    classify.add_argument("--top-k", type=positive_int, default=1, help="classes per image")
    classify.add_argument(
        "--channel-order", choices=("RGB", "BGR"), default="RGB", help=argparse.SUPPRESS
    )
    add_address_arguments(classify)
    classify.set_defaults(handler=_classify)

    info = commands.add_parser(
        "info",
        help="show what a running server serves",
        description="Show what a running server serves: model, backend, preprocessing, weights.",
    )
    add_address_arguments(info)
    info.set_defaults(handler=_info)

    _register_plugins(commands)
    for sub in commands.choices.values():
        # -v works after the command too; SUPPRESS keeps the top-level value when absent.
        stub = sub.get_default("handler") is _plugin_missing
        if not stub and "-v" not in sub._option_string_actions:
            sub.add_argument(
                "-v",
                "--verbose",
                action="store_true",
                default=argparse.SUPPRESS,
                help="log debug details",
            )
    return parser


def _register_plugins(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .stream_cli import add_parser as add_stream
    from .top_cli import add_parser as add_top

    add_stream(commands)
    add_top(commands)
    for entry in entry_points(group="framecast.commands"):
        try:
            entry.load()(commands)
        except ImportError as exc:
            logger.debug("framecast.commands entry %s not loadable: %s", entry.name, exc)
    for name, (distribution, _, _) in PLUGIN_COMMANDS.items():
        if name not in commands.choices:
            stub = commands.add_parser(name, help=f"(needs {distribution})", add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(handler=_plugin_missing)


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
