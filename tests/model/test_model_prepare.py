"""prepare_model: source order, the loud random fallback, and the on-disk build cache."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from filelock import FileLock
from framecast_server.model import (
    DEFAULT_MODEL_PRESET,
    PRESETS,
    ModelSource,
    Preset,
    WeightsError,
    WeightsUnavailableError,
    imagenet_labels,
    prepare_model,
    random_weights,
    wrap_external_onnx,
)
from framecast_server.model import prepare as prepare_module
from numpy.typing import NDArray
from safetensors.numpy import save_file
from support import wait_until

from .model_helpers import HUB_PATH, FakeHub, photo_like, run_onnx, tiny_classifier


@dataclass
class FakeBuilder:
    """Stands in for the ResNet-50 builder: records its inputs, returns a tiny valid graph."""

    calls: list[tuple[Mapping[str, NDArray[Any]], Preset]] = field(default_factory=list)
    fail: bool = False

    def __call__(self, weights: Mapping[str, NDArray[Any]], preset: Preset) -> onnx.ModelProto:
        if self.fail:
            raise AssertionError("the builder must not run")
        self.calls.append((weights, preset))
        return wrap_external_onnx(tiny_classifier().model, preset)


# random_weights is deterministic; memoizing it spares each cache test a second of numpy.
_memo_random_weights = functools.lru_cache(maxsize=8)(random_weights)


@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch) -> FakeBuilder:
    builder = FakeBuilder()
    monkeypatch.setattr(prepare_module, "build_resnet50", builder)
    monkeypatch.setattr(prepare_module, "random_weights", _memo_random_weights)
    return builder


def published(cache_dir: Path) -> list[str]:
    prepared = cache_dir / "prepared"
    if not prepared.exists():
        return []
    return sorted(p.suffix for p in prepared.iterdir() if p.suffix in (".onnx", ".json"))


# --- the default source and its random fallback ------------------------------------------------


def test_random_fallback_when_downloads_are_disabled(
    tmp_path: Path, fake_builder: FakeBuilder, fake_hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    prepared = prepare_model(ModelSource(), tmp_path, allow_download=False)
    assert prepared.pretrained is False
    assert prepared.warning == (
        "RANDOM WEIGHTS: could not download pretrained ResNet-50 weights (downloads are "
        "disabled and the weights are not cached); predictions are meaningless"
    )
    assert any(
        r.levelno == logging.WARNING and prepared.warning in r.getMessage() for r in caplog.records
    )
    assert prepared.weights_source == "random (seed 0)"
    assert prepared.name == "resnet50-random"
    assert prepared.preset == DEFAULT_MODEL_PRESET
    assert prepared.labels == imagenet_labels()
    assert prepared.onnx_path.parent == tmp_path / "prepared"
    assert prepared.onnx_path.is_file()
    meta = json.loads(prepared.onnx_path.with_suffix(".json").read_text())
    assert meta["key"] == prepared.onnx_path.stem
    assert meta["version"] == prepared.version == prepared.onnx_path.stem[:12]
    assert meta["warning"] == prepared.warning
    assert meta["pretrained"] is False
    assert Preset.from_dict(meta["preset"]) == DEFAULT_MODEL_PRESET
    # Random weights, calibrated for the preset actually served.
    ((weights, preset),) = fake_builder.calls
    assert preset == DEFAULT_MODEL_PRESET
    assert len(weights) == 267
    assert fake_hub.requests == []


def test_random_fallback_in_hub_offline_mode(
    tmp_path: Path, fake_builder: FakeBuilder, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepared = prepare_model(ModelSource(), tmp_path)
    assert prepared.pretrained is False
    assert "(HF_HUB_OFFLINE is set and the weights are not cached)" in prepared.warning
    assert fake_hub.requests == []


def test_random_fallback_when_the_hub_is_unreachable(
    tmp_path: Path, fake_builder: FakeBuilder, closed_port_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url)
    start = time.monotonic()
    prepared = prepare_model(ModelSource(), tmp_path)
    assert time.monotonic() - start < 30.0
    assert prepared.pretrained is False
    assert prepared.warning.startswith("RANDOM WEIGHTS: could not download")
    assert "cannot reach http://127.0.0.1" in prepared.warning


def test_default_source_downloads_pretrained_weights(
    tmp_path: Path,
    fake_builder: FakeBuilder,
    fake_hub: FakeHub,
    weights_file: Path,
    tv_weights: dict[str, NDArray[np.float32]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_hub.serve_file(HUB_PATH, weights_file.read_bytes())
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    prepared = prepare_model(ModelSource(), tmp_path)
    assert prepared.pretrained is True
    assert prepared.warning == ""
    assert prepared.weights_source == "timm/resnet50.tv2_in1k"
    assert prepared.name == "resnet50.tv2_in1k"
    assert prepared.preset == DEFAULT_MODEL_PRESET
    assert (tmp_path / "weights" / "resnet50.tv2_in1k.safetensors").is_file()
    ((weights, _),) = fake_builder.calls
    assert all(np.array_equal(weights[n], tv_weights[n]) for n in tv_weights)

    # Restart: weights and graph both come from the cache.
    fake_builder.fail = True
    again = prepare_model(ModelSource(), tmp_path)
    assert again == prepared
    assert fake_hub.requests == [HUB_PATH]


# --- the build cache -----------------------------------------------------------------------------


def test_second_call_reuses_the_cached_build(tmp_path: Path, fake_builder: FakeBuilder) -> None:
    first = prepare_model(ModelSource(), tmp_path, allow_download=False)
    mtime = first.onnx_path.stat().st_mtime_ns
    fake_builder.fail = True
    second = prepare_model(ModelSource(), tmp_path, allow_download=False)
    assert second == first
    assert second.onnx_path.stat().st_mtime_ns == mtime
    assert len(fake_builder.calls) == 1
    assert published(tmp_path) == [".json", ".onnx"]


def test_an_incomplete_cache_entry_is_rebuilt(tmp_path: Path, fake_builder: FakeBuilder) -> None:
    first = prepare_model(ModelSource(), tmp_path, allow_download=False)
    first.onnx_path.unlink()
    second = prepare_model(ModelSource(), tmp_path, allow_download=False)
    assert second == first
    assert second.onnx_path.is_file()
    assert len(fake_builder.calls) == 2


def test_cache_key_covers_seed_and_preset(tmp_path: Path, fake_builder: FakeBuilder) -> None:
    base = prepare_model(ModelSource(), tmp_path, allow_download=False, seed=0)
    other_seed = prepare_model(ModelSource(), tmp_path, allow_download=False, seed=1)
    other_preset = prepare_model(ModelSource(preset="caffe"), tmp_path, allow_download=False)
    versions = {base.version, other_seed.version, other_preset.version}
    assert len(versions) == 3
    assert other_seed.weights_source == "random (seed 1)"
    assert other_preset.preset == PRESETS["caffe"]
    assert len(fake_builder.calls) == 3


def test_concurrent_preparations_build_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = tiny_classifier()
    path = tmp_path / "user.onnx"
    onnx.save_model(tiny.model, str(path))
    calls: list[float] = []
    attempts: list[str] = []
    real_wrap = prepare_module.wrap_external_onnx  # type: ignore[attr-defined]

    class WatchedLock(FileLock):
        def acquire(self, *args: Any, **kwargs: Any) -> Any:
            attempts.append(threading.current_thread().name)
            return super().acquire(*args, **kwargs)

    def build_once_the_other_waits(model: onnx.ModelProto, preset: Preset) -> onnx.ModelProto:
        calls.append(time.monotonic())
        # The builder holds the lock until the other thread is at it: no timing assumed.
        wait_until(lambda: len(attempts) == 2, "the other thread to reach the lock")
        return real_wrap(model, preset)

    monkeypatch.setattr(prepare_module, "FileLock", WatchedLock)
    monkeypatch.setattr(prepare_module, "wrap_external_onnx", build_once_the_other_waits)
    results: list[Any] = []
    barrier = threading.Barrier(2)

    def prepare() -> None:
        barrier.wait()
        results.append(prepare_model(ModelSource(kind="onnx", path=path), tmp_path / "cache"))

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2
    assert results[0] == results[1]
    assert len(calls) == 1


# --- user weights and user ONNX --------------------------------------------------------------


@pytest.mark.slow
def test_user_weights_build_the_real_graph(
    tmp_path: Path, weights_file: Path, tv_model: onnx.ModelProto
) -> None:
    prepared = prepare_model(ModelSource(kind="weights", path=weights_file), tmp_path)
    assert prepared.pretrained is True
    assert prepared.weights_source == str(weights_file)
    assert prepared.warning == ""
    assert prepared.preset == PRESETS["torchvision"]
    images = photo_like(2, seed=21)
    np.testing.assert_allclose(
        run_onnx(prepared.onnx_path, images), run_onnx(tv_model, images), rtol=1e-6, atol=1e-9
    )


def test_user_weights_that_do_not_fit(tmp_path: Path, fake_builder: FakeBuilder) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"fc.weight": np.zeros((10, 2048), np.float32)}, str(path))
    with pytest.raises(WeightsError, match="missing 266"):
        prepare_model(ModelSource(kind="weights", path=path), tmp_path / "cache")
    assert published(tmp_path / "cache") == []


def test_user_onnx(tmp_path: Path) -> None:
    tiny = tiny_classifier(layout="NHWC", weight_scale=1.0 / 58.0)
    path = tmp_path / "keras_resnet50.onnx"
    onnx.save_model(tiny.model, str(path))
    prepared = prepare_model(ModelSource(kind="onnx", path=path, preset="caffe"), tmp_path / "c")
    assert prepared.pretrained is True
    assert prepared.weights_source == str(path)
    assert prepared.name == "keras_resnet50"
    assert prepared.warning == ""
    assert prepared.preset == PRESETS["caffe"]
    images = photo_like(3, seed=8)
    actual = run_onnx(prepared.onnx_path, images)
    expected = tiny.expected(images, PRESETS["caffe"])
    assert np.max(np.abs(actual - expected) / expected) < 1e-4

    # New content under the same path is a new model.
    onnx.save_model(tiny_classifier(layout="NHWC", seed=1).model, str(path))
    changed = prepare_model(ModelSource(kind="onnx", path=path, preset="caffe"), tmp_path / "c")
    assert changed.version != prepared.version


def test_user_onnx_with_external_data_is_a_new_model_when_the_data_changes(
    tmp_path: Path,
) -> None:
    # Large exports keep their weights beside the graph; new weights under the same file
    # names must not be served from the cache as the old model.
    path = tmp_path / "big.onnx"

    def export(seed: int) -> None:
        # As a fresh export would: onnx appends to a data file that is already there.
        (tmp_path / "big.onnx.data").unlink(missing_ok=True)
        onnx.save_model(
            tiny_classifier(layout="NHWC", seed=seed).model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="big.onnx.data",
            size_threshold=0,
        )

    export(seed=0)
    graph_bytes = path.read_bytes()
    first = prepare_model(ModelSource(kind="onnx", path=path), tmp_path / "c")
    export(seed=1)
    assert path.read_bytes() == graph_bytes  # only the data file differs
    second = prepare_model(ModelSource(kind="onnx", path=path), tmp_path / "c")
    assert second.version != first.version
    images = photo_like(2, seed=3)
    assert not np.allclose(run_onnx(first.onnx_path, images), run_onnx(second.onnx_path, images))
    # Unchanged files are the same model.
    again = prepare_model(ModelSource(kind="onnx", path=path), tmp_path / "c")
    assert again.version == second.version


def test_user_onnx_with_a_frozen_batch_size_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "batch1.onnx"
    onnx.save_model(tiny_classifier(baked_batch_reshape=True).model, str(path))
    with pytest.raises(ValueError, match="fails a test run on ONNX Runtime"):
        prepare_model(ModelSource(kind="onnx", path=path), tmp_path / "cache")
    assert published(tmp_path / "cache") == []


def test_user_file_that_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\x01 certainly not a protobuf \xff" * 10)
    with pytest.raises(ValueError, match=r"cannot read .*model\.onnx as an ONNX model"):
        prepare_model(ModelSource(kind="onnx", path=path), tmp_path / "cache")
    assert published(tmp_path / "cache") == []


def test_missing_user_files(tmp_path: Path) -> None:
    for kind in ("onnx", "weights"):
        with pytest.raises(FileNotFoundError, match="absent"):
            prepare_model(ModelSource(kind=kind, path=tmp_path / "absent"), tmp_path)


def test_model_source_validation() -> None:
    assert ModelSource().resolved_preset() == DEFAULT_MODEL_PRESET
    assert ModelSource(kind="weights", path=Path("w")).resolved_preset() == PRESETS["torchvision"]
    assert ModelSource(kind="onnx", path="m.onnx").path == Path("m.onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a path"):
        ModelSource(kind="onnx")
    with pytest.raises(ValueError, match="takes no path"):
        ModelSource(path=Path("x"))
    with pytest.raises(ValueError, match="unknown preset"):
        ModelSource(kind="onnx", path=Path("m.onnx"), preset="keras")
    with pytest.raises(ValueError, match="kind must be one of"):
        ModelSource(kind="tflite")  # type: ignore[arg-type]


def test_cached_weights_failing_their_checksum_offline_are_not_served_as_pretrained(
    tmp_path: Path, fake_builder: FakeBuilder, weights_file: Path
) -> None:
    cached = tmp_path / "weights" / "resnet50.tv2_in1k.safetensors"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(weights_file.read_bytes())  # a file with no recorded checksum
    prepared = prepare_model(ModelSource(), tmp_path, allow_download=False)
    assert prepared.pretrained is False
    assert "fail their published checksum" in prepared.warning
    assert not cached.exists()


def test_require_pretrained_refuses_random_weights(
    tmp_path: Path, fake_builder: FakeBuilder
) -> None:
    with pytest.raises(WeightsUnavailableError, match="pretrained weights are required"):
        prepare_model(ModelSource(require_pretrained=True), tmp_path, allow_download=False)
    assert fake_builder.calls == []


def test_resize_size_sets_the_resize_of_user_weights(weights_file: Path) -> None:
    source = ModelSource(kind="weights", path=weights_file, resize_size=232)
    preset = source.resolved_preset()
    assert preset.resize_size == 232
    assert preset.name == "torchvision"
    assert ModelSource(kind="weights", path=weights_file).resolved_preset().resize_size == 256
    with pytest.raises(ValueError, match="default model has its own resize"):
        ModelSource(resize_size=232)
    with pytest.raises(ValueError, match="stretches"):
        ModelSource(kind="onnx", path=weights_file, preset="caffe", resize_size=232)
    with pytest.raises(ValueError, match="input_size <= resize_size"):
        ModelSource(kind="weights", path=weights_file, resize_size=200)
