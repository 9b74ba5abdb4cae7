"""framecast-client installs alone (no server dependencies) and classifies against a server.

Builds a fresh virtual environment and pip-installs client/ from this checkout, with every
dependency at the lowest version client/pyproject.toml declares (edge devices often ship old
grpcio, protobuf, numpy and pillow): the floors are tested, not just stated. It needs the
package registry, as an edge device would.
"""

from __future__ import annotations

import re
import subprocess
import venv
from importlib.metadata import distributions
from pathlib import Path

import pytest
from framecast_server.process.background import BackgroundServer
from PIL import Image

LIST_NAMES = "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'])"
# The SDK's other calls at the floors: JPEG on the wire, a ClassifyStream, the asyncio client.
EDGE_SDK = """
import asyncio, sys
import numpy as np
from framecast_client import AsyncClient, Client

address, image = sys.argv[1], sys.argv[2]
with Client(address, wire="jpeg", quality=90, timeout=60) as client:
    print("encodings", *client.model_info().encodings)
    print("jpeg", client.classify(image).top.label)
    frames = [np.full((240, 320, 3), value, np.uint8) for value in (0, 128, 255)]
    with client.stream(frames, mode="lossless") as session:
        print("stream", *(result.ok for result in session))

async def main() -> None:
    async with AsyncClient(address, timeout=60) as client:
        results = await client.classify([image, image], top_k=5)
        print("async", *(len(result.predictions) for result in results))

asyncio.run(main())
"""
ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"onnx", "onnxruntime", "tensorrt", "pycuda", "framecast-server", "safetensors"}
# Neither the bench nor what only it uses goes onto a camera.
BENCH_ONLY = {"framecast-bench", "framecast-oip", "matplotlib"}
# What the SDK must not carry: the bench, the server's codecs, the Open Inference Protocol.
NOT_IN_THE_SDK = """
import importlib.util, sys
import framecast_client, framecast_client.wire as wire
names = ["framecast_client.bench", "framecast_client.oip"]
names += ["framecast_client._proto.open_inference_pb2"]
print(*[n for n in names if importlib.util.find_spec(n) is not None])
server_codecs = ("read_classify_request", "images_from_proto", "fill_classification")
print(*[n for n in server_codecs if hasattr(wire, n)])
"""


def declared_floors() -> dict[str, str]:
    """``name: version`` for each ``name>=version`` dependency of the client."""
    # The [project] dependencies array (tomllib is 3.11+; the tests run on 3.10 too).
    text = (ROOT / "client" / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.S | re.M)
    assert block is not None
    floors = {}
    for requirement in re.findall(r'^\s*"([^"]+)"', block[1], flags=re.M):
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.replace(" ", ""))
        assert match, f"client dependency without a plain floor: {requirement}"
        floors[match[1].lower()] = match[2]
    return floors


def test_the_client_declares_floors_for_all_four_dependencies() -> None:
    assert set(declared_floors()) == {"grpcio", "protobuf", "numpy", "pillow"}


@pytest.mark.slow
def test_client_alone_installs_lean_and_classifies(
    tmp_path: Path, onnx_server: BackgroundServer
) -> None:
    env = tmp_path / "edge"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    floors = declared_floors()
    pins = [f"{name}=={version}" for name, version in floors.items()]
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(ROOT / "client"), *pins],
        check=True,
        timeout=600,
    )
    installed = subprocess.run(
        [python, "-c", "import importlib.metadata as m\n"
         "for n in ('grpcio', 'protobuf', 'numpy', 'pillow'): print(n, m.version(n))"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert dict(zip(installed[::2], installed[1::2], strict=True)) == {
        name: _normalized(version) for name, version in floors.items()
    }
    listed = (
        subprocess.run([python, "-c", LIST_NAMES], check=True, capture_output=True, text=True)
        .stdout.lower()
        .split()
    )
    assert "framecast-client" in listed
    assert not (SERVER_ONLY | BENCH_ONLY) & set(listed)
    carried = subprocess.run(
        [python, "-c", NOT_IN_THE_SDK], check=True, capture_output=True, text=True
    ).stdout
    assert carried.split() == []
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

    sdk = subprocess.run(
        [python, "-c", EDGE_SDK, onnx_server.address, str(image)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sdk.returncode == 0, sdk.stderr
    lines = dict(line.split(" ", 1) for line in sdk.stdout.splitlines())
    assert "jpeg" in lines["encodings"].split()
    assert lines["jpeg"]
    assert lines["stream"] == "True True True"
    assert lines["async"] == "5 5"

    serve = subprocess.run([framecast, "serve"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2
    # A hint that works: the packages are installed from a checkout, not a public index.
    assert "pip install ./client ./oip ./server" in serve.stderr
    assert "uv build --all-packages" in serve.stderr
    bench = subprocess.run([framecast, "bench"], capture_output=True, text=True, timeout=60)
    assert bench.returncode == 2
    assert "pip install ./client ./oip ./bench" in bench.stderr

    # The bench installs on its own beside the SDK (no server), at the same floors, and drives
    # both protocols.
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(ROOT / "oip"), str(ROOT / "bench")],
        check=True,
        timeout=600,
    )
    listed = subprocess.run(
        [python, "-c", LIST_NAMES], check=True, capture_output=True, text=True
    ).stdout.lower().split()  # fmt: skip
    assert {"framecast-bench", "framecast-oip"} <= set(listed)
    assert not SERVER_ONLY & set(listed)
    for protocol in ("framecast", "oip"):
        run = subprocess.run(
            [framecast, "bench", onnx_server.address, "--protocol", protocol, "--concurrency",
             "1", "--warmup", "0.2", "--window", "0.5", "--max-windows", "2", "--inputs", "2"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "p50" in run.stdout, run.stdout


def _normalized(version: str) -> str:
    """``10.1`` is installed as ``10.1.0``; ``1.24`` as ``1.24.0``."""
    return version if version.count(".") >= 2 else version + ".0"
