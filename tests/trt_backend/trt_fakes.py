"""Fake ``tensorrt`` and ``pycuda.driver`` modules for device-free tests.

They model just enough behaviour to check wiring: which flags, shapes, limits and addresses the
code passes, and that bytes flow host -> "device" -> "engine" -> host through the right buffers.
The fake engine's answer is a one-hot at (sum of the image's bytes) % 1000, so a test can tell
whether each image's row came back in the right place.
"""

from __future__ import annotations

import itertools
import types
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

INPUT_SHAPE = [-1, 224, 224, 3]


def expected_class(images: NDArray[np.uint8]) -> NDArray[np.int64]:
    """The fake engine's top-1 for each image."""
    sums: NDArray[np.int64] = images.reshape(images.shape[0], -1).sum(axis=1, dtype=np.int64)
    return sums % 1000


# --- pycuda.driver ---------------------------------------------------------------------------


class FakeCudaError(Exception):
    """Stands in for pycuda.driver.Error."""


class _HostBuffer(np.ndarray[Any, Any]):
    freed = False

    def free(self) -> None:
        self.freed = True


class FakeDriver(types.ModuleType):
    """A fake pycuda.driver: device memory is a dict of bytearrays keyed by fake address."""

    Error = FakeCudaError

    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        self.memory: dict[int, bytearray] = {}
        self.freed: list[int] = []
        self.fail_on: set[str] = set()
        self.calls: list[str] = []
        self.contexts_detached = 0
        self._addresses = itertools.count(0x1000, 0x100000)
        driver = self

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return "Fake GPU 9000"

            def compute_capability(self) -> tuple[int, int]:
                return (8, 9)

            def retain_primary_context(self) -> Any:
                return _Context()

        class _Context:
            def push(self) -> None:
                driver._record("Context.push")

            def detach(self) -> None:
                driver._record("Context.detach")
                driver.contexts_detached += 1

        class Context:
            @staticmethod
            def pop() -> None:
                driver._record("Context.pop")

        class Stream:
            _handles = itertools.count(1)

            def __init__(self) -> None:
                driver._record("Stream")
                self.handle = next(self._handles)

            def synchronize(self) -> None:
                driver._record("Stream.synchronize")

        class _Allocation:
            def __init__(self, address: int) -> None:
                self.address = address

            def __int__(self) -> int:
                return self.address

            def free(self) -> None:
                driver.freed.append(self.address)

        self.Device = Device
        self.Context = Context
        self.Stream = Stream
        self._Allocation = _Allocation

    def _record(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail_on:
            raise FakeCudaError(f"{name}: CUDA_ERROR_ILLEGAL_ADDRESS")

    def init(self) -> None:
        self._record("init")

    def mem_alloc(self, nbytes: int) -> Any:
        self._record("mem_alloc")
        address = next(self._addresses)
        self.memory[address] = bytearray(nbytes)
        return self._Allocation(address)

    def pagelocked_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> NDArray[Any]:
        self._record("pagelocked_empty")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        # Like pycuda: the array's .base is the host allocation, which has free().
        return np.zeros(nbytes, np.uint8).view(_HostBuffer).view(dtype).reshape(shape)

    def memcpy_htod_async(self, dst: int, src: NDArray[Any], stream: Any) -> None:
        self._record("memcpy_htod_async")
        self.memory[dst][: src.nbytes] = src.tobytes()

    def memcpy_dtoh_async(self, dst: NDArray[Any], src: int, stream: Any) -> None:
        self._record("memcpy_dtoh_async")
        raw = bytes(self.memory[src][: dst.nbytes])
        dst[...] = np.frombuffer(raw, dst.dtype).reshape(dst.shape)


# --- tensorrt --------------------------------------------------------------------------------


class _Enum:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


def make_fake_trt(version: str, *, strongly_typed_flag: bool = True) -> Any:
    """A fake ``tensorrt`` module of the given version; state lives on the module object."""
    trt: Any = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.events = []
    trt.parser_errors = []
    trt.fail_build = False
    trt.parsed_model = None
    trt.driver_memory = None  # set by tests that run the fake engine

    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (
            _Enum(n, i)
            for i, n in enumerate(["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])
        )

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]
    trt.ILogger = ILogger

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    trt.IProgressMonitor = IProgressMonitor
    if strongly_typed_flag:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(
            EXPLICIT_BATCH=_Enum("EXPLICIT_BATCH", 0), STRONGLY_TYPED=_Enum("STRONGLY_TYPED", 1)
        )
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=_Enum("WORKSPACE", 0))
    trt.DataType = types.SimpleNamespace(
        FLOAT=_Enum("FLOAT", 0), HALF=_Enum("HALF", 1), UINT8=_Enum("UINT8", 5)
    )
    trt.TensorIOMode = types.SimpleNamespace(INPUT=_Enum("INPUT", 1), OUTPUT=_Enum("OUTPUT", 2))
    onnx_to_trt: dict[int, _Enum] = {
        onnx.TensorProto.UINT8: trt.DataType.UINT8,
        onnx.TensorProto.FLOAT: trt.DataType.FLOAT,
        onnx.TensorProto.FLOAT16: trt.DataType.HALF,
    }

    class Dims(list):  # type: ignore[type-arg]
        pass

    trt.Dims = Dims

    class _Tensor:
        def __init__(self, name: str, dtype: _Enum) -> None:
            self.name, self.dtype = name, dtype

    class _Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[_Tensor] = []
            self.outputs: list[_Tensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> _Tensor:
            return self.inputs[i]

        def get_output(self, i: int) -> _Tensor:
            return self.outputs[i]

    class _ParserError:
        def __init__(self, node: str, op: str, desc: str) -> None:
            self._node, self._op, self._desc = node, op, desc

        def node_name(self) -> str:
            return self._node

        def node_operator(self) -> str:
            return self._op

        def desc(self) -> str:
            return self._desc

        def code(self) -> str:
            return "UNSUPPORTED_NODE"

    class OnnxParser:
        def __init__(self, network: _Network, logger: Any) -> None:
            self.network = network
            self.errors: list[_ParserError] = []

        def parse(self, data: bytes) -> bool:
            model = onnx.ModelProto.FromString(data)
            trt.parsed_model = model
            if trt.parser_errors:
                self.errors = [_ParserError(*e) for e in trt.parser_errors]
                return False

            def tensor(vi: onnx.ValueInfoProto) -> _Tensor:
                return _Tensor(vi.name, onnx_to_trt[vi.type.tensor_type.elem_type])

            self.network.inputs = [tensor(vi) for vi in model.graph.input]
            self.network.outputs = [tensor(vi) for vi in model.graph.output]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> _ParserError:
            return self.errors[i]

    trt.OnnxParser = OnnxParser

    class _Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

        def set_shape(self, name: str, lo: Dims, opt: Dims, hi: Dims) -> None:
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class _TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"+timed"

    class _Config:
        def __init__(self) -> None:
            self.pools: dict[str, int] = {}
            self.builder_optimization_level = -1
            self.profiles: list[_Profile] = []
            self.timing_cache: _TimingCache | None = None
            self.progress_monitor: Any = None

        def set_memory_pool_limit(self, pool: _Enum, size: int) -> None:
            self.pools[pool.name] = size

        def add_optimization_profile(self, profile: _Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> _TimingCache:
            return _TimingCache(data)

        def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> _TimingCache:
            assert self.timing_cache is not None
            return self.timing_cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> _Network:
            trt.events.append(("create_network", flags))
            return _Network(flags)

        def create_builder_config(self) -> _Config:
            return _Config()

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
            trt.events.append(("build", network, config))
            if trt.fail_build:
                return None
            (profile,) = config.profiles
            max_batch = profile.shapes["images"][2][0]
            return b"PLAN" + max_batch.to_bytes(4, "little")

    trt.Builder = Builder

    class _ExecutionContext:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream: int) -> bool:
            memory = trt.driver_memory
            n = self.shapes["images"][0]
            raw = bytes(memory[self.addresses["images"]][: n * 224 * 224 * 3])
            images = np.frombuffer(raw, np.uint8).reshape(n, 224, 224, 3)
            out = np.zeros((n, 1000), np.float32)
            out[np.arange(n), expected_class(images)] = 1.0
            memory[self.addresses["probabilities"]][: out.nbytes] = out.tobytes()
            return True

    class _Engine:
        def __init__(self, max_batch: int) -> None:
            self.max_batch = max_batch
            self.io = {
                "images": (trt.TensorIOMode.INPUT, trt.DataType.UINT8, INPUT_SHAPE),
                "probabilities": (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT, [-1, 1000]),
            }
            self.contexts: list[_ExecutionContext] = []

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, i: int) -> str:
            return list(self.io)[i]

        def get_tensor_mode(self, name: str) -> _Enum:
            mode: _Enum = self.io[name][0]
            return mode

        def get_tensor_dtype(self, name: str) -> _Enum:
            dtype: _Enum = self.io[name][1]
            return dtype

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self.io[name][2])

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[Dims]:
            rest = INPUT_SHAPE[1:]
            return [Dims([1, *rest]), Dims([self.max_batch, *rest]), Dims([self.max_batch, *rest])]

        def create_execution_context(self) -> _ExecutionContext:
            context = _ExecutionContext()
            self.contexts.append(context)
            return context

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
            if not plan.startswith(b"PLAN"):
                return None
            engine = _Engine(int.from_bytes(plan[4:8], "little"))
            trt.engine = engine
            return engine

    trt.Runtime = Runtime
    trt._Engine = _Engine
    return trt
