"""``framecast bench``: measure a server's latency and throughput, or compare two runs."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from framecast_client.cli_args import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from framecast_client.client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S, Client
from framecast_client.preprocess import preprocess
from framecast_client.security_cli import add_security_arguments, client_security
from framecast_client.sources import VIDEO_SUFFIXES
from framecast_client.types import ModelInfo

from framecast_bench.camera_cli import add_camera_arguments, is_camera_run, run_cameras
from framecast_bench.compare import compare_reports
from framecast_bench.inputs import (
    InputError,
    PreparedInputs,
    directory_sources,
    make_payloads,
    prepare_inputs,
    synthetic_sources,
    video_sources,
)
from framecast_bench.oip_sessions import DEFAULT_MODEL, OipTarget, oip_steps
from framecast_bench.plan import (
    BenchPlan,
    ClosedStep,
    OpenStep,
    run_plan,
)
from framecast_bench.plot import (
    PlotUnavailableError,
    plot_latency_vs_throughput,
    require_matplotlib,
)
from framecast_bench.report import BenchReport, StepResult, format_table
from framecast_bench.runner import (
    BenchUnavailableError,
    Mode,
    StepConfig,
)
from framecast_bench.sessions import mode_steps

DEFAULT_CONCURRENCY = "1,2,4,8,16"
DEFAULT_BATCH = 8
DEFAULT_MAX_IN_FLIGHT = 64

EPILOG = """\
examples:
  framecast bench localhost:50051                          # unary, concurrency 1,2,4,8,16
  framecast bench HOST:PORT --mode batch --batch-size 16 --concurrency 1,2,4
  framecast bench HOST:PORT --rate 50,100,200 --json open.json   # open loop, Poisson arrivals
  framecast bench HOST:PORT --input photos/ --csv run.csv --plot run.png
  framecast bench HOST:PORT --protocol oip --mode stream    # any Open Inference Protocol server
  framecast bench --compare before.json after.json
  framecast bench HOST:PORT --cameras 1,4,16,64 --fps 30  # camera fleets, open loop
  framecast bench HOST:PORT --find-max --slo "p99<=100ms,drops<=1%"

closed loop (--concurrency): N workers, each sends its next request when the last returns.
open loop (--rate): arrivals on a Poisson schedule fixed in advance; latency counts from each
request's scheduled time, so a slow server cannot hide queueing (no coordinated omission).
A step ends when its last --stability-windows windows agree within --stability-tolerance
(throughput and p99), or after --max-windows windows (then reported as not stable).
"""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4: {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4: {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers like 50,100,200: {text!r}") from exc
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive rates like 50,100: {text!r}")
    return values


def _frame_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 640x480: {text!r}") from exc
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size: {text!r}")
    return w, h


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` command to the ``framecast`` command line."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark a server's latency and throughput (or --compare two runs)",
        description="Measure a Framecast server's latency and throughput, or compare two runs.",
        epilog=EPILOG,
    )
    p.add_argument(
        "address",
        nargs="?",
        default=DEFAULT_ADDRESS,
        metavar="ADDRESS",
        help=f"server address (default {DEFAULT_ADDRESS})",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--protocol",
        choices=("framecast", "oip"),
        default="framecast",
        help="framecast: Framecast's own protocol; oip: the Open Inference Protocol (KServe v2 "
        "gRPC, Triton's streaming), spoken by Triton, KServe and Framecast (default framecast)",
    )
    load.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"--protocol oip: the model's name on the server (default {DEFAULT_MODEL})",
    )
    load.add_argument(
        "--mode",
        choices=("unary", "batch", "stream"),
        default="unary",
        help="unary: 1 image per request; batch: --batch-size per request; stream: ClassifyStream",
    )
    load.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"images per request in batch mode (default {DEFAULT_BATCH}, at most the "
        "server's max batch)",
    )
    sweep = load.add_mutually_exclusive_group()
    sweep.add_argument(
        "--concurrency",
        type=_int_list,
        default=None,
        help=f"closed loop: comma-separated worker counts (default {DEFAULT_CONCURRENCY})",
    )
    sweep.add_argument(
        "--rate",
        type=_float_list,
        default=None,
        help="open loop: comma-separated offered rates in requests/s",
    )
    load.add_argument(
        "--arrival",
        choices=("poisson", "constant"),
        default="poisson",
        help="open-loop arrival process",
    )
    load.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=None,
        help="open loop: most outstanding requests (worker threads; default 64); --cameras: "
        "frames in flight per camera (default 3, the SDK's realtime default)",
    )
    load.add_argument("--top-k", type=positive_int, default=1, help="classes per image")
    load.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        help="deadline per request, seconds",
    )
    load.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of arrivals and synthetic frames"
    )

    measure = p.add_argument_group("measurement")
    measure.add_argument(
        "--warmup", type=non_negative_float, default=2.0, help="warm-up per step, s"
    )
    measure.add_argument("--window", type=positive_float, default=2.0, help="measurement window, s")
    measure.add_argument(
        "--max-windows", type=positive_int, default=10, help="windows per step at most"
    )
    measure.add_argument(
        "--stability-windows",
        type=positive_int,
        default=3,
        help="windows that must agree for a step to be stable; they make the result",
    )
    measure.add_argument(
        "--stability-tolerance",
        type=positive_float,
        default=10.0,
        help="agreement of throughput and p99 across those windows, percent",
    )
    measure.add_argument(
        "--max-requests-per-window",
        type=positive_int,
        default=50_000,
        help="a window also ends after this many requests",
    )

    inputs = p.add_argument_group("input")
    inputs.add_argument(
        "--input",
        default="synthetic",
        help="'synthetic' (random frames), an image directory, or a video file (needs PyAV)",
    )
    inputs.add_argument(
        "--inputs", type=positive_int, default=32, help="how many distinct inputs to use"
    )
    inputs.add_argument(
        "--frame-size",
        type=_frame_size,
        default=(640, 480),
        help="synthetic frame size WIDTHxHEIGHT (default 640x480)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    out.add_argument("--csv", type=Path, default=None, help="write one CSV row per step")
    out.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write a PNG of latency percentiles vs throughput (needs matplotlib)",
    )
    out.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A.json", "B.json"),
        default=None,
        help="print what changed from run A to run B, and exit",
    )
    out.add_argument(
        "--threshold",
        type=non_negative_float,
        default=5.0,
        help="--compare: smallest change in percent called better/worse",
    )
    add_camera_arguments(p, _int_list)
    add_security_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``framecast bench``; returns the exit status."""
    try:
        if args.compare is not None:
            a, b = (BenchReport.read_json(path) for path in args.compare)
            print(compare_reports(a, b, threshold_pct=args.threshold))
            return 0
        if is_camera_run(args):
            return run_cameras(args, _step_config(args), _load_inputs)
        return _bench(args)
    except (InputError, BenchUnavailableError, PlotUnavailableError, ValueError, OSError) as exc:
        print(f"framecast bench: {exc}", file=sys.stderr)
        return 2


def _load_inputs(args: argparse.Namespace, prepare: Any) -> PreparedInputs:
    if args.inputs < 1:
        raise InputError("--inputs must be >= 1")
    if args.input == "synthetic":
        w, h = args.frame_size
        return prepare_inputs(
            synthetic_sources(args.inputs, w, h, seed=args.seed), prepare, f"synthetic {w}x{h}"
        )
    path = Path(args.input)
    if path.is_dir():
        return prepare_inputs(directory_sources(path, args.inputs), prepare, str(path))
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return prepare_inputs(video_sources(path, args.inputs), prepare, str(path))
    raise InputError(
        f"--input {args.input!r} is neither 'synthetic', a directory nor a video file "
        f"({', '.join(sorted(VIDEO_SUFFIXES))})"
    )


def _batch_size(args: argparse.Namespace, info: ModelInfo) -> int:
    if args.mode != "batch":
        if args.batch_size not in (None, 1):
            raise ValueError("--batch-size applies to --mode batch only")
        return 1
    size = DEFAULT_BATCH if args.batch_size is None else args.batch_size
    if size < 1:
        raise ValueError("--batch-size must be >= 1")
    if size > info.max_batch:
        # The client would split the request in several calls: not what was asked for.
        raise ValueError(f"--batch-size {size} exceeds the server's max batch of {info.max_batch}")
    return size


def _progress(step: StepResult) -> None:
    p99 = step.latency_ms.get("p99", float("nan"))
    errors = f", {step.error_count} errors" if step.error_count else ""
    if step.offered_rps is not None:
        errors = f" (offered {step.offered_rps:.1f}/s){errors}"
    print(
        f"  {step.load_label}: {step.throughput_rps:.1f} req/s, {step.throughput_ips:.1f} img/s, "
        f"p99 {p99:.2f} ms, {'stable' if step.stable else 'NOT stable'} after "
        f"{len(step.windows)} window(s){errors}",
        file=sys.stderr,
        flush=True,
    )


def _meta(
    args: argparse.Namespace, info: ModelInfo, inputs: PreparedInputs, batch_size: int
) -> dict[str, Any]:
    try:
        version = metadata.version("framecast-client")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "address": args.address,
        "protocol": args.protocol,
        "mode": args.mode,
        "loop": "open" if args.rate else "closed",
        "batch_size": batch_size,
        "input": inputs.source,
        "inputs": len(inputs),
        "model": f"{info.name} {info.version}",
        "backend": info.backend,
        "precision": info.precision,
        "max_batch": info.max_batch,
        "pretrained": info.pretrained,
        "top_k": args.top_k,
        "timeout_s": args.timeout,
        "arrival": args.arrival if args.rate else None,
        "max_inflight": (args.max_in_flight or DEFAULT_MAX_IN_FLIGHT) if args.rate else None,
        "seed": args.seed,
        "warmup_s": args.warmup,
        "window_s": args.window,
        "max_windows": args.max_windows,
        "stability_windows": args.stability_windows,
        "stability_tolerance_pct": args.stability_tolerance,
        "max_requests_per_window": args.max_requests_per_window,
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "framecast_client": version,
    }


def _run(
    args: argparse.Namespace,
    plan: BenchPlan,
    config: StepConfig,
    info: ModelInfo,
    inputs: PreparedInputs,
    batch_size: int,
    steps: tuple[ClosedStep, OpenStep],
) -> BenchReport:
    if info.warning and args.protocol != "framecast":
        # Framecast's own protocol reads the info through the SDK's client, which logged it.
        print(f"WARNING: {info.warning}", file=sys.stderr)
    precision = f" ({info.precision})" if info.precision else ""
    print(
        f"framecast bench {args.address} ({args.protocol}): {info.name} on {info.backend}"
        f"{precision}, mode {args.mode}, {batch_size} image(s)/request, {len(inputs)} inputs "
        f"({inputs.source}), preprocessing {inputs.preprocess_ms.mean():.2f} ms/image",
        file=sys.stderr,
        flush=True,
    )
    return run_plan(steps, plan, config, _meta(args, info, inputs, batch_size), _progress)


def _step_config(args: argparse.Namespace) -> StepConfig:
    return StepConfig(
        warmup_s=args.warmup,
        window_s=args.window,
        max_windows=args.max_windows,
        stability_windows=args.stability_windows,
        stability_tolerance=args.stability_tolerance / 100.0,
        max_requests_per_window=args.max_requests_per_window,
        drain_timeout_s=args.timeout + 1.0,
    )


def _bench(args: argparse.Namespace) -> int:
    if args.plot is not None:
        require_matplotlib()  # fail before a run of several minutes, not after it
    config = _step_config(args)
    max_in_flight = DEFAULT_MAX_IN_FLIGHT if args.max_in_flight is None else args.max_in_flight
    plan = BenchPlan(
        concurrency=() if args.rate else (args.concurrency or _int_list(DEFAULT_CONCURRENCY)),
        rates=args.rate or (),
        max_inflight=max_in_flight,
        arrival=args.arrival,
        seed=args.seed,
    )
    mode: Mode = args.mode
    security = client_security(args)
    if args.protocol == "oip":
        if security["tls"] is not None or security["token"] is not None:
            # Refused, not ignored: a run against the wrong (plaintext) endpoint would mislead.
            raise BenchUnavailableError(
                "--protocol oip does not take TLS or token options yet; measure the OIP "
                "endpoint on a plaintext loopback port"
            )
        with OipTarget(args.address, model=args.model, timeout=args.timeout) as target:
            info = target.discover()
            batch_size = _batch_size(args, info)
            inputs = _load_inputs(args, lambda image: preprocess(image, info.preprocessing))
            payloads = make_payloads(inputs, batch_size)
            steps = oip_steps(target, mode, payloads, plan, top_k=args.top_k)
            report = _run(args, plan, config, info, inputs, batch_size, steps)
    else:
        # A connection carries only the server's few calls at once (the rest would wait here,
        # and the bench would measure its own queue): room for every worker's call.
        most_in_flight = max(plan.concurrency) if plan.concurrency else plan.max_inflight
        with Client(
            args.address, timeout=args.timeout, connections=most_in_flight, **security
        ) as client:
            info = client.model_info()
            batch_size = _batch_size(args, info)
            inputs = _load_inputs(args, client.preprocess)
            payloads = make_payloads(inputs, batch_size)
            steps = mode_steps(client, mode, payloads, plan, top_k=args.top_k, timeout=args.timeout)
            report = _run(args, plan, config, info, inputs, batch_size, steps)
    print(format_table(report.steps))
    if args.json is not None:
        report.write_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv is not None:
        report.write_csv(args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot is not None:
        plot_latency_vs_throughput(
            report.steps, args.plot, title=f"framecast bench {args.address} ({mode})"
        )
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
