"""Fuzz a real `framecast serve` process with malformed messages on every method.

Usage: uv run python benchmarks/fuzz_long.py [--cases 50000] [--seed 1] [--json FILE]

Starts the server (null backend) in its own process, then sends seeded malformed messages,
spread over the methods it serves: Classifier.GetModelInfo, Classify and ClassifyStream
(frames on long streams), the Open Inference Protocol's ModelInfer, Health.Check and both
reflection versions. Cases are mutations of
valid messages (truncation, flipped and inserted bytes, wrong wire types, absurd lengths,
invalid UTF-8, oversized strings, out-of-range values) and plain random bytes. After every
batch of cases one good Classify request must succeed.

Reports: the status codes seen, how many were UNKNOWN or INTERNAL (must be 0), error
messages over the bound, tracebacks in the server's log (must be 0), failed good requests,
the server's RSS before and after, and its exit code on SIGTERM. The suite runs it with a few
thousand cases (tests/server/test_fuzz.py); the figures in the issue come from 50,000.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from framecast_bench import oip_codec as oip
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire_format import encode_varint
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from PIL import Image
from serve_process import rss_mb, start_server, wait_serving

BATCH = 100  # cases between good requests
MAX_DETAILS = 512  # the server's bound on an error message
CONCURRENCY = 16
SERVER_MAX_BATCH = 8


@dataclass
class Report:
    cases: int = 0
    codes: dict[str, int] = field(default_factory=collections.Counter)
    unknown_or_internal: int = 0
    long_details: int = 0
    stream_frames: int = 0
    stream_frame_codes: dict[str, int] = field(default_factory=collections.Counter)
    streams_failed: int = 0  # ClassifyStream calls that did not answer every frame
    good_failed: int = 0
    tracebacks: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    exit_code: int | None = None
    seconds: float = 0.0


# --- case generation -------------------------------------------------------------------------

varint = encode_varint


def _valid_messages(rng: random.Random) -> dict[str, list[bytes]]:
    """Valid messages for each method, to mutate: small images mostly, a full frame or two."""
    full = np.frombuffer(rng.randbytes(224 * 224 * 3), dtype=np.uint8).reshape(224, 224, 3)
    small = np.frombuffer(rng.randbytes(4 * 4 * 3), dtype=np.uint8).reshape(4, 4, 3)
    classify = [
        wire.classify_request_bytes(small[None], top_k=3, preprocessing_id="abc"),
        wire.classify_request_bytes(full[None], top_k=1),
        pb.ClassifyRequest(images=[wire.image_to_proto(small)] * 3).SerializeToString(),
    ]
    stream = [
        pb.StreamRequest(frame_id=7, image=wire.image_to_proto(small), top_k=2).SerializeToString(),
        pb.StreamRequest(frame_id=2**63, image=wire.image_to_proto(full)).SerializeToString(),
    ]
    reflection = [
        reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="framecast.v1.Classifier"
        ).SerializeToString(),
    ]
    infer = [
        oip.infer_request(full[None], model_name="resnet50", class_count=3).SerializeToString(),
        oip.infer_request(small[None], model_name="resnet50", request_id="x").SerializeToString(),
    ]
    return {
        "ModelInfer": infer,
        "GetModelInfo": [b"", pb.GetModelInfoRequest().SerializeToString()],
        "Classify": classify,
        "ClassifyStream": stream,
        "Health": [health_pb2.HealthCheckRequest(service="").SerializeToString()],
        "Reflection": reflection,
    }


def _encoded(kind: str, size: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


_JPEG = _encoded("JPEG", 224)
_PNG = _encoded("PNG", 100)  # the wrong size


def _semantic(rng: random.Random, method: str) -> bytes:
    """Well-formed messages holding nonsense values."""
    long_text = "x" * rng.choice((65, 1000, 16_000, 100_000))
    image = pb.Image(
        data=rng.randbytes(rng.choice((0, 1, 47, 48, 150_527))),
        height=rng.choice((0, 1, 4, 224, 2**32 - 1)),
        width=rng.choice((0, 4, 224, 2**32 - 1)),
        channels=rng.choice((0, 1, 3, 4, 2**32 - 1)),
    )
    if rng.random() < 0.4:  # a compressed image: garbage, truncated, or of another size
        image.encoding = rng.choice((1, 2, 7))  # type: ignore[assignment]
        image.data = rng.choice(
            (_JPEG[: rng.randrange(len(_JPEG))], _PNG, _JPEG, b"\xff\xd8\xff" + rng.randbytes(64))
        )
    if method == "Classify":
        count = rng.choice((0, 1, SERVER_MAX_BATCH + 1, 50))
        return pb.ClassifyRequest(
            images=[image] * count,
            top_k=rng.choice((0, 1, 1000, 1001, 2**32 - 1)),
            preprocessing_id=rng.choice(("", "stale", long_text)),
        ).SerializeToString()
    if method == "ClassifyStream":
        return pb.StreamRequest(
            frame_id=rng.randrange(2**64),
            image=image,
            top_k=rng.choice((0, 5, 2**32 - 1)),
            preprocessing_id=rng.choice(("", long_text)),
        ).SerializeToString()
    if method == "ModelInfer":
        request = oip.infer_request(
            np.zeros((1, 4, 4, 3), dtype=np.uint8),
            model_name=rng.choice(("resnet50", "", long_text)),
            model_version=rng.choice(("", "1", "99", long_text)),
            request_id=rng.choice(("", long_text)),
            class_count=rng.choice((None, 0, -1, 5, 2**40)),
            input_name=rng.choice(("images", "", long_text)),
            output_name=rng.choice(("probabilities", "nope", long_text)),
        )
        request.inputs[0].datatype = rng.choice(("UINT8", "FP32", "BYTES", long_text))
        request.inputs[0].shape[:] = rng.choice(([1, 224, 224, 3], [-1], [], [2**62, 2, 2, 3]))
        if rng.random() < 0.3:
            request.raw_input_contents.append(b"extra")
        if rng.random() < 0.3:
            request.ClearField("raw_input_contents")
        infer: bytes = request.SerializeToString()
        return infer
    if method == "Health":
        health: bytes = health_pb2.HealthCheckRequest(service=long_text).SerializeToString()
        return health
    if method == "Reflection":
        named = rng.choice(("", long_text, "onnx/onnx-ml.proto"))
        asked: bytes = reflection_pb2.ServerReflectionRequest(
            file_by_filename=named
        ).SerializeToString()
        return asked
    return pb.GetModelInfoRequest().SerializeToString() + varint(8) + varint(rng.randrange(99))


def mutate(rng: random.Random, valid: list[bytes], method: str) -> bytes:
    """One malformed (or at least strange) message for ``method``."""
    base = rng.choice(valid)
    kind = rng.randrange(9)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 1 and base:  # truncated
        return base[: rng.randrange(len(base))]
    if kind == 2 and base:  # flipped bytes (in the framing, where it matters)
        data = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(min(len(data), 64))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 3:  # a random tag and value inserted
        at = rng.randrange(len(base) + 1)
        tag = varint((rng.randrange(1, 20) << 3) | rng.randrange(8))
        return base[:at] + tag + varint(rng.randrange(2**35)) + base[at:]
    if kind == 4:  # field 1 with the wrong wire type
        return varint((1 << 3) | rng.choice((0, 1, 5))) + rng.randbytes(8) + base
    if kind == 5:  # an absurd length prefix
        return varint((rng.randrange(1, 5) << 3) | 2) + varint(rng.randrange(2**31, 2**40))
    if kind == 6:  # invalid UTF-8 in a string field (field 3 or 4 in ours, 1 in health)
        number = {"Health": 1, "ClassifyStream": 4, "Reflection": 3, "ModelInfer": 1}.get(method, 3)
        bad = rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"))
        return base + varint((number << 3) | 2) + varint(len(bad)) + bad
    if kind == 7:  # end groups and reserved wire types
        return base + bytes([rng.choice((0x0C, 0x0E, 0x0F, 0x14, 0x07))])
    return _semantic(rng, method)


# --- driving the server ----------------------------------------------------------------------


class Fuzzer:
    def __init__(self, address: str, report: Report) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        self.report = report
        unary = self.channel.unary_unary  # no serializers: bytes pass through
        self.unary: dict[str, Callable[..., grpc.Future[bytes]]] = {
            "GetModelInfo": unary("/framecast.v1.Classifier/GetModelInfo").future,  # type: ignore[call-arg]
            "Classify": unary("/framecast.v1.Classifier/Classify").future,  # type: ignore[call-arg]
            "Health": unary("/grpc.health.v1.Health/Check").future,  # type: ignore[call-arg]
            "ModelInfer": unary(  # type: ignore[call-arg]
                "/inference.GRPCInferenceService/ModelInfer"
            ).future,
        }
        streams = self.channel.stream_stream
        self.streams: dict[str, Callable[..., Iterator[bytes]]] = {
            "ClassifyStream": streams("/framecast.v1.Classifier/ClassifyStream"),  # type: ignore[call-arg, dict-item]
            "Reflection": streams(  # type: ignore[call-arg, dict-item]
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            ),
            "ReflectionV1": streams(  # type: ignore[call-arg, dict-item]
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            ),
        }
        self.good = wire.classify_request_bytes(np.zeros((1, 224, 224, 3), dtype=np.uint8), top_k=1)

    def close(self) -> None:
        self.channel.close()

    def _count(self, code: grpc.StatusCode, details: str) -> None:
        report = self.report
        report.codes[code.name] += 1
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            report.unknown_or_internal += 1
        if len(details) > MAX_DETAILS:
            report.long_details += 1

    def unary_cases(self, method: str, cases: list[bytes]) -> None:
        futures = []
        for raw in cases:
            futures.append(self.unary[method](raw, timeout=30))
            if len(futures) >= CONCURRENCY:
                self._settle(futures.pop(0))
        for future in futures:
            self._settle(future)
        self.report.cases += len(cases)

    def _settle(self, future: grpc.Future[bytes]) -> None:
        try:
            future.result()
            self._count(grpc.StatusCode.OK, "")
        except grpc.RpcError as error:
            self._count(error.code(), error.details() or "")

    def stream_cases(self, method: str, cases: list[bytes]) -> None:
        report = self.report
        try:
            responses = list(self.streams[method](iter(cases), timeout=60))
        except grpc.RpcError as error:
            # Reflection ends a stream on a malformed message (INVALID_ARGUMENT); ours must not.
            self._count(error.code(), error.details() or "")
            responses = []
        else:
            self._count(grpc.StatusCode.OK, "")
        report.cases += len(cases)
        if method == "ClassifyStream":
            report.stream_frames += len(cases)
            if len(responses) != len(cases):
                report.streams_failed += 1
            for raw in responses:
                response = pb.StreamResponse.FromString(raw)
                if response.HasField("error"):
                    code = grpc.StatusCode.UNKNOWN
                    for candidate in grpc.StatusCode:
                        if candidate.value[0] == response.error.code:
                            code = candidate
                    report.stream_frame_codes[code.name] += 1
                    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                        report.unknown_or_internal += 1
                    if len(response.error.message) > MAX_DETAILS:
                        report.long_details += 1
                else:
                    report.stream_frame_codes["OK"] += 1

    def good_request(self) -> None:
        try:
            self.unary["Classify"](self.good, timeout=30).result()
        except grpc.RpcError:
            self.report.good_failed += 1


def fuzz(address: str, total: int, seed: int, report: Report) -> None:
    rng = random.Random(seed)
    valid = _valid_messages(rng)
    methods = ["GetModelInfo", "Classify", "ClassifyStream", "ModelInfer", "Health", "Reflection"]
    fuzzer = Fuzzer(address, report)
    try:
        done = 0
        while done < total:
            for method in methods:
                batch = [
                    mutate(rng, valid[method], method) for _ in range(min(BATCH, total - done))
                ]
                if not batch:
                    break
                if method in fuzzer.unary:
                    fuzzer.unary_cases(method, batch)
                elif method == "Reflection":
                    # Half to each reflection version.
                    half = len(batch) // 2
                    fuzzer.stream_cases("Reflection", batch[:half])
                    fuzzer.stream_cases("ReflectionV1", batch[half:])
                else:
                    fuzzer.stream_cases(method, batch)
                done += len(batch)
                fuzzer.good_request()
    finally:
        fuzzer.close()


# --- the server process ----------------------------------------------------------------------


def run(cases: int, seed: int, cache_dir: Path) -> Report:
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        port_file, log = Path(tmp) / "port", Path(tmp) / "server.log"
        process = start_server(cache_dir, port_file, log, "--max-batch", str(SERVER_MAX_BATCH))
        try:
            address = wait_serving(process, port_file)
            # Warm up with a few good requests so the baseline includes what serving needs.
            warm = Fuzzer(address, report)
            for _ in range(20):
                warm.good_request()
            warm.close()
            report.rss_start_mb = rss_mb(process.pid)
            started = time.monotonic()
            fuzz(address, cases, seed, report)
            report.seconds = time.monotonic() - started
            report.rss_end_mb = rss_mb(process.pid)
            process.send_signal(signal.SIGTERM)
            report.exit_code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        text = log.read_text(errors="replace")
        report.tracebacks = text.count("Traceback")
        if report.tracebacks:
            print(text[-4000:], file=sys.stderr)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50_000, help="malformed messages in all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or Path(os.environ.get("FRAMECAST_CACHE_DIR", tmp))
        report = run(args.cases, args.seed, cache_dir)
    print(f"{report.cases} malformed messages in {report.seconds:.1f} s (seed {args.seed})")
    print(f"  statuses:            {dict(sorted(report.codes.items()))}")
    print(f"  stream frame results: {dict(sorted(report.stream_frame_codes.items()))}")
    print(f"  UNKNOWN or INTERNAL: {report.unknown_or_internal}")
    print(f"  messages over {MAX_DETAILS} chars: {report.long_details}")
    print(f"  ClassifyStream calls cut short: {report.streams_failed}")
    print(f"  good requests failed: {report.good_failed}")
    print(f"  tracebacks in log:   {report.tracebacks}")
    print(f"  server RSS:          {report.rss_start_mb:.0f} -> {report.rss_end_mb:.0f} MB")
    print(f"  exit code on SIGTERM: {report.exit_code}")
    if args.json:
        args.json.write_text(json.dumps(vars(report), indent=2))
    ok = (
        report.unknown_or_internal == 0
        and report.tracebacks == 0
        and report.good_failed == 0
        and report.long_details == 0
        and report.streams_failed == 0
        and report.exit_code == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
