"""Preprocessing presets: how a model expects its 224x224 input to be produced and normalized.

A preset describes two halves of preprocessing. The resize half (``resize_policy``,
``resize_size``, ``interpolation``, ``input_size``) is what whoever turns a photo into the
uint8 ``input_size`` x ``input_size`` RGB array must do; the server receives that array. The
normalization half (``channel_order``, ``mean``, ``std``) is baked into the served ONNX graph by
:mod:`framecast_server.model.resnet50`, so the backends only ever see uint8 RGB NHWC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

ChannelOrder = Literal["RGB", "BGR"]
ResizePolicy = Literal["shorter_side_then_center_crop", "stretch"]
Interpolation = Literal["nearest", "bilinear", "bicubic"]

_CHANNEL_ORDERS = ("RGB", "BGR")
_RESIZE_POLICIES = ("shorter_side_then_center_crop", "stretch")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preset:
    """Input convention of a classifier.

    ``mean`` and ``std`` are on the 0..255 pixel scale and listed in the model's channel order
    (for a BGR model, ``mean[0]`` is the blue mean). The graph computes
    ``(pixel - mean) / std`` after reordering the RGB input into ``channel_order``.
    """

    name: str
    channel_order: ChannelOrder
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_policy: ResizePolicy
    resize_size: int
    input_size: int = 224
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        # Presets can come from JSON metadata on disk, so the Literal types are not enough.
        if self.channel_order not in _CHANNEL_ORDERS:
            raise ValueError(f"preset {self.name!r}: channel_order must be RGB or BGR")
        if self.resize_policy not in _RESIZE_POLICIES:
            raise ValueError(f"preset {self.name!r}: unknown resize_policy {self.resize_policy!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"preset {self.name!r}: unknown interpolation {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"preset {self.name!r}: mean and std need exactly 3 values")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preset {self.name!r}: std values must be positive")
        if self.input_size <= 0 or self.resize_size < self.input_size:
            raise ValueError(
                f"preset {self.name!r}: need 0 < input_size <= resize_size, "
                f"got input_size={self.input_size}, resize_size={self.resize_size}"
            )

    @property
    def normalization(self) -> str:
        """What the graph does to pixels, for people: order, mean and std (0..255 scale)."""
        mean = "/".join(f"{v:g}" for v in self.mean)
        std = "/".join(f"{v:g}" for v in self.std)
        return f"{self.name}: {self.channel_order}, (x - {mean}) / {std}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form; :meth:`from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preset:
        """Rebuild a preset from :meth:`to_dict` output (lists become tuples again)."""
        mean = tuple(float(v) for v in data["mean"])
        std = tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("preset mean and std need exactly 3 values")
        return cls(
            name=str(data["name"]),
            channel_order=data["channel_order"],
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            resize_policy=data["resize_policy"],
            resize_size=int(data["resize_size"]),
            input_size=int(data["input_size"]),
            interpolation=data["interpolation"],
        )


_IMAGENET_MEAN_RGB = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
_IMAGENET_STD_RGB = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)

#: The classic torchvision ImageNet evaluation transform: Resize(256), CenterCrop(224),
#: ToTensor, Normalize(ImageNet mean/std).
TORCHVISION = Preset(
    name="torchvision",
    channel_order="RGB",
    mean=_IMAGENET_MEAN_RGB,
    std=_IMAGENET_STD_RGB,
    resize_policy="shorter_side_then_center_crop",
    resize_size=256,
    input_size=224,
    interpolation="bilinear",
)

#: Keras ``applications.resnet50``: ``image.load_img(path, target_size=(224, 224))`` stretches
#: with nearest-neighbour (its default), and ``preprocess_input`` ("caffe" mode) flips RGB to
#: BGR and subtracts the per-channel ImageNet mean without scaling.
CAFFE = Preset(
    name="caffe",
    channel_order="BGR",
    mean=(103.939, 116.779, 123.68),
    std=(1.0, 1.0, 1.0),
    resize_policy="stretch",
    resize_size=224,
    input_size=224,
    interpolation="nearest",
)

#: timm ``resnet50.tv2_in1k`` (the default model): torchvision normalization, but its eval
#: transform resizes the shorter side to 232 (crop_pct 0.965) before the 224 center crop.
DEFAULT_MODEL_PRESET = Preset(
    name="resnet50.tv2_in1k",
    channel_order="RGB",
    mean=_IMAGENET_MEAN_RGB,
    std=_IMAGENET_STD_RGB,
    resize_policy="shorter_side_then_center_crop",
    resize_size=232,
    input_size=224,
    interpolation="bilinear",
)

#: The presets a user can pick by name for their own weights or ONNX model.
PRESETS: dict[str, Preset] = {"torchvision": TORCHVISION, "caffe": CAFFE}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``: a key of :data:`PRESETS` or the default model's preset.

    Raises ValueError naming the known presets when ``name`` is unknown.
    """
    if name in PRESETS:
        return PRESETS[name]
    if name == DEFAULT_MODEL_PRESET.name:
        return DEFAULT_MODEL_PRESET
    known = ", ".join([*PRESETS, DEFAULT_MODEL_PRESET.name])
    raise ValueError(f"unknown preset {name!r}; known presets: {known}")
