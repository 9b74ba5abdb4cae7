"""TensorRT FP16 on a real NVIDIA GPU: the engine's precision, accuracy against ONNX Runtime fp32,
batches in flight, and the engine cache's rebuild paths.

Every test is marked ``gpu`` and skips with ``tensorrt_unavailable_reason()`` on machines that
cannot run TensorRT. Collection imports neither tensorrt nor pycuda: the check runs inside a
fixture, at test time, and the heavy imports happen only after it passed. The engine is built
once per session; the timeout covers a build on a Jetson (set FRAMECAST_GPU_TIMEOUT to change it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framecast_server.backends.tensorrt import (
    EngineSettings,
    build_engine,
    create_tensorrt_backend,
    tensorrt_unavailable_reason,
)
from numpy.typing import NDArray

BUILD_TIMEOUT_S = int(os.environ.get("FRAMECAST_GPU_TIMEOUT", "3600"))
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(BUILD_TIMEOUT_S)]

logger = logging.getLogger(__name__)

NUM_IMAGES = 256
SETTINGS = EngineSettings(max_batch=32)
# fp32 top-1 counts as clear when it beats the runner-up by this log-probability ratio; below
# it fp16 rounding may legitimately swap the two, so those inputs are reported, not judged.
CLEAR_MARGIN = 0.05


@pytest.fixture(scope="session")
def gpu_ready() -> None:
    """Skip (with the reason) unless GPU, TensorRT runtime and pycuda are all present."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model and engine cache for the session (FRAMECAST_GPU_CACHE reuses one across runs)."""
    configured = os.environ.get("FRAMECAST_GPU_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("gpu-cache")


@pytest.fixture(scope="session")
def onnx_path(gpu_ready: None, work_dir: Path) -> Path:
    """The served ResNet-50 ONNX: pretrained weights where they can be downloaded, else the
    seeded random ones (the accuracy check judges only inputs with a clear fp32 top-1)."""
    from framecast_server.model import ModelSource, prepare_model

    prepared = prepare_model(ModelSource(), work_dir, allow_download=True)
    if not prepared.pretrained:
        logger.warning("GPU suite on random weights: %s", prepared.warning)
    return prepared.onnx_path


@pytest.fixture(scope="session")
def plan_path(onnx_path: Path, work_dir: Path) -> Path:
    """The engine, built once per session (or reused from FRAMECAST_GPU_CACHE)."""
    return build_engine(onnx_path, SETTINGS, work_dir)


@pytest.fixture(scope="session")
def backend(plan_path: Path, onnx_path: Path, work_dir: Path) -> Iterator[Any]:
    """The TensorRT backend on the session's engine."""
    b = create_tensorrt_backend(onnx_path, SETTINGS, work_dir)
    yield b
    b.close()


def natural_ish_images(n: int, seed: int = 0) -> NDArray[np.uint8]:
    """Smooth colour fields with texture: low-frequency content, unlike white noise, gives
    ResNet-50 confident predictions, so near-ties (where fp16 legitimately flips) are rare."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 7, 7, 3)).astype(np.float32)
    smooth = coarse.repeat(32, axis=1).repeat(32, axis=2)
    texture = rng.normal(0, 12, (n, 224, 224, 3))
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def layer_precisions(plan: bytes) -> list[tuple[str, str, str]]:
    """(layer name, layer type, its outputs' data types as one string) for each engine layer,
    from the engine inspector's JSON (10.x says "Format/Datatype", 11.x splits the field)."""
    import tensorrt as trt
    from framecast_server.backends.tensorrt.trt_logging import process_logger

    engine = trt.Runtime(process_logger()).deserialize_cuda_engine(plan)
    assert engine is not None
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for layer in info["Layers"]:
        if not isinstance(layer, dict):
            pytest.fail(f"engine built without detailed profiling verbosity: {layer!r}")
        outputs = json.dumps(layer.get("Outputs", []))
        layers.append((str(layer.get("Name", "")), str(layer.get("LayerType", "")), outputs))
    return layers


def test_engine_runs_its_layers_in_fp16_and_softmax_in_fp32(
    plan_path: Path, record_property: Any
) -> None:
    layers = layer_precisions(plan_path.read_bytes())
    half = [name for name, _, outputs in layers if "Half" in outputs or "FP16" in outputs]
    convolutions = [(name, out) for name, kind, out in layers if "onv" in kind]
    record_property("layers", len(layers))
    record_property("fp16_layers", len(half))
    assert len(convolutions) >= 20, [kind for _, kind, _ in layers]
    fp32_convs = [n for n, out in convolutions if "Half" not in out and "FP16" not in out]
    assert not fp32_convs, f"convolutions not in fp16: {fp32_convs[:5]}"
    softmax = [(n, out) for n, kind, out in layers if "oftmax" in kind or "oftmax" in n]
    assert softmax, "no softmax layer found"
    assert all("Float" in out or "FP32" in out for _, out in softmax), softmax


def test_fp16_engine_agrees_with_onnxruntime_fp32_where_fp32_is_clear(
    backend: Any, onnx_path: Path, record_property: Any
) -> None:
    import onnxruntime as ort

    images = natural_ish_images(NUM_IMAGES)
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = SETTINGS.max_batch
    expected = np.concatenate(
        [
            reference.run(None, {"images": images[i : i + batch]})[0]
            for i in range(0, NUM_IMAGES, batch)
        ]
    )
    got = np.concatenate(
        [backend.infer(images[i : i + batch]) for i in range(0, NUM_IMAGES, batch)]
    )
    assert got.shape == expected.shape == (NUM_IMAGES, 1000)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-2)
    top2 = np.sort(expected, axis=1)[:, -2:]
    margin = np.log(np.maximum(top2[:, 1], 1e-30)) - np.log(np.maximum(top2[:, 0], 1e-30))
    clear = margin > CLEAR_MARGIN
    same = got.argmax(axis=1) == expected.argmax(axis=1)
    agreement_clear = float(same[clear].mean()) if clear.any() else float("nan")
    max_diff = float(np.abs(got - expected).max())
    record_property("clear_inputs", int(clear.sum()))
    record_property("top1_agreement_clear", agreement_clear)
    record_property("top1_agreement_unclear", float(same[~clear].mean()) if (~clear).any() else 1)
    record_property("max_abs_probability_difference", max_diff)
    logger.info(
        "TensorRT fp16 vs ORT fp32: %d/%d inputs with a clear top-1, agreement %.4f there; "
        "%d unclear, agreement %.4f; max |dp| %.5f",
        clear.sum(),
        NUM_IMAGES,
        agreement_clear,
        (~clear).sum(),
        float(same[~clear].mean()) if (~clear).any() else 1.0,
        max_diff,
    )
    assert clear.sum() >= NUM_IMAGES // 10, f"only {clear.sum()} inputs with a clear top-1"
    assert agreement_clear >= 0.99, f"top-1 agreement {agreement_clear:.4f} on clear inputs"


def test_every_batch_size_in_the_profile(backend: Any) -> None:
    for n in (1, 2, 17, SETTINGS.max_batch):
        images = natural_ish_images(n, seed=n)
        probs = backend.infer(images)
        assert probs.shape == (n, 1000)
        # A batch's rows must not depend on what else is in the batch.
        single = backend.infer(images[:1])
        # Different batch sizes may run different fp16 kernels; 1e-2 bounds that rounding.
        np.testing.assert_allclose(probs[:1], single, atol=1e-2)


def test_batches_in_flight_equal_sequential_results(backend: Any) -> None:
    batches = [natural_ish_images(n, seed=100 + n) for n in (32, 5, 32, 1, 17, 32, 8, 32)]
    sequential = [backend.infer(b) for b in batches]
    futures = [backend.submit(b) for b in batches]  # both slots busy at once
    for one, future in zip(sequential, futures, strict=True):
        # Same engine, same shapes: the same kernels, so the same numbers.
        np.testing.assert_allclose(future.result(timeout=120), one, rtol=0, atol=1e-6)


def test_cache_reuse_then_rebuild_after_corruption(
    onnx_path: Path, work_dir: Path, plan_path: Path, backend: Any
) -> None:
    meta_path = plan_path.with_suffix(".json")
    built_at = json.loads(meta_path.read_text())["built_at"]
    mtime = plan_path.stat().st_mtime_ns

    assert build_engine(onnx_path, SETTINGS, work_dir) == plan_path
    assert plan_path.stat().st_mtime_ns == mtime  # reused, not rebuilt

    data = bytearray(plan_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan_path.write_bytes(bytes(data))
    assert build_engine(onnx_path, SETTINGS, work_dir) == plan_path  # checksum: rebuilt
    meta = json.loads(meta_path.read_text())
    assert plan_path.stat().st_size == meta["plan_size"]
    assert plan_path.read_bytes() != bytes(data)
    assert meta["built_at"] >= built_at


def test_plan_that_passes_the_checksum_but_tensorrt_refuses_is_rebuilt(
    onnx_path: Path,
    work_dir: Path,
    plan_path: Path,
    backend: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = plan_path.read_bytes()
    bad = bytearray(good)
    bad[:32] = bytes(b ^ 0xFF for b in bad[:32])  # the plan's header: TensorRT checks it
    plan_path.write_bytes(bytes(bad))
    meta_path = plan_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["plan_sha256"] = hashlib.sha256(bytes(bad)).hexdigest()  # metadata vouches for it
    meta_path.write_text(json.dumps(meta))

    with caplog.at_level(logging.WARNING):
        rebuilt = create_tensorrt_backend(onnx_path, SETTINGS, work_dir)
    try:
        assert "Runtime.deserialize_cuda_engine" in caplog.text  # TensorRT itself refused it
        assert plan_path.read_bytes() != bytes(bad)
        images = natural_ish_images(4, seed=7)
        np.testing.assert_array_equal(
            rebuilt.infer(images).argmax(axis=1), backend.infer(images).argmax(axis=1)
        )
    finally:
        rebuilt.close()
