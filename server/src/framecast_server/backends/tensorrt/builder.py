"""Build a TensorRT FP16 engine from the served ONNX graph.

The fp32 graph is converted to an fp16 body first (``model/fp16.py``) and parsed into a
*strongly typed* network: TensorRT then runs each layer in the type the graph says. That is the
only way that works on both TensorRT 10 (``STRONGLY_TYPED`` creation flag) and 11 (where
networks are always strongly typed and ``BuilderFlag.FP16`` no longer exists), so this module
never touches precision builder flags.

TensorRT is imported inside the functions, so importing this module costs nothing on a machine
without it; tests substitute a fake ``tensorrt`` module in ``sys.modules``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import onnx

from ...model.fp16 import convert_to_fp16
from .cache import BuildResult
from .errors import EngineBuildError, EngineMismatchError, OnnxParseError, TensorRTCallError
from .settings import INPUT_NAME, OUTPUT_NAME, EngineSettings
from .trt_logging import process_logger

if TYPE_CHECKING:
    import tensorrt as trt

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
PROGRESS_LOG_SECONDS = 10.0


def succeeded(result: object) -> bool:
    """Truth of a TensorRT status return, read through ``object``.

    tensorrt-stubs 10.13 annotate these methods ``-> bool`` inside a module that also defines a
    variable named ``bool`` (the DataType), so mypy sees a DataType and calls the negation
    always false. Routing the value through ``object`` keeps the failure branches checked.
    """
    return bool(result)


def tensorrt_major(version: str) -> int:
    """Major version from a TensorRT version string such as ``"10.13.0.35"``."""
    head = version.split(".", 1)[0]
    if not head.isdigit():
        raise EngineBuildError("tensorrt.__version__", f"cannot parse version {version!r}")
    return int(head)


def network_creation_flags(trt_module: Any) -> int:
    """Flags for ``Builder.create_network`` giving a strongly typed network on this TensorRT.

    TensorRT 11+: networks are always strongly typed; the old flag is deprecated and ignored,
    so pass none. TensorRT 10.x: set ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; without
    it the fp16 graph would be built weakly typed and TensorRT would choose precisions itself.
    Typed ``Any`` because it must handle modules lacking attributes the 10.13 stubs declare.
    """
    version = str(getattr(trt_module, "__version__", ""))
    major = tensorrt_major(version)
    if major >= 11:
        return 0
    if major == 10:
        flags_enum = getattr(trt_module, "NetworkDefinitionCreationFlag", None)
        strongly_typed = getattr(flags_enum, "STRONGLY_TYPED", None)
        if strongly_typed is None:
            raise EngineBuildError(
                "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
                f"TensorRT {version} has no strongly typed networks; install 10.3 or newer",
            )
        return 1 << int(strongly_typed)
    raise EngineBuildError("tensorrt", f"TensorRT {version} is not supported; need 10.x or 11.x")


def make_progress_monitor() -> trt.IProgressMonitor | None:
    """An IProgressMonitor logging build phases, or None if this TensorRT has none."""
    import tensorrt as trt

    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            # TensorRT may call from several builder threads.
            self._lock = threading.Lock()
            self._steps: dict[str, int] = {}
            self._last_log = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
            level = logging.INFO if parent_phase is None else logging.DEBUG
            logger.log(level, "TensorRT build: %s started (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            with self._lock:
                total = self._steps.get(phase_name, 0)
                due = now - self._last_log >= PROGRESS_LOG_SECONDS
                if due:
                    self._last_log = now
            if due:
                logger.info("TensorRT build: %s step %d/%d", phase_name, step + 1, total)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)
            logger.debug("TensorRT build: %s finished", phase_name)

    return _Progress()


@contextmanager
def _heartbeat(what: str) -> Iterator[None]:
    """Log every HEARTBEAT_SECONDS until the block ends, for builds with no progress monitor."""
    done = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            logger.info("%s: still running (%.0f s)", what, time.monotonic() - started)

    thread = threading.Thread(target=beat, name="trt-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def describe_parser_error(error: Any) -> str:
    """One line for a TensorRT ``ParserError``: node, operator and description."""
    parts: list[str] = []
    for attr in ("node_name", "node_operator"):
        getter = getattr(error, attr, None)
        if callable(getter):
            value = str(getter())
            if value:
                parts.append(value)
    where = f"node {' '.join(parts)}: " if parts else ""
    return f"{where}{error.desc()} (code {error.code()})"


def _check_network_io(network: trt.INetworkDefinition, trt_module: Any) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    if [t.name for t in inputs] != [INPUT_NAME] or [t.name for t in outputs] != [OUTPUT_NAME]:
        raise EngineMismatchError(
            "OnnxParser.parse",
            f"expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, got inputs "
            f"{[t.name for t in inputs]} and outputs {[t.name for t in outputs]}",
        )
    if inputs[0].dtype != trt_module.DataType.UINT8:
        raise EngineMismatchError(
            "OnnxParser.parse", f"input dtype is {inputs[0].dtype}, not uint8"
        )
    if outputs[0].dtype != trt_module.DataType.FLOAT:
        raise EngineMismatchError(
            "OnnxParser.parse", f"output dtype is {outputs[0].dtype}, not float32"
        )


def build_plan(
    onnx_model: onnx.ModelProto, settings: EngineSettings, timing_cache: bytes | None
) -> BuildResult:
    """Convert ``onnx_model`` to fp16 and build a serialized engine for ``settings``.

    ``timing_cache`` seeds TensorRT's kernel timings (from earlier builds on this TensorRT and
    GPU); the updated cache is returned with the plan. Raises OnnxParseError with the parser's
    descriptions, EngineBuildError when the builder fails.
    """
    import tensorrt as trt

    flags = network_creation_flags(trt)
    model_bytes = convert_to_fp16(onnx_model).SerializeToString()

    trt_logger = process_logger()
    builder = trt.Builder(trt_logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not succeeded(parser.parse(model_bytes)):
        raise OnnxParseError(
            [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        )
    _check_network_io(network, trt)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.builder_optimization_level
    # Layer precisions and formats in the plan, so the engine inspector can show (and the GPU
    # suite can check) that the layers really run in FP16. Costs a few KB of plan.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    profile = builder.create_optimization_profile()
    lo, opt, hi = settings.input_shapes()
    profile.set_shape(INPUT_NAME, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    if config.add_optimization_profile(profile) < 0:
        raise TensorRTCallError("IBuilderConfig.add_optimization_profile", "profile rejected")

    has_timing_cache = _use_timing_cache(config, timing_cache)

    monitor = make_progress_monitor()
    if monitor is not None:
        config.progress_monitor = monitor

    logger.info(
        "building TensorRT %s engine: profile %s, workspace %d MiB, optimization level %d "
        "(this takes minutes)",
        trt.__version__,
        settings.profile,
        settings.workspace_bytes >> 20,
        settings.builder_optimization_level,
    )
    with _heartbeat("TensorRT engine build") if monitor is None else _nothing():
        # The stubs say IHostMemory; the binding returns None when the build fails.
        plan = cast("trt.IHostMemory | None", builder.build_serialized_network(network, config))
    if plan is None:
        raise EngineBuildError(
            "Builder.build_serialized_network", "returned None (see TensorRT errors logged above)"
        )
    new_cache = _serialized(config.get_timing_cache()) if has_timing_cache else None
    return BuildResult(plan=bytes(plan), timing_cache=new_cache)


def _serialized(cache: trt.ITimingCache | None) -> bytes | None:
    data = cast("trt.IHostMemory | None", cache.serialize()) if cache is not None else None
    return bytes(data) if data is not None else None


def _use_timing_cache(config: trt.IBuilderConfig, stored: bytes | None) -> bool:
    """Give the build a timing cache: the stored one, else an empty one, else none at all.

    ``create_timing_cache`` returns None when TensorRT cannot read the bytes (a cache from
    another TensorRT or GPU despite its file name, or a damaged file) and, rarely, even for an
    empty cache. Timings only make builds faster, so each failure is said and the build goes on.
    Returns whether a timing cache is in use.
    """
    attempts = [stored, b""] if stored else [b""]
    for data in attempts:
        made = cast("trt.ITimingCache | None", config.create_timing_cache(data))
        if made is not None and succeeded(config.set_timing_cache(made, False)):
            return True
        if data:
            logger.warning(
                "stored TensorRT timing cache (%d bytes) unusable; building with an empty one",
                len(data),
            )
    logger.warning("TensorRT could not create a timing cache; building without one")
    return False


def combine_timing_caches(on_disk: bytes, new: bytes) -> bytes:
    """``new`` with the entries of ``on_disk`` merged in (``ITimingCache.combine``).

    Two builds (of different models) can run at once and both save the one timing cache of this
    TensorRT and GPU; merging keeps both builds' timings instead of the last writer's. Returns
    ``new`` unchanged if TensorRT cannot read or combine ``on_disk``.
    """
    import tensorrt as trt

    config = trt.Builder(process_logger()).create_builder_config()
    merged = cast("trt.ITimingCache | None", config.create_timing_cache(new))
    other = cast("trt.ITimingCache | None", config.create_timing_cache(on_disk))
    if merged is None or other is None or not succeeded(merged.combine(other, False)):
        logger.warning("could not merge the TensorRT timing cache on disk; saving this build's")
        return new
    return _serialized(merged) or new


@contextmanager
def _nothing() -> Iterator[None]:
    yield
