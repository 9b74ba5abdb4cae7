"""Presets: the constants users rely on, validation, lookup and the JSON round trip."""

from __future__ import annotations

import pytest
from framecast_server.model import DEFAULT_MODEL_PRESET, PRESETS, Preset, get_preset


def test_torchvision_preset() -> None:
    p = PRESETS["torchvision"]
    assert p.channel_order == "RGB"
    assert p.mean == pytest.approx((123.675, 116.28, 103.53))
    assert p.std == pytest.approx((58.395, 57.12, 57.375))
    assert (p.resize_policy, p.resize_size, p.input_size, p.interpolation) == (
        "shorter_side_then_center_crop",
        256,
        224,
        "bilinear",
    )


def test_caffe_preset_is_keras_resnet50() -> None:
    p = PRESETS["caffe"]
    assert p.channel_order == "BGR"
    # Keras preprocess_input subtracts these from B, G, R and does not scale.
    assert p.mean == (103.939, 116.779, 123.68)
    assert p.std == (1.0, 1.0, 1.0)
    assert (p.resize_policy, p.resize_size, p.input_size, p.interpolation) == (
        "stretch",
        224,
        224,
        "nearest",
    )


def test_default_model_preset_is_tv2_eval_transform() -> None:
    p = DEFAULT_MODEL_PRESET
    assert p.resize_size == 232
    assert p.input_size == 224
    assert p.resize_policy == "shorter_side_then_center_crop"
    assert (p.channel_order, p.mean, p.std) == (
        "RGB",
        PRESETS["torchvision"].mean,
        PRESETS["torchvision"].std,
    )


def test_get_preset() -> None:
    assert get_preset("caffe") is PRESETS["caffe"]
    assert get_preset(DEFAULT_MODEL_PRESET.name) is DEFAULT_MODEL_PRESET
    with pytest.raises(ValueError, match=r"unknown preset 'keras'.*torchvision, caffe"):
        get_preset("keras")


def test_round_trip_through_dict() -> None:
    for preset in (*PRESETS.values(), DEFAULT_MODEL_PRESET):
        assert Preset.from_dict(preset.to_dict()) == preset


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"channel_order": "GBR"}, "channel_order"),
        ({"std": (1.0, 0.0, 1.0)}, "positive"),
        ({"resize_policy": "pad"}, "resize_policy"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"resize_size": 200}, "input_size"),
    ],
)
def test_invalid_presets_are_rejected(change: dict[str, object], message: str) -> None:
    values = {**PRESETS["torchvision"].to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        Preset(**values)
