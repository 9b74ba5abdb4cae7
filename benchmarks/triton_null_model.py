"""A local Triton for benchmarks/protocols.py: nvidia-pytriton's bundled server, a Python model.

Run by the benchmark with an interpreter that has nvidia-pytriton installed (it pins numpy<2, so
it lives in its own environment, not in the workspace's lock):

    python benchmarks/triton_null_model.py PORT_FILE GRPC_PORT HTTP_PORT METRICS_PORT

The model is Framecast's null backend's counterpart: input ``images`` UINT8 [-1, 224, 224, 3],
output ``probabilities`` FP32 [-1, 1000], a fixed distribution whatever the frame, computed by a
Python function (Triton's python backend through PyTriton). It imports nothing of Framecast.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

CLASSES = 1000
_WEIGHTS = 1.0 / np.arange(1, CLASSES + 1, dtype=np.float64) ** 2
ROW = (_WEIGHTS / _WEIGHTS.sum()).astype(np.float32)


@batch  # type: ignore[untyped-decorator]
def infer(images: np.ndarray) -> dict[str, Any]:
    return {"probabilities": np.broadcast_to(ROW, (images.shape[0], CLASSES)).copy()}


def main() -> int:
    port_file = Path(sys.argv[1])
    grpc_port, http_port, metrics_port = (int(p) for p in sys.argv[2:5])
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        http_address="127.0.0.1",
        http_port=http_port,
        metrics_port=metrics_port,
        allow_gpu_metrics=False,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="resnet50",
            infer_func=infer,
            inputs=[Tensor(name="images", dtype=np.uint8, shape=(224, 224, 3))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(CLASSES,))],
            # As Framecast's batcher: dispatch at once when free, batches form while busy.
            config=ModelConfig(max_batch_size=32, batcher=DynamicBatcher()),
            strict=True,
        )
        triton.run()
        port_file.write_text(str(grpc_port))
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
