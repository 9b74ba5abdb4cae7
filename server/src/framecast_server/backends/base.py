"""The one interface every inference backend implements.

A backend turns a batch of preprocessed images into class probabilities. It knows nothing of
gRPC, of batching across callers or of labels: the batcher calls ``infer`` from one worker
thread, one batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray


class BackendError(RuntimeError):
    """A backend failed to load or to run a batch."""


class BackendUnavailableError(BackendError):
    """The backend cannot run on this machine (no GPU, library missing); the message says why."""


class BackendBrokenError(BackendError):
    """The backend can run nothing more in this process (e.g. a sticky CUDA error poisoned the
    GPU context); the message says why. Only a new process recovers."""


@runtime_checkable
class BreakableBackend(Protocol):
    """A backend that can break for the life of the process (the TensorRT one)."""

    def on_broken(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(reason)`` once, from any thread, when the backend breaks."""
        ...


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a backend reports about itself (shown in ModelInfo and ``framecast info``)."""

    name: str  # "onnxruntime", "tensorrt", "null"
    precision: str  # "fp32", "fp16"
    device: str  # "cpu", or the GPU's name


@runtime_checkable
class Backend(Protocol):
    """Runs the prepared model: uint8 NHWC RGB [N, H, W, 3] in, float32 probabilities [N, C] out."""

    @property
    def info(self) -> BackendInfo: ...

    @property
    def max_batch(self) -> int:
        """Largest N that ``infer`` accepts."""
        ...

    @property
    def max_concurrent_batches(self) -> int:
        """How many batches the backend overlaps: infer may run on that many threads at once.

        1 for backends that run one batch at a time (their infer only ever sees one thread).
        """
        ...

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Classify one batch; 1 <= N <= max_batch. Raises BackendError on failure."""
        ...

    def close(self) -> None:
        """Release what the backend holds; infer must not be called afterwards."""
        ...


@runtime_checkable
class GatheringBackend(Protocol):
    """A backend that gathers a batch from its parts itself, straight into its own input
    buffer (TensorRT: the pinned host memory its copies read), so the batch is built once."""

    def infer_parts(self, parts: Sequence[NDArray[np.uint8]]) -> NDArray[np.float32]:
        """Classify the images of ``parts`` ([n_i, H, W, 3] each) as one batch, in order;
        1 <= sum(n_i) <= max_batch. Raises BackendError on failure."""
        ...


@runtime_checkable
class HostRegisteringBackend(Protocol):
    """A backend whose device copies can read long-lived host memory in place once it is
    registered (TensorRT: page-locked where it lies with ``cudaHostRegister``): the parts of a
    batch that lie in registered memory are copied to the device from there, no host copy."""

    def register_host_memory(self, buffer: NDArray[np.uint8]) -> None:
        """Register ``buffer`` (1-D, contiguous); it must stay mapped until unregistered.
        Raises BackendError when the memory cannot be registered."""
        ...

    def unregister_host_memory(self, buffer: NDArray[np.uint8]) -> None:
        """Undo ``register_host_memory(buffer)`` once no batch reads it; the memory may then
        be unmapped. ``close`` unregisters what is still registered."""
        ...
