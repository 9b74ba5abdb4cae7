"""framecast-client installs alone (no server dependencies) and classifies against a server.

Builds a fresh virtual environment and pip-installs client/ from this checkout: it needs the
package registry, as an edge device would.
"""

from __future__ import annotations

import subprocess
import venv
from importlib.metadata import distributions
from pathlib import Path

import pytest
from framecast_server.background import BackgroundServer
from PIL import Image

LIST_NAMES = "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'])"
ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"onnx", "onnxruntime", "tensorrt", "pycuda", "framecast-server", "safetensors"}


@pytest.mark.slow
def test_client_alone_installs_lean_and_classifies(
    tmp_path: Path, onnx_server: BackgroundServer
) -> None:
    env = tmp_path / "edge"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(ROOT / "client")],
        check=True,
        timeout=600,
    )
    listed = (
        subprocess.run([python, "-c", LIST_NAMES], check=True, capture_output=True, text=True)
        .stdout.lower()
        .split()
    )
    assert "framecast-client" in listed
    assert not SERVER_ONLY & set(listed)
    assert {d.metadata["Name"].lower() for d in distributions()} & SERVER_ONLY  # sanity: dev env

    image = tmp_path / "frame.jpg"
    Image.new("RGB", (640, 480), (200, 120, 40)).save(image)
    framecast = env / "bin" / "framecast"
    classify = subprocess.run(
        [framecast, "classify", str(image), "--address", onnx_server.address],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert classify.returncode == 0, classify.stderr
    # The warning travels with the labels, on stderr: stdout stays a table to parse.
    assert "RANDOM WEIGHTS" in classify.stderr
    assert "RANDOM WEIGHTS" not in classify.stdout
    assert "frame.jpg" in classify.stdout

    serve = subprocess.run([framecast, "serve"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2
    # A hint that works: the packages are installed from a checkout, not a public index.
    assert "pip install ./client ./server" in serve.stderr
    assert "uv build --all-packages" in serve.stderr
