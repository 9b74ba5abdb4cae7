"""Frame sources for ``Client.stream``: image directories, videos and cameras, a synthetic camera.

Every source is an iterable of frames that ``Client.stream`` accepts, and tells whether it is
*live* (a camera, whose frames come at its own pace whether they are read or not: stream it in
realtime mode) or not (files: lossless mode). :func:`open_source` makes one from a string:

* ``synthetic:1280x720@30`` (or ``synthetic``, ``synthetic:640x480``): :class:`SyntheticCamera`;
* a directory: :class:`ImageDirectory`, its images in name order; an image file: that image;
* a video file, an ``rtsp://``/``http://``/... URL, ``/dev/videoN`` or ``webcam:N``:
  :class:`VideoSource`, which needs PyAV, the optional extra ``camera``
  (``pip install 'av>=12'``, the client's ``camera`` extra).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import FramecastError
from .preprocess import ImageInput

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "FrameSource",
    "ImageDirectory",
    "ImageFiles",
    "Paced",
    "SourceError",
    "SyntheticCamera",
    "VideoSource",
    "open_source",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".ts"})
URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")

DEFAULT_SYNTHETIC_SIZE = (640, 480)
DEFAULT_SYNTHETIC_FPS = 30.0

_SYNTHETIC = re.compile(
    r"synthetic(?::(?P<w>\d+)x(?P<h>\d+))?(?:@(?P<fps>\d+(?:\.\d*)?))?", re.IGNORECASE
)
_WEBCAM = re.compile(r"webcam(?::(?P<n>\d+))?", re.IGNORECASE)
# Options for live inputs: no input buffering, low-delay decoding, RTSP over TCP (no gaps
# from lost UDP packets); a stream that buffers would hand out seconds-old frames.
_LIVE_OPTIONS = {"fflags": "nobuffer", "flags": "low_delay"}
_RTSP_OPTIONS = {"rtsp_transport": "tcp"}


class SourceError(FramecastError, ValueError):
    """A frame source cannot be opened or read; the message says why."""


class FrameSource:
    """Base of the sources here: an iterable of frames with a description.

    Attributes:
        description: What the source is, for people (logs, the CLI's summary).
        live: True for cameras: frames come at the source's pace whether they are read or
            not, so a reader that falls behind loses frames rather than delaying them.
        fps: The source's frame rate, when it has one.
    """

    description: str = "frames"
    live: bool = False
    fps: float | None = None

    def __iter__(self) -> Iterator[ImageInput]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds (nothing, unless a subclass says otherwise)."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


class ImageFiles(FrameSource):
    """Image files in the given order; yields their paths (the stream decodes them)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], description: str = "") -> None:
        self.paths = [Path(p) for p in paths]
        self.description = description or f"{len(self.paths)} image file(s)"

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[ImageInput]:
        return iter(list(self.paths))


class ImageDirectory(ImageFiles):
    """The images of a directory (not its subdirectories), sorted by file name.

    Raises:
        SourceError: The directory does not exist or holds no image files.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        if not path.is_dir():
            raise SourceError(f"not a directory: {str(path)!r}")
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.name,
        )
        if not files:
            raise SourceError(
                f"{str(path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        super().__init__(files, description=f"directory {path} ({len(files)} images)")
        self.directory = path


class SyntheticCamera(FrameSource):
    """A camera that makes its frames: ``width`` x ``height`` RGB at ``fps``, paced by a clock.

    Frame ``n`` is due at ``start + n / fps`` on a monotonic clock; iterating sleeps until it
    is due. Like a real sensor, a camera read late does not hand out a backlog: it skips to
    the frame due now (and counts the skipped ones in ``skipped``). Each frame's content is
    a fixed random picture shifted by its frame number, so consecutive frames differ.

    Args:
        width: Frame width in pixels.
        height: Frame height in pixels.
        fps: Frames per second.
        frames: Stop after this many frames; None runs until the consumer stops.
        seed: Seed of the picture.
        clock: Monotonic clock in seconds (for tests).
        sleep: Sleep function in seconds (for tests).
    """

    live = True

    def __init__(
        self,
        width: int = DEFAULT_SYNTHETIC_SIZE[0],
        height: int = DEFAULT_SYNTHETIC_SIZE[1],
        fps: float = DEFAULT_SYNTHETIC_FPS,
        *,
        frames: int | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        if not fps > 0 or math.isinf(fps):
            raise ValueError(f"fps must be a positive number, got {fps}")
        if frames is not None and frames < 0:
            raise ValueError(f"frames must be >= 0 or None, got {frames}")
        self.width, self.height = width, height
        self.rate = float(fps)
        self.fps = self.rate
        self.frames = frames
        self.description = f"synthetic {width}x{height} @ {fps:g} fps"
        self.skipped = 0
        self._clock = clock
        self._sleep = sleep
        rng = np.random.default_rng(seed)
        self._picture = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)

    def frame(self, number: int) -> NDArray[np.uint8]:
        """The content of frame ``number``: the picture shifted right by 7 px per frame."""
        return np.roll(self._picture, shift=(7 * number) % self.width, axis=1)

    def __iter__(self) -> Iterator[NDArray[np.uint8]]:
        period = 1.0 / self.rate
        start = self._clock()
        number = 0
        produced = 0
        while self.frames is None or produced < self.frames:
            due = start + number * period
            now = self._clock()
            if now < due:
                self._sleep(due - now)
            else:
                current = math.floor((now - start) / period)
                if current > number:
                    self.skipped += current - number
                    number = current
            yield self.frame(number)
            number += 1
            produced += 1


class Paced(FrameSource):
    """Another source's frames at most ``fps`` per second (a file played like a camera)."""

    def __init__(
        self,
        source: Iterable[ImageInput],
        fps: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not fps > 0 or math.isinf(fps):
            raise ValueError(f"fps must be a positive number, got {fps}")
        self.source = source
        self.rate = float(fps)
        self.fps = self.rate
        inner = source.description if isinstance(source, FrameSource) else "frames"
        self.description = f"{inner}, paced at {fps:g} fps"
        self.live = source.live if isinstance(source, FrameSource) else False
        self._clock = clock
        self._sleep = sleep

    def __iter__(self) -> Iterator[ImageInput]:
        period = 1.0 / self.rate
        start = self._clock()
        for number, frame in enumerate(self.source):
            remaining = start + number * period - self._clock()
            if remaining > 0:
                self._sleep(remaining)
            yield frame

    def close(self) -> None:
        """Close the paced source."""
        if isinstance(self.source, FrameSource):
            self.source.close()


def _import_av() -> Any:
    try:
        import av  # the optional extra "camera"
    except ImportError as exc:
        raise SourceError(
            "video files and cameras need PyAV, the optional extra 'camera' of "
            "framecast-client: pip install 'av>=12' (or pip install './client[camera]' from "
            "a checkout)"
        ) from exc
    return av


class VideoSource(FrameSource):
    """Decoded RGB frames of a video file, a stream URL (RTSP, HTTP, ...) or a webcam (PyAV).

    Args:
        url: A file path, a URL, or a device such as ``/dev/video0``.
        live: Whether frames come at the source's pace (default: True for anything but a
            regular file).
        format: The demuxer, e.g. ``"v4l2"`` for a Linux webcam (default: guessed).
        options: Demuxer options; live sources default to no input buffering and, for RTSP,
            TCP transport.

    Raises:
        SourceError: PyAV is not installed (at construction), or the input cannot be
            opened or decoded (when iterated).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        live: bool | None = None,
        format: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        self._av = _import_av()
        self.url = os.fspath(url)
        self.live = (not Path(self.url).is_file()) if live is None else live
        self.format = format
        if options is None:
            options = {}
            if self.live:
                options.update(_LIVE_OPTIONS)
                if self.url.lower().startswith(("rtsp://", "rtsps://")):
                    options.update(_RTSP_OPTIONS)
        self.options = options
        self.description = f"{'live ' if self.live else ''}video {self.url}"

    def __iter__(self) -> Iterator[NDArray[np.uint8]]:
        av = self._av
        try:
            container = av.open(self.url, format=self.format, options=self.options)
        except Exception as exc:  # PyAV raises its own error classes (av.error.*)
            raise SourceError(f"cannot open {self.url!r}: {exc}") from exc
        try:
            if not container.streams.video:
                raise SourceError(f"{self.url!r} has no video stream")
            stream = container.streams.video[0]
            if stream.average_rate:
                self.fps = float(stream.average_rate)
            try:
                for frame in container.decode(stream):
                    yield frame.to_ndarray(format="rgb24")
            except SourceError:
                raise
            except Exception as exc:
                raise SourceError(f"cannot decode {self.url!r}: {exc}") from exc
        finally:
            container.close()


def open_source(spec: str) -> FrameSource:
    """Make a frame source from a string, as ``framecast stream SOURCE`` takes it.

    ``synthetic[:WIDTHxHEIGHT][@FPS]`` (default 640x480 @ 30), a directory of images, an
    image file, a video file, a URL (``rtsp://...``, ``http://...``), ``/dev/videoN`` or
    ``webcam[:N]`` (Linux: ``/dev/videoN``).

    Raises:
        SourceError: The spec names nothing usable, or the video support is missing.
    """
    text = spec.strip()
    if text.lower().startswith("synthetic"):
        match = _SYNTHETIC.fullmatch(text)
        if match is None:
            raise SourceError(
                f"cannot read {spec!r}: expected synthetic[:WIDTHxHEIGHT][@FPS], "
                "e.g. synthetic:1280x720@30"
            )
        width, height = DEFAULT_SYNTHETIC_SIZE
        if match["w"] is not None:
            width, height = int(match["w"]), int(match["h"])
        fps = DEFAULT_SYNTHETIC_FPS if match["fps"] is None else float(match["fps"])
        if width < 1 or height < 1 or not fps > 0:
            raise SourceError(f"{spec!r}: the size and the frame rate must be positive")
        return SyntheticCamera(width, height, fps)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme:
        if scheme == "file":
            return open_source(text.split("://", 1)[1])
        if scheme not in URL_SCHEMES:
            raise SourceError(f"{spec!r}: unsupported URL scheme {scheme!r}")
        return VideoSource(text, live=True)
    webcam = _WEBCAM.fullmatch(text)
    if webcam is not None:
        return VideoSource(f"/dev/video{webcam['n'] or 0}", live=True, format="v4l2")
    if re.fullmatch(r"/dev/video\d+", text):
        return VideoSource(text, live=True, format="v4l2")
    path = Path(text).expanduser()
    if path.is_dir():
        return ImageDirectory(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return ImageFiles([path], description=f"image {path}")
        if suffix in VIDEO_SUFFIXES:
            return VideoSource(path, live=False)
        raise SourceError(
            f"{spec!r} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a video "
            f"({', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    raise SourceError(
        f"no such source {spec!r}: expected synthetic[:WxH][@FPS], a directory of images, an "
        "image or video file, a URL (rtsp://, http://, ...) or webcam[:N]"
    )
