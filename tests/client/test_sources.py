"""Frame sources: directory order, the synthetic camera's pacing and content, spec parsing."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from framecast_client import SourceError, open_source
from framecast_client.sources import (
    ImageDirectory,
    ImageFiles,
    Paced,
    SyntheticCamera,
    VideoSource,
)
from PIL import Image


class FakeClock:
    """A monotonic clock that only moves when slept on (or advanced by the test)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


def write_image(path: Path, value: int) -> None:
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_a_directory_yields_its_images_sorted_by_name(tmp_path: Path) -> None:
    for name, value in [("b.png", 2), ("a.jpg", 1), ("c.PNG", 3), ("10.png", 4)]:
        write_image(tmp_path / name, value)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "0.png", 0)

    source = ImageDirectory(tmp_path)
    names = [Path(p).name for p in source]  # type: ignore[arg-type]
    assert names == ["10.png", "a.jpg", "b.png", "c.PNG"]
    assert len(source) == 4
    assert not source.live
    assert [Path(p).name for p in open_source(str(tmp_path))] == names  # type: ignore[arg-type]


def test_a_directory_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SourceError, match="holds no images"):
        ImageDirectory(tmp_path)


def test_the_synthetic_camera_is_paced_by_its_clock() -> None:
    clock = FakeClock()
    camera = SyntheticCamera(64, 48, fps=10, frames=5, clock=clock, sleep=clock.sleep)
    times, frames = [], []
    for frame in camera:
        times.append(clock.now - 100.0)
        frames.append(frame)
    assert times == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    for a, b in itertools.pairwise(frames):
        assert not np.array_equal(a, b)  # every frame's content differs
    assert camera.skipped == 0
    assert camera.live


def test_a_synthetic_camera_read_late_skips_frames_like_a_sensor() -> None:
    clock = FakeClock()
    camera = SyntheticCamera(16, 16, fps=10, frames=3, clock=clock, sleep=clock.sleep)
    it = iter(camera)
    first = next(it)
    clock.now += 0.35  # the reader comes back 3.5 frame periods later
    second = next(it)
    assert np.array_equal(second, camera.frame(3))  # the frame due now, not frame 1
    assert not np.array_equal(first, second)
    assert camera.skipped == 2
    next(it)
    assert clock.now - 100.0 == pytest.approx(0.4)  # frame 4 keeps the original schedule


def test_paced_spreads_a_file_source_over_time() -> None:
    clock = FakeClock()
    paced = Paced(["a", "b", "c"], fps=4, clock=clock, sleep=clock.sleep)
    seen = []
    for item in paced:
        seen.append((item, clock.now - 100.0))
    assert seen == [("a", 0.0), ("b", 0.25), ("c", 0.5)]


@pytest.mark.parametrize(
    ("spec", "size", "fps"),
    [
        ("synthetic:1280x720@30", (1280, 720), 30.0),
        ("synthetic", (640, 480), 30.0),
        ("SYNTHETIC:320x240", (320, 240), 30.0),
        ("synthetic:64x48@7.5", (64, 48), 7.5),
        ("synthetic@15", (640, 480), 15.0),
    ],
)
def test_synthetic_specs(spec: str, size: tuple[int, int], fps: float) -> None:
    source = open_source(spec)
    assert isinstance(source, SyntheticCamera)
    assert (source.width, source.height) == size
    assert source.fps == fps
    assert source.live


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:1280x", "expected synthetic"),
        ("synthetic:0x10@30", "must be positive"),
        ("synthetic:10x10@0", "must be positive"),
        ("gopher://camera", "unsupported URL scheme"),
        ("/no/such/place", "no such source"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(spec)


def test_an_image_file_is_a_one_frame_source(tmp_path: Path) -> None:
    write_image(tmp_path / "one.png", 9)
    source = open_source(str(tmp_path / "one.png"))
    assert isinstance(source, ImageFiles)
    assert [Path(p).name for p in source] == ["one.png"]  # type: ignore[arg-type]


def test_a_file_that_is_neither_image_nor_video_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="neither an image"):
        open_source(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize("spec", ["clip.mp4", "rtsp://camera.local/stream1", "webcam:0"])
def test_video_sources_without_pyav_say_how_to_install_it(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if spec == "clip.mp4":
        (tmp_path / spec).write_bytes(b"\x00" * 16)
        spec = str(tmp_path / spec)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(SourceError, match=r"pip install 'av>=12'"):
        open_source(spec)


def test_a_video_file_is_decoded_with_pyav(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            image = np.full((48, 64, 3), 40 * i, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    source = open_source(str(path))
    assert isinstance(source, VideoSource)
    assert not source.live
    frames = list(source)
    assert len(frames) == 5
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    # Lossy, but the brightness ramp survives the codec.
    means = [float(f.mean()) for f in frames]
    assert means == sorted(means)
