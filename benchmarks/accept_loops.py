"""What gRPC servers sharing one port cost by themselves: a bare echo with 1 and with N servers.

Usage: uv run python benchmarks/accept_loops.py [--servers 1 16] [--seconds 0.75] [--rounds 8]
       [--out FILE]

`framecast serve` runs several grpc.aio servers on one port and one event loop
(process/app.py, ``ACCEPT_LOOPS``: each accepts one call per turn of the loop, and a flood's
calls must reach admission to take turns). This measures what that costs gRPC itself, without
Framecast: one echo process per server count, each answering with the shapes Framecast's
handlers have (a unary call registered request-streaming whose handler reads its one request,
as service/unary.py; a bidi stream writing its answers itself, as ClassifyStream), measured
with protocols.py's load generators and Framecast's request bytes: unary p50 at concurrency 1,
unary requests/s and server CPU per request at concurrency 8, stream frames/s and server CPU
per frame with 8 in flight. Rounds alternate (who goes first rotates); figures are medians
over rounds, ratios (each count against the first) medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire import image_to_proto
from framecast_server.process.event_loop import run
from protocols import Side, stream_rate, unary_p50, unary_rate
from serve_process import running

REPLY = b"\x00" * 64
UNARY = "/echo.Echo/Unary"
STREAM = "/echo.Echo/Stream"
_Context = grpc.aio.ServicerContext[bytes, bytes]


async def _echo_servers(port_file: Path, count: int) -> None:
    """``count`` grpc.aio servers sharing one port (SO_REUSEPORT when more than one)."""

    async def unary(requests: AsyncIterator[bytes], context: _Context) -> bytes:
        if await context.read() is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise RuntimeError("no request")
        return REPLY

    async def stream(requests: AsyncIterator[bytes], context: _Context) -> None:
        async for _ in requests:
            await context.write(REPLY)

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Unary": grpc.stream_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    limit = 64 * 1024 * 1024
    servers = []
    port = 0
    for _ in range(count):
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 1 if count > 1 else 0),
            ]
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port(f"127.0.0.1:{port}")
        servers.append(server)
    for server in servers:
        await server.start()
    port_file.write_text(str(port))  # noqa: ASYNC240 (once, before serving)
    await servers[0].wait_for_termination()


def _check(reply: bytes, stream: bool) -> None:
    if reply != REPLY:
        raise RuntimeError(f"unexpected reply of {len(reply)} bytes")


@contextmanager
def _sides(counts: list[int], tmp: Path) -> Iterator[list[Side]]:
    frame = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    unary_payload = pb.ClassifyRequest(images=[image_to_proto(frame)], top_k=1).SerializeToString()
    stream_payload = pb.StreamRequest(
        frame_id=1, image=image_to_proto(frame), top_k=1
    ).SerializeToString()
    with ExitStack() as stack:
        sides = []
        for count in counts:
            port = tmp / f"echo{count}.port"
            command = [sys.executable, __file__, "--echo-servers", str(count), str(port)]
            address, pid = stack.enter_context(running(command, port))
            name = f"{count} server{'s' if count > 1 else ''}"
            sides.append(
                Side(name, address, pid, UNARY, unary_payload, STREAM, stream_payload, _check)
            )
        yield sides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 16], help="counts to compare")
    parser.add_argument("--seconds", type=float, default=0.75, help="per measurement window")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--echo-servers", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_servers:
        run(_echo_servers(Path(args.echo_servers[1]), int(args.echo_servers[0])))
        return 0
    if any(count < 1 for count in args.servers) or len(args.servers) < 2:
        print(
            "accept_loops.py: --servers takes two or more counts, each at least 1", file=sys.stderr
        )
        return 2

    keys = ("p50", "rps", "rps_cpu", "fps", "fps_cpu")
    figures: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name, _sides(args.servers, Path(tmp_name)) as sides:
        figures = {side.name: {key: [] for key in keys} for side in sides}
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                figures[side.name]["p50"].append(unary_p50(side, args.seconds))
            for side in order:
                rps, cpu = asyncio.run(unary_rate(side, args.seconds))
                figures[side.name]["rps"].append(rps)
                figures[side.name]["rps_cpu"].append(cpu)
            for side in order:
                fps, cpu = asyncio.run(stream_rate(side, args.seconds))
                figures[side.name]["fps"].append(fps)
                figures[side.name]["fps_cpu"].append(cpu)
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    titles = {
        "p50": "unary p50, concurrency 1 (ms)",
        "rps": "unary, concurrency 8 (req/s)",
        "rps_cpu": "  server CPU per request (us)",
        "fps": "stream, 8 in flight (frames/s)",
        "fps_cpu": "  server CPU per frame (us)",
    }
    first, *others = figures
    report: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out)}, "per_round": figures}
    print(f"{'':34}" + "".join(f"{name:>14}" for name in figures)
          + "".join(f"{name + ' / ' + first.split()[0]:>16}" for name in others))  # fmt: skip
    for key, title in titles.items():
        medians = [statistics.median(f[key]) for f in figures.values()]
        ratios = [
            statistics.median(
                a / b for a, b in zip(figures[name][key], figures[first][key], strict=True)
            )
            for name in others
        ]
        report[key] = {
            "medians": dict(zip(figures, medians, strict=True)),
            "ratios": dict(zip(others, ratios, strict=True)),
        }
        print(f"{title:34}" + "".join(f"{m:>14,.3f}" for m in medians)
              + "".join(f"{x:>16.3f}" for x in ratios))  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
