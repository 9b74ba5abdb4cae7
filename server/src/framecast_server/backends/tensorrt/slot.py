"""One slot of the TensorRT backend: an execution context with its own stream and buffers,
and the engine's input/output layout they are sized from.

Kept apart from backend.py, which schedules batches over the slots on its worker thread: a
slot only queues one batch's copies and inference on its stream and reads the result back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from numpy.typing import NDArray

from . import cuda
from .builder import succeeded
from .errors import EngineMismatchError, TensorRTCallError
from .settings import CHANNELS, IMAGE_SIZE, INPUT_NAME, NUM_CLASSES, OUTPUT_NAME

if TYPE_CHECKING:
    import tensorrt as trt

_FRAME_BYTES = IMAGE_SIZE * IMAGE_SIZE * CHANNELS


def tensor_nbytes(shape: Sequence[int], itemsize: int, batch: int) -> int:
    """Bytes of one I/O tensor at ``batch``: the engine shape with its dynamic dim 0 set.

    ``shape`` is the engine's tensor shape, e.g. ``(-1, 224, 224, 3)``; only dim 0 may be
    dynamic (-1), as in the served graph.
    """
    dims = list(shape)
    if not dims:
        raise EngineMismatchError("ICudaEngine.get_tensor_shape", "scalar I/O tensor")
    if any(d < 0 for d in dims[1:]):
        raise EngineMismatchError(
            "ICudaEngine.get_tensor_shape", f"only the batch dim may be dynamic, got {dims}"
        )
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    return batch * math.prod(dims[1:]) * itemsize


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple (the stubs give Dims indexing and len, not iteration)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


@dataclass(frozen=True, slots=True)
class IOLayout:
    """Per-tensor buffer sizes for ``max_batch``, checked against the served contract."""

    max_batch: int
    input_bytes: int
    output_bytes: int


def check_engine_io(engine: trt.ICudaEngine, max_batch: int) -> IOLayout:
    """Verify the engine has exactly uint8 ``images`` in and fp32 ``probabilities`` out.

    Also checks the engine's optimization profile admits ``max_batch``. Returns the buffer
    sizes for ``max_batch``. Raises EngineMismatchError naming what differs.
    """
    import tensorrt as trt

    tensors = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        tensors[name] = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name))
    expected = {
        INPUT_NAME: (trt.TensorIOMode.INPUT, trt.DataType.UINT8),
        OUTPUT_NAME: (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT),
    }
    if tensors != expected:
        raise EngineMismatchError(
            "ICudaEngine.get_tensor_mode/get_tensor_dtype",
            f"engine I/O is {tensors}, expected {expected}",
        )
    in_shape = dims_tuple(engine.get_tensor_shape(INPUT_NAME))
    out_shape = dims_tuple(engine.get_tensor_shape(OUTPUT_NAME))
    if in_shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, CHANNELS) or out_shape[1:] != (NUM_CLASSES,):
        raise EngineMismatchError(
            "ICudaEngine.get_tensor_shape", f"engine shapes are {in_shape} -> {out_shape}"
        )
    profile_max = dims_tuple(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2])
    if profile_max[0] < max_batch:
        raise EngineMismatchError(
            "ICudaEngine.get_tensor_profile_shape",
            f"engine profile max batch is {profile_max[0]}, settings ask for {max_batch}",
        )
    return IOLayout(
        max_batch=max_batch,
        input_bytes=tensor_nbytes(in_shape, np.dtype(np.uint8).itemsize, max_batch),
        output_bytes=tensor_nbytes(out_shape, np.dtype(np.float32).itemsize, max_batch),
    )


class Slot:
    """One execution context with its own stream and buffers (all sized for max_batch)."""

    def __init__(self, engine: trt.ICudaEngine, layout: IOLayout) -> None:
        self.stream: cuda.CudaStream | None = None
        self.buffers: list[cuda.DeviceBuffer] = []
        self.pinned: list[cuda.PinnedArray] = []
        context = cast("trt.IExecutionContext | None", engine.create_execution_context())
        if context is None:  # the binding returns None when it cannot allocate activations
            raise TensorRTCallError("ICudaEngine.create_execution_context", "returned None")
        self.context: trt.IExecutionContext | None = context
        self.stream = cuda.CudaStream()
        n = layout.max_batch
        self.host_in = cuda.PinnedArray((n, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), np.uint8)
        self.host_out = cuda.PinnedArray((n, NUM_CLASSES), np.float32)
        self.pinned = [self.host_in, self.host_out]
        self.dev_in = cuda.DeviceBuffer(layout.input_bytes)
        self.dev_out = cuda.DeviceBuffer(layout.output_bytes)
        self.buffers = [self.dev_in, self.dev_out]

    def enqueue(
        self,
        parts: Sequence[NDArray[np.uint8]],
        n: int,
        registered: Sequence[cuda.RegisteredHostMemory] = (),
    ) -> None:
        """Queue copy-in, inference and copy-out of one batch of ``n`` images on this slot's
        stream. Parts in ``registered`` memory are copied to the device from where they lie;
        the others are gathered straight into the pinned input buffer (the batch's only host
        copy) and copied from there."""
        assert self.context is not None, "slot used after free"
        assert self.stream is not None, "slot used after free"
        host_in = self.host_in.array[:n]
        # The batch's copies, each a run of adjacent parts: [region or None (gathered into
        # host_in), source byte address or first image, bytes, byte offset in the batch].
        runs: list[list[Any]] = []
        offset = 0
        for part in parts:
            count = part.shape[0]
            at = offset * _FRAME_BYTES
            region = next((r for r in registered if r.holds(part)), None)
            last = runs[-1] if runs else None
            if region is None:
                np.copyto(host_in[offset : offset + count], part)
                if last is not None and last[0] is None:
                    last[2] += part.nbytes
                else:
                    runs.append([None, offset, part.nbytes, at])
            else:
                address = int(part.__array_interface__["data"][0])
                if last is not None and last[0] is region and last[1] + last[2] == address:
                    last[2] += part.nbytes  # the next frames in the region: one copy for both
                else:
                    runs.append([region, address, part.nbytes, at])
            offset += count
        for region, start, nbytes, at in runs:
            if region is None:
                source = host_in[start : start + nbytes // _FRAME_BYTES]
            else:
                source = region.view(start, nbytes)
            cuda.copy_to_device_async(self.dev_in, source, self.stream, at)
        ctx = self.context
        if not succeeded(ctx.set_input_shape(INPUT_NAME, (n, IMAGE_SIZE, IMAGE_SIZE, CHANNELS))):
            raise TensorRTCallError("IExecutionContext.set_input_shape", f"batch {n} rejected")
        for name, buffer in ((INPUT_NAME, self.dev_in), (OUTPUT_NAME, self.dev_out)):
            if not succeeded(ctx.set_tensor_address(name, buffer.address)):
                raise TensorRTCallError("IExecutionContext.set_tensor_address", name)
        if not succeeded(ctx.execute_async_v3(self.stream.handle)):
            raise TensorRTCallError("IExecutionContext.execute_async_v3", f"batch of {n}")
        cuda.copy_to_host_async(self.host_out.array[:n], self.dev_out, self.stream)

    def collect(self, n: int) -> NDArray[np.float32]:
        """Wait for this slot's stream and return a copy of the first ``n`` output rows."""
        assert self.stream is not None
        self.stream.synchronize()
        # Copy: the pinned buffer is overwritten by the next batch on this slot.
        out: NDArray[np.float32] = np.array(self.host_out.array[:n], dtype=np.float32, copy=True)
        return out

    def free(self) -> None:
        """Free device and pinned memory and drop the context and stream (context current)."""
        self.context = None
        for buffer in self.buffers:
            buffer.free()
        for pinned in self.pinned:
            pinned.free()
        self.stream = None
