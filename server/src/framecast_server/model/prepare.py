"""Turn what the user asked to serve into one cached, validated ONNX file.

Sources, as the user chose them: their own ONNX classifier (``--onnx PATH``), their own
torchvision-layout safetensors weights (``--weights PATH``), or the default, timm's
``resnet50.tv2_in1k`` downloaded from the hub, falling back to seeded random weights (loudly)
when that download is impossible.

Builds are cached under ``<cache_dir>/prepared/<key>.onnx`` with a ``<key>.json`` of metadata,
where the key hashes the source's content, the preset, the builder version and, for random
weights, the seed; so a restart with the same inputs reuses the file, and any change rebuilds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from filelock import FileLock
from onnx.external_data_helper import ExternalDataInfo

from framecast_server.model.download import (
    DEFAULT_REPO,
    WeightsUnavailableError,
    check_cached_weights,
    download_default_weights,
)
from framecast_server.model.labels import NUM_CLASSES, imagenet_labels
from framecast_server.model.presets import DEFAULT_MODEL_PRESET, Preset, get_preset
from framecast_server.model.resnet50 import (
    BUILDER_VERSION,
    INPUT_NAME,
    OUTPUT_NAME,
    build_resnet50,
    check_external_onnx,
    wrap_external_onnx,
)
from framecast_server.model.weights import check_header, load_safetensors, random_weights

logger = logging.getLogger(__name__)

SourceKind = Literal["onnx", "weights", "default"]
_KINDS = ("onnx", "weights", "default")
#: How long a process waits for another one building the same model before giving up.
BUILD_LOCK_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ModelSource:
    """What to serve: ``kind`` "onnx" or "weights" with a ``path``, or the "default" model.

    ``preset`` names a preset (see :func:`~framecast_server.model.presets.get_preset`); None
    picks the source's natural one: the default model's own eval preset for "default",
    "torchvision" for user weights and ONNX models. ``resize_size`` replaces the preset's
    shorter-side resize for a user's weights or ONNX model evaluated at another size
    (torchvision's IMAGENET1K_V2 weights: 232). ``require_pretrained`` makes the default model
    fail (WeightsUnavailableError) instead of falling back to random weights.
    """

    kind: SourceKind = "default"
    path: Path | None = None
    preset: str | None = None
    resize_size: int | None = None
    require_pretrained: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"model source kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "default" and self.path is not None:
            raise ValueError("the default model takes no path")
        if self.kind != "default":
            if self.path is None:
                raise ValueError(f"a {self.kind!r} model source needs a path")
            # Accept str paths from callers; the dataclass is frozen, hence object.__setattr__.
            object.__setattr__(self, "path", Path(self.path))
        self.resolved_preset()  # unknown preset names fail here, not after a download

    def resolved_preset(self) -> Preset:
        """The preset this source is served with."""
        if self.preset is not None:
            preset = get_preset(self.preset)
        elif self.kind == "default":
            preset = DEFAULT_MODEL_PRESET
        else:
            preset = get_preset("torchvision")
        if self.resize_size is None:
            return preset
        if self.kind == "default":
            raise ValueError("the default model has its own resize; resize_size is for user files")
        if preset.resize_policy != "shorter_side_then_center_crop":
            raise ValueError(f"preset {preset.name!r} stretches; it has no resize_size to set")
        # Preset checks resize_size >= input_size.
        return dataclasses.replace(preset, resize_size=self.resize_size)


@dataclass(frozen=True)
class PreparedModel:
    """A served-contract ONNX file on disk and what the server reports about it."""

    onnx_path: Path
    name: str
    version: str  # short hash of the cache key: changes whenever the served graph does
    preset: Preset
    pretrained: bool
    weights_source: str
    warning: str  # "" when fine; otherwise shown to users (ModelInfo, logs)
    labels: tuple[str, ...] = field(default_factory=imagenet_labels)


@dataclass(frozen=True)
class _Resolved:
    """A source pinned down to content: enough to compute the cache key and to build."""

    kind: str
    content: str  # hash of the input file, or a description of the random weights
    name: str
    pretrained: bool
    weights_source: str
    warning: str
    build: Callable[[], onnx.ModelProto]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors of a graph and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _onnx_content(path: Path) -> str:
    """A digest of an ONNX file and of every external-data file its tensors live in.

    Large exports keep their weights beside the graph (``model.onnx`` + ``model.onnx.data``):
    new weights under the same names must still be a new model, not a stale cache hit.
    """
    serialized = path.read_bytes()  # read once: hashed, then parsed without external data
    digest = hashlib.sha256(hashlib.sha256(serialized).hexdigest().encode())
    try:
        model = onnx.load_model_from_string(serialized)
    except Exception:  # unreadable: the build reports it; the file's own hash keys it
        return digest.hexdigest()
    locations = sorted(
        {
            ExternalDataInfo(tensor).location
            for tensor in _all_tensors(model.graph)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
        }
    )
    for location in locations:
        data = path.parent / location
        # A missing file is the build's error to report; its absence still changes the key.
        content = _file_sha256(data) if data.is_file() else "missing"
        digest.update(f"\n{location}\n{content}".encode())
    return digest.hexdigest()


def _resolve(
    source: ModelSource, preset: Preset, cache_dir: Path, allow_download: bool, seed: int
) -> _Resolved:
    if source.kind in ("onnx", "weights"):
        assert source.path is not None  # checked by ModelSource
        path = source.path
        if not path.is_file():
            raise FileNotFoundError(f"{source.kind} file not found: {path}")
        if source.kind == "onnx":

            def build_onnx() -> onnx.ModelProto:
                try:
                    model = onnx.load(str(path))
                except Exception as exc:  # protobuf's DecodeError, missing external data, ...
                    raise ValueError(f"cannot read {path} as an ONNX model: {exc}") from exc
                return wrap_external_onnx(model, preset)

            build = build_onnx
            name = path.stem
        else:

            def build_weights() -> onnx.ModelProto:
                return build_resnet50(load_safetensors(path), preset)

            build = build_weights
            name = f"resnet50-{path.stem}"
        # Pretrained-ness of a user's file cannot be known; it is their trained model.
        return _Resolved(
            kind=source.kind,
            content=_onnx_content(path) if source.kind == "onnx" else _file_sha256(path),
            name=name,
            pretrained=True,
            weights_source=str(path),
            warning="",
            build=build,
        )

    weights_dir = cache_dir / "weights"
    weights_path, cache_reason = check_cached_weights(weights_dir)
    reason = ""
    if weights_path is None:
        if not allow_download:
            reason = f"downloads are disabled and {cache_reason}"
        else:
            try:
                weights_path = download_default_weights(weights_dir)
            except WeightsUnavailableError as exc:
                reason = str(exc)
    if weights_path is not None:
        found = weights_path

        def build_default() -> onnx.ModelProto:
            return build_resnet50(load_safetensors(found), preset)

        return _Resolved(
            kind="default",
            content=_file_sha256(found),
            name=DEFAULT_MODEL_PRESET.name,
            pretrained=True,
            weights_source=DEFAULT_REPO,
            warning="",
            build=build_default,
        )

    if source.require_pretrained:
        raise WeightsUnavailableError(
            f"pretrained weights are required but could not be had: {reason}"
        )
    warning = (
        f"RANDOM WEIGHTS: could not download pretrained ResNet-50 weights ({reason}); "
        "predictions are meaningless"
    )
    banner = "!" * 78
    logger.warning("\n%s\n!!! %s\n%s", banner, warning, banner)

    def build_random() -> onnx.ModelProto:
        return build_resnet50(random_weights(seed, preset), preset)

    return _Resolved(
        kind="random",
        # random_weights' algorithm is part of the content: bump the tag when it changes.
        content=f"random-weights-v1-seed-{seed}",
        name="resnet50-random",
        pretrained=False,
        weights_source=f"random (seed {seed})",
        warning=warning,
        build=build_random,
    )


def _cache_key(resolved: _Resolved, preset: Preset) -> str:
    material = {
        "kind": resolved.kind,
        "content": resolved.content,
        "preset": preset.to_dict(),
        "builder_version": BUILDER_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _atomic_write(dest: Path, write: Callable[[Path], None]) -> None:
    """Write ``dest`` through a temporary file in its directory and an atomic rename."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 files; the cache is shared by the server and build-engine runs.
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _smoke_test(path: Path, preset: Preset) -> None:
    """Run the saved graph once on a batch of 2 to prove it honours the served contract.

    Catches what static checks cannot, notably user graphs with a batch size of 1 baked into a
    Reshape, before the file is published to the cache.
    """
    import onnxruntime as ort

    size = preset.input_size
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    try:
        options = ort.SessionOptions()
        # Fatal only: a failure's message is raised below as the one line; ONNX Runtime's own
        # log line would print it a second time, before it.
        options.log_severity_level = 4
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    except Exception as exc:  # ORT raises its own exception types for every failure
        raise ValueError(f"the prepared model fails a test run on ONNX Runtime: {exc}") from exc
    if probs.shape != (2, NUM_CLASSES) or probs.dtype != np.float32:
        raise ValueError(
            f"the prepared model returns {probs.dtype} {probs.shape} for a batch of 2, "
            f"expected float32 (2, {NUM_CLASSES})"
        )
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("the prepared model's outputs are not finite probabilities")


def _metadata(prepared: PreparedModel, key: str, build_s: float) -> dict[str, Any]:
    return {
        "key": key,
        "name": prepared.name,
        "version": prepared.version,
        "preset": prepared.preset.to_dict(),
        "pretrained": prepared.pretrained,
        "weights_source": prepared.weights_source,
        "warning": prepared.warning,
        "builder_version": BUILDER_VERSION,
        "build_seconds": round(build_s, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cached(onnx_path: Path, meta_path: Path, key: str) -> bool:
    if not (onnx_path.is_file() and meta_path.is_file()):
        return False
    try:
        return bool(json.loads(meta_path.read_text(encoding="utf-8")).get("key") == key)
    except (OSError, ValueError):
        return False


def check_source(source: ModelSource) -> None:
    """Refuse, in one sentence, a user's file that is not what its flag says it is.

    Reads the file but builds nothing (a weights file's header, an ONNX graph without its
    external data, whose inputs and outputs must be an image classifier's), so the server can
    refuse before it starts listening; the build and its test run check the rest. Raises
    WeightsError for weights, ValueError for an ONNX model.
    """
    if source.kind == "weights":
        assert source.path is not None  # checked by ModelSource
        check_header(source.path)
    elif source.kind == "onnx":
        assert source.path is not None
        try:
            model = onnx.load(str(source.path), load_external_data=False)
        except FileNotFoundError:
            raise
        except Exception as exc:  # protobuf's DecodeError for a file that is not ONNX
            raise ValueError(
                f"cannot read {source.path} as an ONNX model: it is not an .onnx file ({exc})"
            ) from exc
        if not model.graph.node:
            raise ValueError(
                f"cannot read {source.path} as an ONNX model: it holds no graph (is it an "
                ".onnx file?)"
            )
        try:
            # The graph's shape checks, without its weights: a graph that is not an image
            # classifier is refused here in one line, not after the server started listening.
            check_external_onnx(model, source.resolved_preset())
        except ValueError as exc:
            raise ValueError(f"cannot serve {source.path}: {exc}") from exc


def prepare_model(
    source: ModelSource, cache_dir: Path, *, allow_download: bool = True, seed: int = 0
) -> PreparedModel:
    """Produce (or reuse from ``cache_dir``) the served ONNX graph for ``source``.

    For the default source, pretrained weights come from ``cache_dir/weights/`` or are
    downloaded there (unless ``allow_download`` is False); when that is impossible, random
    weights from ``seed`` are used, a loud warning is logged and the result's ``warning`` says
    so. A cached build is reused without rebuilding; a build is written atomically under a
    file lock, so concurrent processes build once and never see a partial file.

    Raises FileNotFoundError for a missing user file, WeightsError for unusable weights and
    ValueError for an ONNX model that is not an ImageNet classifier or fails its test run.
    """
    preset = source.resolved_preset()
    resolved = _resolve(source, preset, cache_dir, allow_download, seed)
    key = _cache_key(resolved, preset)
    prepared_dir = cache_dir / "prepared"
    onnx_path = prepared_dir / f"{key}.onnx"
    meta_path = prepared_dir / f"{key}.json"
    prepared = PreparedModel(
        onnx_path=onnx_path,
        name=resolved.name,
        version=key[:12],
        preset=preset,
        pretrained=resolved.pretrained,
        weights_source=resolved.weights_source,
        warning=resolved.warning,
    )
    if _cached(onnx_path, meta_path, key):
        logger.info("using cached %s %s (%s)", prepared.name, prepared.version, onnx_path)
        return prepared

    prepared_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(prepared_dir / f"{key}.lock"), timeout=BUILD_LOCK_TIMEOUT_S):
        # Whoever held the lock before may just have built it.
        if _cached(onnx_path, meta_path, key):
            logger.info("using %s %s built by another process", prepared.name, prepared.version)
            return prepared
        logger.info("building %s with preset %s", prepared.name, preset.name)
        start = time.monotonic()
        model = resolved.build()

        def write_onnx(tmp: Path) -> None:
            onnx.save_model(model, str(tmp))
            _smoke_test(tmp, preset)

        _atomic_write(onnx_path, write_onnx)
        build_s = time.monotonic() - start
        # The metadata goes last: its presence marks the build as complete.
        meta = json.dumps(_metadata(prepared, key, build_s), indent=2)

        def write_meta(tmp: Path) -> None:
            tmp.write_text(meta, encoding="utf-8")

        _atomic_write(meta_path, write_meta)
    logger.info("built %s %s in %.1f s: %s", prepared.name, prepared.version, build_s, onnx_path)
    return prepared
