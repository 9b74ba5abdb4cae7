"""Cameras per host, one run: Framecast (null and ONNX Runtime backends) and a local Triton.

Usage: uv run python benchmarks/camera_fleet.py [--cameras 1,4,16,64] [--fps 30]
       [--slo "p99<=100ms,drops<=1%"] [--window 1] [--max-windows 3] [--max-cameras 128]
       [--triton-python PY] [--no-onnxruntime] [--cache-dir DIR] [--out FILE]

Against each server in turn (one at a time, so none competes with another for the cores), the
same two `framecast bench` commands: a sweep ``--cameras 1,4,16,64 --fps 30`` and
``--find-max --slo "p99<=100ms,drops<=1%"``. Servers:

* ``framecast null``: ``framecast serve --backend null``; cameras are the SDK's realtime
  sessions (Framecast's protocol), and again the same process's Open Inference Protocol
  endpoint (ModelStreamInfer, the bench's OIP cameras: the client Triton gets);
* ``framecast onnxruntime``: the same with ResNet-50 on ONNX Runtime (CPU);
* ``triton null``: the bare tritonserver bundled by nvidia-pytriton with a python-backend
  null model (benchmarks/triton_local.py), through ModelStreamInfer. Without nvidia-pytriton,
  or if Triton does not start, it is skipped and the reason printed.

Framecast's null backend and Triton's null model do the same (no pass over the pixels), so
those rows compare serving stacks; ONNX Runtime on a small CPU shows a real model's limit.
The bench client runs on the same host as the server: at large fleets it shares the cores
(its ``late99``, how late captures were taken, shows when it fell behind).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from framecast_client.cli import main as framecast
from serve_process import running, serve_command, wait_health
from triton_local import bare_triton, find_triton_python

MAX_BATCH = 32  # Framecast's and Triton's, alike
SLO = "p99<=100ms,drops<=1%"
Side = tuple[str, str, list[str]]  # (name, address, protocol options)


def _bench(address: str, options: list[str], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One `framecast bench` run in this process; its JSON report."""
    short = [
        "--warmup", str(args.warmup), "--window", str(args.window),
        "--max-windows", str(args.max_windows), "--fps", str(args.fps), "--json", str(out),
    ]  # fmt: skip
    status = framecast(["bench", address, *options, *short])
    if status != 0:
        raise RuntimeError(f"framecast bench {address} {' '.join(options)} exited {status}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def measure(name: str, address: str, options: list[str], tmp: Path, args: Any) -> dict[str, Any]:
    """The sweep and the search against one side."""
    print(f"== {name} ({address})", file=sys.stderr, flush=True)
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    sweep = _bench(address, [*options, "--cameras", args.cameras], tmp / f"{slug}.json", args)
    search = _bench(
        address,
        [*options, "--find-max", "--slo", args.slo, "--max-cameras", str(args.max_cameras)],
        tmp / f"{slug}_max.json",
        args,
    )
    return {
        "sweep": sweep["steps"],
        "find_max": search["find_max"],
        "search_steps": search["steps"],
        "backend": sweep["meta"]["backend"],
    }


@contextlib.contextmanager
def framecast_server(tmp: Path, cache: Path, backend: str) -> Iterator[str]:
    """`framecast serve --backend BACKEND` until the block ends; yields its address."""
    port_file = tmp / f"{backend}.port"
    command = serve_command(port_file, cache, "--max-batch", str(MAX_BATCH), backend=backend)
    with running(command, port_file, tmp / f"{backend}.log") as (address, _pid):
        wait_health(address)
        yield address


def _cell(step: dict[str, Any] | None) -> str:
    if step is None:
        return "-"
    p99 = step["latency_ms"]["p99"]
    p99_text = "-" if p99 is None else f"{p99:.0f}"
    return f"{step['answered_fps']:.0f}/s {p99_text}ms {step['drop_pct']:.1f}%"


def table(results: dict[str, dict[str, Any]], args: Any, skipped: dict[str, str]) -> str:
    """The README's table: cameras within the SLO, and the sweep's steps, side by side."""
    sizes = [int(x) for x in args.cameras.split(",")]
    lines = [
        f"cameras at {args.fps:g} fps within p99 100 ms and 1% drops ({args.slo}), "
        "one host, client and server on the same cores",
        "",
        f"{'server':<34}{'max cameras':>12}  "
        + "".join(f"{f'{n} cam: ans/s p99 drops':>28}" for n in sizes),
    ]
    for name, result in results.items():
        found = result["find_max"]
        best = f"{found['max_cameras']}{'+' if found['limit_reached'] else ''}"
        by_size = {s["cameras"]: s for s in result["sweep"]}
        lines.append(
            f"{name:<34}{best:>12}  " + "".join(f"{_cell(by_size.get(n)):>28}" for n in sizes)
        )
    for name, reason in skipped.items():
        lines.append(f"{name:<34} skipped: {reason}")
    lines.append(
        "max cameras: --find-max (+: stopped at --max-cameras); cells: frames answered/s, "
        "p99 end-to-end latency, frames dropped (client + server)"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", default="1,4,16,64")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--slo", default=SLO)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=1.0)
    parser.add_argument("--max-windows", type=int, default=3)
    parser.add_argument("--max-cameras", type=int, default=128)
    parser.add_argument("--triton-python", help="a Python with nvidia-pytriton (triton_local.py)")
    parser.add_argument("--no-onnxruntime", action="store_true", help="skip ONNX Runtime")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("camera_fleet.json"))
    args = parser.parse_args()

    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    python, triton_note = find_triton_python(args.triton_python)
    with tempfile.TemporaryDirectory(prefix="camera-fleet-") as name:
        tmp = Path(name)
        cache = args.cache_dir or tmp / "engines"
        with framecast_server(tmp, cache, "null") as address:
            results["framecast null (framecast.v1)"] = measure(
                "framecast null", address, [], tmp, args
            )
            results["framecast null (OIP)"] = measure(
                "framecast null OIP", address, ["--protocol", "oip"], tmp, args
            )
        if args.no_onnxruntime:
            skipped["framecast onnxruntime"] = "--no-onnxruntime"
        else:
            with framecast_server(tmp, cache, "onnxruntime") as address:
                results["framecast onnxruntime"] = measure(
                    "framecast onnxruntime", address, [], tmp, args
                )
        triton = "triton null (OIP, python backend)"
        if python is None:
            skipped[triton] = triton_note
        else:
            started = False
            try:
                with bare_triton(python, max_batch_size=MAX_BATCH) as endpoints:
                    started = True
                    options = ["--protocol", "oip", "--model", endpoints.model]
                    results[triton] = measure("triton null", endpoints.grpc, options, tmp, args)
            except RuntimeError as exc:
                if started:
                    raise  # a failure while measuring, not a Triton that could not start
                skipped[triton] = str(exc).splitlines()[0]
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}")
    print(table(results, args, skipped))
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
