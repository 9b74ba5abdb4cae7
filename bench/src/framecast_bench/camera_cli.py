"""``framecast bench --cameras N[,N2,...] --fps F [--find-max --slo ...]``: camera fleets.

How many cameras at F frames/s one server keeps up with: see :mod:`framecast_bench.cameras`
for the load and :mod:`framecast_bench.slo` for the objective and the search.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from framecast_client.cli_args import positive_float, positive_int
from framecast_client.client import Client
from framecast_client.preprocess import preprocess
from framecast_client.security_cli import client_security
from framecast_client.types import ModelInfo

from framecast_bench.camera_report import CameraReport, CameraStep, FindMax, format_camera_table
from framecast_bench.camera_report import plot_cameras as plot_camera_steps
from framecast_bench.cameras import (
    CameraOpener,
    FleetOptions,
    framecast_cameras,
    oip_cameras,
    run_camera_step,
)
from framecast_bench.inputs import PreparedInputs, make_payloads
from framecast_bench.oip_sessions import OipTarget
from framecast_bench.plot import require_matplotlib
from framecast_bench.runner import BenchUnavailableError, StepConfig
from framecast_bench.sessions import stream_payloads
from framecast_bench.slo import Slo, parse_slo, search_max

DEFAULT_FPS = 30.0
DEFAULT_MAX_CAMERAS = 256
LoadInputs = Callable[[argparse.Namespace, Any], PreparedInputs]


def add_camera_arguments(
    parser: argparse.ArgumentParser, int_list: Callable[[str], tuple[int, ...]]
) -> None:
    """The options of the camera-fleet mode (``int_list`` parses ``--cameras``)."""
    fleet = parser.add_argument_group(
        "camera fleet",
        "N cameras, each a realtime stream sending open loop at --fps (Framecast: the SDK's "
        "realtime sessions; --protocol oip: ModelStreamInfer, a capture dropped while "
        "--max-in-flight frames are unanswered)",
    )
    fleet.add_argument(
        "--cameras",
        type=int_list,
        default=None,
        help="comma-separated fleet sizes, one step each (with --find-max: where the search "
        "starts, default 1)",
    )
    fleet.add_argument(
        "--fps", type=positive_float, default=DEFAULT_FPS, help="frames per second per camera"
    )
    fleet.add_argument(
        "--find-max",
        action="store_true",
        help="search the largest fleet that meets --slo and print it",
    )
    fleet.add_argument(
        "--slo",
        type=parse_slo,
        default=None,
        help='objective of each step, e.g. "p99<=100ms,drops<=1%%" (keys p50, p99, age_p50, '
        "age_p99: ms/s/us; drops: %%)",
    )
    fleet.add_argument(
        "--max-cameras",
        type=positive_int,
        default=DEFAULT_MAX_CAMERAS,
        help="--find-max tries no more cameras than this",
    )
    fleet.add_argument(
        "--max-age",
        type=positive_float,
        default=None,
        help="seconds: Framecast drops frames older than this before computing them; an "
        "answer later than this counts as expired (either protocol)",
    )
    fleet.add_argument(
        "--no-hints",
        action="store_true",
        help="Framecast: ignore the server's rate hints (drop the oldest unsent frame only)",
    )


def is_camera_run(args: argparse.Namespace) -> bool:
    """Whether the command line asks for the camera-fleet mode."""
    return args.cameras is not None or bool(args.find_max)


def _meta(args: argparse.Namespace, info: ModelInfo, inputs: PreparedInputs) -> dict[str, Any]:
    return {
        "address": args.address,
        "protocol": args.protocol,
        "model": f"{info.name} {info.version}".strip(),
        "backend": info.backend,
        "fps": args.fps,
        "max_in_flight": args.max_in_flight,
        "max_age_s": args.max_age,
        "follow_hints": not args.no_hints,
        "slo": None if args.slo is None else str(args.slo),
        "input": inputs.source,
        "inputs": len(inputs),
        "warmup_s": args.warmup,
        "window_s": args.window,
        "max_windows": args.max_windows,
        "stability_windows": args.stability_windows,
        "stability_tolerance_pct": args.stability_tolerance,
        "seed": args.seed,
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
    }


def _progress(step: CameraStep) -> None:
    verdict = "" if step.meets_slo is None else (", meets SLO" if step.meets_slo else ", missed")
    print(
        f"  {step.cameras} cameras: {step.answered_fps:.1f} frames/s answered, drops "
        f"{step.drop_pct:.2f}%, p99 {step.latency_ms.get('p99', float('nan')):.1f} ms, "
        f"{'stable' if step.stable else 'NOT stable'} after {len(step.windows)} window(s)"
        f"{verdict}",
        file=sys.stderr,
        flush=True,
    )


def _measure(
    args: argparse.Namespace, opener: CameraOpener, config: StepConfig, report: CameraReport
) -> None:
    options = FleetOptions(
        fps=args.fps,
        top_k=args.top_k,
        max_in_flight=args.max_in_flight,
        max_age_s=args.max_age,
        follow_hints=not args.no_hints,
    )
    slo: Slo | None = args.slo

    def step(cameras: int) -> CameraStep:
        figures, stable, windows = run_camera_step(
            opener, cameras, options, config, seed=args.seed + cameras
        )
        result = CameraStep.from_figures(
            cameras, args.fps, stable, figures, [w.result() for w in windows]
        )
        if slo is not None:
            result.slo_misses = slo.misses(result.slo_values())
            if result.stream_errors:
                result.slo_misses.append(f"stream errors {result.stream_errors}")
        report.steps.append(result)
        _progress(result)
        return result

    first = args.cameras[0] if args.cameras else 1
    # A cold client and server (first streams, first batches) drop frames a warm one does not:
    # measured, the first step of a run lost 1-6% of its frames and the same step repeated
    # none. One unrecorded step first, so that every step sees a warm system.
    print(f"  priming: {first} camera(s), not recorded", file=sys.stderr, flush=True)
    run_camera_step(opener, first, options, replace(config, max_windows=1), seed=args.seed)
    if not args.find_max:
        for cameras in args.cameras:
            step(cameras)
        return
    assert slo is not None
    best, at_limit, tried = search_max(lambda n: bool(step(n).meets_slo), first, args.max_cameras)
    report.find_max = FindMax(slo=str(slo), max_cameras=best, limit_reached=at_limit, tried=tried)


def _check(args: argparse.Namespace) -> None:
    if args.concurrency is not None or args.rate is not None:
        raise ValueError("--cameras runs its own open-loop streams: drop --concurrency/--rate")
    if args.find_max and args.slo is None:
        raise ValueError('--find-max needs --slo, e.g. --slo "p99<=100ms,drops<=1%"')
    first = args.cameras[0] if args.cameras else 1
    if args.find_max and first > args.max_cameras:
        raise ValueError(f"--cameras {first} exceeds --max-cameras {args.max_cameras}")


def run_cameras(args: argparse.Namespace, config: StepConfig, load_inputs: LoadInputs) -> int:
    """Run the camera-fleet mode; returns the exit status (errors raise, as ``bench``'s do)."""
    _check(args)
    if args.plot is not None:
        require_matplotlib()  # fail before the run, not after it
    if args.protocol == "oip":
        security = client_security(args)
        if security["tls"] is not None or security["token"] is not None:
            raise BenchUnavailableError(
                "--protocol oip does not take TLS or token options yet; measure the OIP "
                "endpoint on a plaintext loopback port"
            )
        with OipTarget(args.address, model=args.model, timeout=args.timeout) as target:
            info = target.discover()
            inputs = load_inputs(args, lambda image: preprocess(image, info.preprocessing))
            report = CameraReport(meta=_meta(args, info, inputs))
            _header(args, info)
            _measure(args, oip_cameras(target, make_payloads(inputs, 1)), config, report)
    else:
        with Client(args.address, timeout=args.timeout, **client_security(args)) as client:
            info = client.model_info()
            inputs = load_inputs(args, client.preprocess)
            payloads = stream_payloads(client, make_payloads(inputs, 1))
            report = CameraReport(meta=_meta(args, info, inputs))
            _header(args, info)
            _measure(args, framecast_cameras(client, payloads), config, report)
    _write(args, report)
    return 0


def _header(args: argparse.Namespace, info: ModelInfo) -> None:
    print(
        f"framecast bench {args.address} ({args.protocol}): camera fleet at {args.fps:g} fps "
        f"each, {info.name} on {info.backend}",
        file=sys.stderr,
        flush=True,
    )


def _write(args: argparse.Namespace, report: CameraReport) -> None:
    print(format_camera_table(report.steps))
    if report.find_max is not None:
        print(report.find_max.line(args.fps))
    outputs: list[tuple[Path | None, Callable[[Path], None]]] = [
        (args.json, report.write_json),
        (args.csv, report.write_csv),
        (
            args.plot,
            lambda path: plot_camera_steps(
                report.steps,
                path,
                title=f"framecast bench {args.address}: cameras at "
                f"{args.fps:g} fps ({args.protocol})",
            ),
        ),
    ]
    for path, write in outputs:
        if path is not None:
            write(path)
            print(f"wrote {path}", file=sys.stderr)
