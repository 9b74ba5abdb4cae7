"""The model layer: presets, labels, ResNet-50 graphs, weights, download and preparation.

Everything here works on files and ONNX graphs; nothing speaks gRPC. The server calls
:func:`prepare_model` once at start-up and hands the resulting ONNX file to a backend.
"""

from __future__ import annotations

from framecast_server.model.download import (
    WeightsUnavailableError,
    default_weights_url,
    download_default_weights,
)
from framecast_server.model.labels import IMAGENET_LABELS, NUM_CLASSES, imagenet_labels
from framecast_server.model.prepare import ModelSource, PreparedModel, prepare_model
from framecast_server.model.presets import (
    DEFAULT_MODEL_PRESET,
    PRESETS,
    Preset,
    get_preset,
)
from framecast_server.model.resnet50 import (
    INPUT_NAME,
    OUTPUT_NAME,
    build_resnet50,
    wrap_external_onnx,
)
from framecast_server.model.weights import (
    WeightsError,
    expected_shapes,
    load_safetensors,
    random_weights,
)

__all__ = [
    "DEFAULT_MODEL_PRESET",
    "IMAGENET_LABELS",
    "INPUT_NAME",
    "NUM_CLASSES",
    "OUTPUT_NAME",
    "PRESETS",
    "ModelSource",
    "PreparedModel",
    "Preset",
    "WeightsError",
    "WeightsUnavailableError",
    "build_resnet50",
    "default_weights_url",
    "download_default_weights",
    "expected_shapes",
    "get_preset",
    "imagenet_labels",
    "load_safetensors",
    "prepare_model",
    "random_weights",
    "wrap_external_onnx",
]
