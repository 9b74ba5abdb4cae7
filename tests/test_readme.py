"""The README's Python examples run, against a real server, with only their inputs swapped in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from framecast_server.background import BackgroundServer
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_five_examples() -> None:
    assert len(BLOCKS) == 5
    assert 'wire="jpeg", quality=90' in BLOCKS[2]
    assert 'classify("elephant.jpg").top' in BLOCKS[0]
    assert "tritonclient.grpc" in BLOCKS[4]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(
    index: int,
    onnx_server: BackgroundServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, colour in (
        ("elephant.jpg", (120, 120, 110)),
        ("a.jpg", (10, 200, 30)),
        ("b.jpg", (200, 10, 30)),
    ):
        Image.new("RGB", (640, 480), colour).save(name)
    (tmp_path / "camera").mkdir()
    for i in range(5):
        Image.new("RGB", (320, 240), (i * 40, 90, 200)).save(tmp_path / "camera" / f"{i}.png")
    code = BLOCKS[index].replace("localhost:50051", onnx_server.address)
    # The camera example reads a directory of frames instead of a network camera.
    code = code.replace('"rtsp://camera.local/stream1"', '"camera"')
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    if index == 0:
        assert out.startswith("Predicted: ")
    if 'wire="jpeg"' in code:
        assert out.strip() == "('raw', 'jpeg', 'png')"
    if "tritonclient" in code:  # three classes, best first
        lines = out.splitlines()
        assert len(lines) == 3
        probabilities = [float(line.rsplit("(", 1)[1].rstrip("%)")) for line in lines]
        assert probabilities == sorted(probabilities, reverse=True)
