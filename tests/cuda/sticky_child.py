"""Run by test_cuda_backend in a child process: a sticky CUDA error poisons the whole process.

Serves one good batch through the TensorRTBackend (kernel engine), then makes the engine write
through a null pointer, and checks that the backend breaks for good. Prints one line; exit 0
when everything behaved.
"""

from __future__ import annotations

import importlib.util
import sys
import weakref
from pathlib import Path

import numpy as np
from framecast_server.backends.base import BackendBrokenError
from framecast_server.backends.tensorrt import EngineSettings, cuda
from framecast_server.backends.tensorrt.backend import TensorRTBackend
from trt_backend.trt_fakes import make_fake_trt


def main() -> int:
    spec = importlib.util.spec_from_file_location("kernels", Path(__file__).with_name("kernels.py"))
    if spec is None or spec.loader is None:
        raise SystemExit("kernels.py not found beside sticky_child.py")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    engine = kernels.KernelEngine()
    fake = make_fake_trt("10.13.0.35")
    fake.execute = engine
    sys.modules["tensorrt"] = fake
    original = cuda.CudaStream.__init__

    def register(self: cuda.CudaStream) -> None:
        original(self)
        engine.streams[self.handle] = weakref.ref(self)

    cuda.CudaStream.__init__ = register  # type: ignore[method-assign]
    backend = TensorRTBackend(
        b"PLAN" + (4).to_bytes(4, "little"), EngineSettings(max_batch=4), device_name="gpu"
    )
    told: list[str] = []
    backend.on_broken(told.append)
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(backend.infer(images), kernels.reference(images))
    engine.poisoned = True
    try:
        backend.infer(images)
    except BackendBrokenError as exc:
        first = str(exc)
    else:
        print("FAIL: the poisoned batch succeeded")
        return 1
    engine.poisoned = False
    try:
        backend.infer(images)
    except BackendBrokenError:
        pass
    else:
        print("FAIL: the backend served again after a sticky error")
        return 1
    backend.close()
    if told != [backend.broken]:
        print(f"FAIL: on_broken callbacks got {told!r}")
        return 1
    print(f"OK broken: {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
