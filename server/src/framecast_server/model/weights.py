"""ResNet-50 weights by torchvision tensor name: the expected set, random ones, and loading.

The names are torchvision's ``resnet50`` state dict (timm's ``resnet50`` uses the same ones):
``conv1.weight``, ``bn1.*``, ``layer{1..4}.{i}.conv{1,2,3}.weight``,
``layer{1..4}.{i}.bn{1,2,3}.*``, ``layer{1..4}.0.downsample.{0,1}.*`` and ``fc.{weight,bias}``.
Batch-norm buffers ``num_batches_tracked`` are ignored wherever they appear.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from framecast_server.model.labels import NUM_CLASSES
from framecast_server.model.presets import TORCHVISION, Preset

#: (stage name, number of bottleneck blocks, bottleneck width, stride of the first block).
STAGES: tuple[tuple[str, int, int, int], ...] = (
    ("layer1", 3, 64, 1),
    ("layer2", 4, 128, 2),
    ("layer3", 6, 256, 2),
    ("layer4", 3, 512, 2),
)
EXPANSION = 4
STEM_WIDTH = 64
FEATURES = STAGES[-1][2] * EXPANSION  # 2048
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")

WeightDict = dict[str, NDArray[np.float32]]


class WeightsError(ValueError):
    """Weights are missing, unreadable or do not fit ResNet-50; the message lists what is wrong."""


@dataclass(frozen=True)
class Block:
    """One bottleneck block as laid out in the state dict."""

    prefix: str  # "layer2.0"
    in_channels: int
    width: int
    stride: int
    has_downsample: bool

    @property
    def out_channels(self) -> int:
        return self.width * EXPANSION


def blocks() -> Iterator[Block]:
    """Yield the 16 bottleneck blocks in forward order."""
    in_channels = STEM_WIDTH
    for stage, count, width, stride in STAGES:
        for i in range(count):
            # Every stage's first block changes the channel count (and, after layer1, the
            # resolution), so only it needs the projection shortcut.
            yield Block(
                prefix=f"{stage}.{i}",
                in_channels=in_channels,
                width=width,
                stride=stride if i == 0 else 1,
                has_downsample=i == 0,
            )
            in_channels = width * EXPANSION


def conv_bn_shapes() -> Iterator[tuple[str, str, tuple[int, int, int, int]]]:
    """Yield (conv name, its batch-norm name, conv weight shape) in forward order."""
    yield "conv1", "bn1", (STEM_WIDTH, 3, 7, 7)
    for b in blocks():
        p = b.prefix
        yield f"{p}.conv1", f"{p}.bn1", (b.width, b.in_channels, 1, 1)
        yield f"{p}.conv2", f"{p}.bn2", (b.width, b.width, 3, 3)
        yield f"{p}.conv3", f"{p}.bn3", (b.out_channels, b.width, 1, 1)
        if b.has_downsample:
            yield (
                f"{p}.downsample.0",
                f"{p}.downsample.1",
                (b.out_channels, b.in_channels, 1, 1),
            )


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor a ResNet-50 state dict must hold, by name, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for conv, bn, shape in conv_bn_shapes():
        shapes[f"{conv}.weight"] = shape
        for param in BN_PARAMS:
            shapes[f"{bn}.{param}"] = (shape[0],)
    shapes["fc.weight"] = (NUM_CLASSES, FEATURES)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


# Random weights calibrate their batch norms on synthetic images of this size: big enough for
# stable per-channel statistics down to layer4 (3x3 positions), small enough to take a
# fraction of a second in numpy. Half the images are photo-like, half uniform noise: a random
# network reacts far more strongly to noise, and calibrating on smooth images alone would
# leave noise inputs (common in tests and smoke checks) with a saturated one-hot softmax.
_CALIBRATION_PHOTOS = 2
_CALIBRATION_NOISE = 2
_CALIBRATION_SIZE = 96
# Standard deviation of the logits across classes that random weights aim for: softmax top-1
# values then mostly land between 0.1 and 0.9, with distinct top-5 probabilities.
_LOGIT_SPREAD = 3.0


def _photo_like_images(rng: np.random.Generator, n: int, size: int) -> NDArray[np.float64]:
    """Float RGB images on the 0..255 scale with photo-like structure: smooth colour regions
    (bilinearly upsampled coarse noise, so neighbouring pixels correlate) plus fine texture."""
    coarse = rng.uniform(0.0, 255.0, size=(n, 5, 5, 3))
    pos = np.linspace(0.0, 4.0, size)
    i0 = np.minimum(pos.astype(int), 3)
    t = (pos - i0)[:, None]
    rows = coarse[:, i0] * (1 - t)[None, :, :, None] + coarse[:, i0 + 1] * t[None, :, :, None]
    tc = t[None, None, :, :]
    img = rows[:, :, i0] * (1 - tc) + rows[:, :, i0 + 1] * tc
    img = img + rng.normal(0.0, 16.0, size=img.shape)
    clipped: NDArray[np.float64] = np.clip(img, 0.0, 255.0)
    return clipped


def _conv_nhwc(x: NDArray[np.float32], w: NDArray[np.float32], stride: int) -> NDArray[np.float32]:
    """Plain 'same'-padded convolution, NHWC activations and OIHW weights, via im2col."""
    k = w.shape[2]
    pad = k // 2
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # [N, Ho, Wo, C, k, k]
    n, ho, wo = windows.shape[:3]
    cols = windows.reshape(n * ho * wo, -1)
    out: NDArray[np.float32] = (cols @ w.reshape(w.shape[0], -1).T).astype(np.float32)
    return out.reshape(n, ho, wo, w.shape[0])


def random_weights(seed: int, preset: Preset | None = None) -> WeightDict:
    """Deterministic random ResNet-50 weights for running without a pretrained checkpoint.

    Convolutions are He-normal; batch norms get non-trivial scales and shifts. Their running
    statistics are what a trained network has: the per-channel mean and variance each
    convolution actually produces, measured by a forward pass over a few synthetic images
    (photo-like and noise) normalized with ``preset`` (default: torchvision), then jittered.
    Left at mean 0 and variance 1, the per-channel offsets random convolutions produce would
    compound through the 16 residual blocks into a one-hot softmax. The last batch norm of each
    residual branch gets a small scale (as in zero-init-residual training), and the classifier
    is centred and scaled on the measured features so the logits spread over a few units: the
    softmax is neither uniform nor one-hot, its top-5 are distinct, and different images get
    different answers.
    """
    preset = preset or TORCHVISION
    rng = np.random.default_rng(seed)
    weights: WeightDict = {}

    noise = rng.uniform(
        0.0, 255.0, size=(_CALIBRATION_NOISE, _CALIBRATION_SIZE, _CALIBRATION_SIZE, 3)
    )
    photos = _photo_like_images(rng, _CALIBRATION_PHOTOS, _CALIBRATION_SIZE)
    images = np.concatenate([photos, noise])
    if preset.channel_order == "BGR":
        images = images[..., ::-1]
    mean = np.asarray(preset.mean, np.float64)
    std = np.asarray(preset.std, np.float64)
    x = ((images - mean) / std).astype(np.float32)

    def conv_bn(
        x: NDArray[np.float32],
        conv: str,
        bn: str,
        shape: tuple[int, int, int, int],
        stride: int,
        gamma: tuple[float, float],
    ) -> NDArray[np.float32]:
        fan_in = shape[1] * shape[2] * shape[3]
        w = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
        y = _conv_nhwc(x, w, stride)
        channels = shape[0]
        batch_mean = y.mean(axis=(0, 1, 2), dtype=np.float64)
        batch_var = y.var(axis=(0, 1, 2), dtype=np.float64) + 1e-3
        running_mean = batch_mean + rng.normal(0.0, 0.1, size=channels) * np.sqrt(batch_var)
        running_var = batch_var * rng.uniform(0.7, 1.4, size=channels)
        g = rng.uniform(*gamma, size=channels)
        b = rng.normal(0.0, 0.1, size=channels)
        weights[f"{conv}.weight"] = w
        weights[f"{bn}.weight"] = g.astype(np.float32)
        weights[f"{bn}.bias"] = b.astype(np.float32)
        weights[f"{bn}.running_mean"] = running_mean.astype(np.float32)
        weights[f"{bn}.running_var"] = running_var.astype(np.float32)
        scale = g / np.sqrt(running_var + 1e-5)
        out: NDArray[np.float32] = (y * scale + (b - running_mean * scale)).astype(np.float32)
        return out

    def relu(a: NDArray[np.float32]) -> NDArray[np.float32]:
        out: NDArray[np.float32] = np.maximum(a, np.float32(0.0))
        return out

    x = relu(conv_bn(x, "conv1", "bn1", (STEM_WIDTH, 3, 7, 7), 2, (0.8, 1.2)))
    # 3x3/2 max pool, padding 1 (-inf padding: it never wins the max).
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))
    x = windows[:, ::2, ::2].max(axis=(4, 5))
    for b in blocks():
        p = b.prefix
        shape = (b.width, b.in_channels, 1, 1)
        y = relu(conv_bn(x, f"{p}.conv1", f"{p}.bn1", shape, 1, (0.8, 1.2)))
        shape = (b.width, b.width, 3, 3)
        y = relu(conv_bn(y, f"{p}.conv2", f"{p}.bn2", shape, b.stride, (0.8, 1.2)))
        shape = (b.out_channels, b.width, 1, 1)
        y = conv_bn(y, f"{p}.conv3", f"{p}.bn3", shape, 1, (0.2, 0.5))
        if b.has_downsample:
            shape = (b.out_channels, b.in_channels, 1, 1)
            x = conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", shape, b.stride, (0.8, 1.2))
        x = relu(y + x)
    features = x.mean(axis=(1, 2), dtype=np.float64)  # [N, 2048]
    # Random convolutions leave a large component common to all images in the features; left
    # in, it gives every image the same top-1. The classifier is centred on the calibration
    # images' mean features and scaled so deviations from it spread the logits by
    # _LOGIT_SPREAD.
    center = features.mean(axis=0)
    fc_std = _LOGIT_SPREAD / float(np.linalg.norm(features - center, axis=1).mean())
    fc_weight = rng.normal(0.0, fc_std, size=(NUM_CLASSES, FEATURES))
    fc_bias = rng.normal(0.0, 0.5, size=NUM_CLASSES) - fc_weight @ center
    weights["fc.weight"] = fc_weight.astype(np.float32)
    weights["fc.bias"] = fc_bias.astype(np.float32)
    return weights


def _layout_problems(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and mismatched tensors, against :func:`expected_shapes`."""
    expected = expected_shapes()
    names = {n for n in shapes if not n.endswith(".num_batches_tracked")}
    missing = sorted(expected.keys() - names)
    unexpected = sorted(names - expected.keys())
    mismatched = sorted(
        f"{n}: expected {expected[n]}, got {shapes[n]}"
        for n in names & expected.keys()
        if shapes[n] != expected[n]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"mismatched shapes {len(mismatched)}: {'; '.join(mismatched)}")
    return problems


def _layout_error(source: str, problems: list[str]) -> WeightsError:
    return WeightsError(
        f"{source} does not hold torchvision-layout ResNet-50 weights: " + " | ".join(problems)
    )


def validate(tensors: Mapping[str, NDArray[np.generic]], source: str) -> WeightDict:
    """Check names and shapes against :func:`expected_shapes`; return float32 copies.

    Raises WeightsError listing every missing, unexpected and mismatched tensor at once, so a
    user fixing a checkpoint sees the whole problem, not the first symptom.
    """
    expected = expected_shapes()
    problems = _layout_problems({n: tuple(t.shape) for n, t in tensors.items()})
    non_float = sorted(
        f"{n}: dtype {tensors[n].dtype}"
        for n in tensors.keys() & expected.keys()
        if not np.issubdtype(tensors[n].dtype, np.floating)
    )
    if non_float:
        problems.append(f"not floating point {len(non_float)}: {'; '.join(non_float)}")
    if problems:
        raise _layout_error(source, problems)
    out: WeightDict = {}
    for name in expected:
        arr = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise WeightsError(f"{source}: tensor {name} holds NaN or infinite values")
        out[name] = arr
    return out


def load_safetensors(path: Path | str) -> WeightDict:
    """Load torchvision-layout ResNet-50 weights from a ``.safetensors`` file as float32.

    Raises WeightsError when the file cannot be read or its tensors do not fit ResNet-50.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        tensors = load_file(path)
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file not found: {path}") from exc
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        # bfloat16 tensors and truncated or non-safetensors files all end up here.
        raise WeightsError(f"cannot read {path} as safetensors: {exc}") from exc
    return validate(tensors, str(path))


def check_header(path: Path | str) -> None:
    """Check a weights file's names and shapes from its header alone, reading no tensor.

    Cheap, so the server refuses a wrong file in one sentence before it starts listening;
    :func:`load_safetensors` still checks the values when the model is built.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        # safe_open reads the header only; it has keys() but is not iterable.
        with safe_open(str(path), framework="numpy") as weights:
            shapes = {n: tuple(weights.get_slice(n).get_shape()) for n in weights.keys()}  # noqa: SIM118
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file not found: {path}") from exc
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise WeightsError(
            f"cannot read {path} as safetensors: it is not a .safetensors weights file ({exc})"
        ) from exc
    problems = _layout_problems(shapes)
    if problems:
        raise _layout_error(str(path), problems)
