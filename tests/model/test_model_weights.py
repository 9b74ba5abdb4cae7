"""Weights: the expected state dict, random weights, and safetensors loading with validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from framecast_server.model import (
    PRESETS,
    WeightsError,
    expected_shapes,
    load_safetensors,
    random_weights,
)
from numpy.typing import NDArray
from safetensors.numpy import save_file

Weights = dict[str, NDArray[np.float32]]


def test_expected_shapes_match_torchvision_resnet50() -> None:
    shapes = expected_shapes()
    # 53 convolutions, 53 batch norms with 4 tensors each, fc weight and bias.
    assert len(shapes) == 53 + 53 * 4 + 2
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["bn1.running_var"] == (64,)
    assert shapes["layer1.0.conv1.weight"] == (64, 64, 1, 1)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer1.1.conv1.weight"] == (64, 256, 1, 1)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer3.5.conv3.weight"] == (1024, 256, 1, 1)
    assert shapes["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert shapes["layer4.0.downsample.1.running_mean"] == (2048,)
    assert shapes["fc.weight"] == (1000, 2048)
    assert shapes["fc.bias"] == (1000,)
    assert "layer1.1.downsample.0.weight" not in shapes
    assert "layer3.6.conv1.weight" not in shapes
    # torchvision reports 25,557,032 parameters for resnet50 (running stats are buffers).
    params = sum(
        int(np.prod(shape))
        for name, shape in shapes.items()
        if not name.endswith(("running_mean", "running_var"))
    )
    assert params == 25_557_032


def test_random_weights_are_deterministic_and_complete(tv_weights: Weights) -> None:
    shapes = expected_shapes()
    assert {n: w.shape for n, w in tv_weights.items()} == shapes
    assert all(w.dtype == np.float32 for w in tv_weights.values())
    again = random_weights(101, PRESETS["torchvision"])
    assert all(np.array_equal(again[n], tv_weights[n]) for n in shapes)
    other = random_weights(102, PRESETS["torchvision"])
    assert not np.array_equal(other["conv1.weight"], tv_weights["conv1.weight"])


def test_random_batch_norms_are_not_identities(tv_weights: Weights) -> None:
    """Folding must really be exercised: no batch norm may be close to the identity."""
    for name in expected_shapes():
        if not name.endswith(".running_var"):
            continue
        bn = name.removesuffix(".running_var")
        assert np.std(tv_weights[f"{bn}.weight"]) > 0.01, bn
        assert np.abs(tv_weights[f"{bn}.bias"]).mean() > 0.01, bn
        assert np.abs(tv_weights[f"{bn}.running_mean"]).mean() > 0.01, bn
        assert np.abs(np.log(tv_weights[f"{bn}.running_var"])).mean() > 0.05, bn
        assert np.all(tv_weights[f"{bn}.running_var"] > 0), bn


def test_random_convolutions_are_he_normal(tv_weights: Weights) -> None:
    for name in ("conv1.weight", "layer2.1.conv2.weight", "layer4.2.conv1.weight"):
        w = tv_weights[name]
        fan_in = int(np.prod(w.shape[1:]))
        assert np.std(w) == pytest.approx(np.sqrt(2.0 / fan_in), rel=0.05), name
        assert abs(float(np.mean(w))) < 0.1 * np.sqrt(2.0 / fan_in), name


def test_safetensors_round_trip_converts_to_float32(tmp_path: Path, tv_weights: Weights) -> None:
    tensors: dict[str, NDArray[np.generic]] = dict(tv_weights)
    tensors["fc.weight"] = tv_weights["fc.weight"].astype(np.float16)
    tensors["fc.bias"] = tv_weights["fc.bias"].astype(np.float64)
    tensors["bn1.num_batches_tracked"] = np.array(100, dtype=np.int64)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    loaded = load_safetensors(path)
    assert set(loaded) == set(expected_shapes())
    assert all(w.dtype == np.float32 for w in loaded.values())
    name = "layer3.1.conv2.weight"
    np.testing.assert_array_equal(loaded[name], tv_weights[name])
    np.testing.assert_array_equal(loaded["fc.weight"], tensors["fc.weight"].astype(np.float32))


def test_validation_lists_every_problem(tmp_path: Path, tv_weights: Weights) -> None:
    tensors = dict(tv_weights)
    del tensors["layer2.3.bn1.running_mean"]
    del tensors["fc.bias"]
    tensors["head.weight"] = np.zeros((3,), np.float32)
    tensors["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WeightsError) as info:
        load_safetensors(path)
    message = str(info.value)
    assert str(path) in message
    assert "missing 2: fc.bias, layer2.3.bn1.running_mean" in message
    assert "unexpected 1: head.weight" in message
    assert "layer1.0.conv2.weight: expected (64, 64, 3, 3), got (64, 64, 1, 1)" in message
    assert isinstance(info.value, ValueError)


def test_integer_tensors_are_rejected(tmp_path: Path, tv_weights: Weights) -> None:
    tensors: dict[str, NDArray[np.generic]] = dict(tv_weights)
    tensors["bn1.weight"] = np.ones(64, dtype=np.int32)
    path = tmp_path / "int.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WeightsError, match=r"not floating point 1: bn1\.weight: dtype int32"):
        load_safetensors(path)


def test_non_finite_weights_are_rejected(tmp_path: Path, tv_weights: Weights) -> None:
    tensors = dict(tv_weights)
    tensors["layer4.1.bn2.running_var"] = tensors["layer4.1.bn2.running_var"].copy()
    tensors["layer4.1.bn2.running_var"][7] = np.nan
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(WeightsError, match=r"layer4\.1\.bn2\.running_var holds NaN"):
        load_safetensors(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_safetensors(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read"):
        load_safetensors(junk)
