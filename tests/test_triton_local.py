"""benchmarks/triton_local.py: the bare tritonserver the benchmarks compare against, for real.

Needs nvidia-pytriton in an environment of its own ($FRAMECAST_TRITON_PYTHON, or .venv-triton
in the repository root, which .ci/run creates where the registry answers); skipped with the
reason without one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from framecast_server.backends.null import NullBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import triton_local  # benchmarks/ is not a package: on sys.path above


@pytest.fixture(scope="module")
def triton_python() -> str:
    python, reason = triton_local.find_triton_python(None)
    if python is None:
        pytest.skip(f"no local Triton: {reason}")
    return python


def _group(pgid: int) -> list[int]:
    """Living processes of a process group (tritonserver and its python backend stub)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def test_find_triton_python_says_why_not() -> None:
    python, reason = triton_local.find_triton_python(sys.executable)  # the workspace: numpy 2
    assert python is None
    assert f"nvidia-pytriton is not importable by {sys.executable}" in reason
    python, reason = triton_local.find_triton_python("/nonexistent/bin/python")
    assert python is None
    assert "not importable by /nonexistent/bin/python" in reason


def test_find_triton_python_prefers_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAMECAST_TRITON_PYTHON", "/nonexistent/env/python")
    python, reason = triton_local.find_triton_python(None)
    assert python is None
    assert "/nonexistent/env/python" in reason


@pytest.mark.slow
def test_bare_triton_infers_the_null_distribution(triton_python: str) -> None:
    # Keys (first bytes) 0, 7 and 255: the null backend's rows peak at those classes.
    images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = [0, 7, 255]
    expected = NullBackend(max_batch=8).infer(images)
    with triton_local.bare_triton_process(triton_python, max_batch_size=8) as triton:
        endpoints = triton.endpoints
        assert endpoints.grpc.startswith("127.0.0.1:")
        assert endpoints.http.startswith("127.0.0.1:")
        assert triton.description.startswith(f"tritonserver {triton.version} (bundled by ")
        assert "no PyTriton proxy" in triton.description
        group = _group(triton.pid)
        assert len(group) >= 2  # tritonserver and its stub, no PyTriton proxy process
        with triton_grpc.InferenceServerClient(endpoints.grpc) as client:
            config = client.get_model_config(endpoints.model).config
            assert config.max_batch_size == 8
            assert config.HasField("dynamic_batching")
            request = triton_grpc.InferInput("images", list(images.shape), "UINT8")
            request.set_data_from_numpy(images)
            result = client.infer(endpoints.model, [request])
            probabilities = result.as_numpy("probabilities")
            assert probabilities is not None
            assert probabilities.dtype == np.float32
            np.testing.assert_array_equal(probabilities, expected)
            assert list(probabilities.argmax(axis=1)) == [0, 7, 255]
            # Triton's classification extension, as the benchmarks ask for the top class.
            top = triton_grpc.InferRequestedOutput("probabilities", class_count=1)
            result = client.infer(endpoints.model, [request], outputs=[top])
            labels = result.as_numpy("probabilities")
            assert labels is not None
            assert [row[0].decode().split(":")[1] for row in labels] == ["0", "7", "255"]
    assert _group(triton.pid) == []  # stopped, the stub with it


@pytest.mark.slow
def test_a_model_that_fails_to_load_is_one_clear_error(
    triton_python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = triton_local._MODEL_PY.replace(
        "    def initialize(self, args):\n",
        "    def initialize(self, args):\n        raise ValueError('deliberately broken')\n",
    )
    assert broken != triton_local._MODEL_PY
    monkeypatch.setattr(triton_local, "_MODEL_PY", broken)
    with (
        pytest.raises(RuntimeError, match=r"tritonserver did not start.*deliberately broken"),
        triton_local.bare_triton(triton_python),
    ):
        pass


def test_bad_settings_are_refused_before_starting() -> None:
    for settings in ({"max_batch_size": 0}, {"instances": 0}, {"max_queue_delay_us": -1}):
        with (
            pytest.raises(ValueError, match="at least"),
            triton_local.bare_triton(os.devnull, **settings),
        ):
            pass
